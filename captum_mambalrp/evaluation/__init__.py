"""Comparative attribution studies: faithfulness metrics, a registry of baselines, hidden
attention, conservation and position/layer analyses, and a resumable study runner.

    from captum_mambalrp.evaluation import Study, StudyConfig, resolve_methods
    Study(model, tokenizer, texts, labels, StudyConfig(methods=resolve_methods("all")), "out/").run()
"""

from .analysis import LayerRelevance, Profile, distance_profile, find_blocks, layer_relevance
from .conservation import ConservationReport, conservation_report
from .data import load_split
from .hidden_attention import HiddenAttentionAttribution, hidden_attention, rollout, scan_records
from .methods import (
    GROUPS,
    METHODS,
    MethodOptions,
    MethodSpec,
    TokenAttribution,
    build_method,
    register_method,
    resolve_methods,
)
from .perturbation import CURVES, Perturbation, area, flipping_scores, neutral_token_id, perturbation_curves
from .scores import ForwardCounter, LastTokenScores
from .study import Study, StudyConfig, summarize

__all__ = [
    "CURVES",
    "ConservationReport",
    "ForwardCounter",
    "GROUPS",
    "HiddenAttentionAttribution",
    "LastTokenScores",
    "LayerRelevance",
    "METHODS",
    "MethodOptions",
    "MethodSpec",
    "Perturbation",
    "Profile",
    "Study",
    "StudyConfig",
    "TokenAttribution",
    "area",
    "build_method",
    "conservation_report",
    "distance_profile",
    "find_blocks",
    "flipping_scores",
    "hidden_attention",
    "layer_relevance",
    "load_split",
    "neutral_token_id",
    "perturbation_curves",
    "register_method",
    "resolve_methods",
    "rollout",
    "scan_records",
    "summarize",
]
