"""Comparative attribution studies: faithfulness metrics, a registry of baselines, hidden
attention, conservation and position/layer analyses, and a resumable study runner.

    from captum_mambalrp.evaluation import Study, StudyConfig, resolve_methods
    Study(model, tokenizer, texts, labels, StudyConfig(methods=resolve_methods("all")), "out/").run()

The helpers behind these live in the submodules (``perturbation``, ``hidden_attention``,
``analysis``, ``summary``, ``stats``, ...) and are imported from there.
"""

from .analysis import distance_profile, find_blocks, layer_relevance
from .base import MethodOptions, TokenAttribution
from .conservation import conservation_report
from .data import load_split
from .methods import GROUPS, METHODS, MethodSpec, build_method, register_method, resolve_methods
from .perturbation import Perturbation, flipping_scores, perturbation_curves
from .study import Study, StudyConfig
from .summary import summarize

__all__ = [
    "GROUPS",
    "METHODS",
    "MethodOptions",
    "MethodSpec",
    "Perturbation",
    "Study",
    "StudyConfig",
    "TokenAttribution",
    "build_method",
    "conservation_report",
    "distance_profile",
    "find_blocks",
    "flipping_scores",
    "layer_relevance",
    "load_split",
    "perturbation_curves",
    "register_method",
    "resolve_methods",
    "summarize",
]
