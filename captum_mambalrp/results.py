"""Attribution results people keep: saved to and loaded from a JSON file.

One file holds a list of results (one per explained text) under a versioned schema::

    {"schema": "captum-mambalrp/attribution-results", "version": 1, "results": [
        {"text": ..., "tokens": [...], "relevance": [...], "target": {"index", "name", "position"},
         "prediction": {"label", "prob"}, "explained": ..., "delta": ...,
         "model": {"name", "path", "class", "config_hash"}, "composite": ..., "rules": {...},
         "versions": {"captum_mambalrp", "torch", "transformers", "captum", "python"},
         "created": "2026-12-01T19:00:00+00:00", "method": "MambaLRP"}]}

JSON keeps it readable and diffable; the relevance is float32, whose values JSON's
shortest round-trip decimals give back exactly. Loaded results feed the terminal heatmap
(:meth:`AttributionResult.heatmap`), Captum's records and the HTML page (:func:`records`,
:func:`~captum_mambalrp.visualization.captum_html`) and the dashboard
(``captum-mambalrp dashboard --result FILE``).

    >>> from captum_mambalrp.results import AttributionResult, load_results, save_results
    >>> r = AttributionResult(tokens=["good", "bad"], relevance=[1.5, -0.5], target_index=1, target_name="joy", explained=1.0)
    >>> import os, tempfile; path = os.path.join(tempfile.mkdtemp(), "r.json")
    >>> _ = save_results(path, [r]); load_results(path)[0].relevance.tolist()
    [1.5, -0.5]
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import platform
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Union

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from .attribution import MambaLRP
    from .text import TextExplanation

SCHEMA = "captum-mambalrp/attribution-results"
SCHEMA_VERSION = 1
_VOLATILE_CONFIG_KEYS = ("transformers_version", "_name_or_path", "_commit_hash", "torch_dtype", "dtype", "_attn_implementation")


def config_hash(model: nn.Module) -> Optional[str]:
    """A short hash (16 hex digits, SHA-256) of the model's configuration, or None for a
    model without a transformers ``config``. Keys that vary without changing the model
    (``transformers_version``, ``_name_or_path``, the dtype) are left out.

    >>> config_hash(nn.Linear(2, 2)) is None
    True
    """
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        return None
    data = {k: v for k, v in config.to_dict().items() if k not in _VOLATILE_CONFIG_KEYS}
    text = json.dumps(data, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def versions() -> Dict[str, str]:
    """The versions of this package, torch, transformers, captum and Python."""
    import captum

    from . import __version__

    try:
        import transformers

        tf = transformers.__version__
    except ImportError:  # pragma: no cover - transformers is a dependency
        tf = "not installed"
    return {
        "captum_mambalrp": __version__,
        "torch": torch.__version__,
        "transformers": tf,
        "captum": captum.__version__,
        "python": platform.python_version(),
    }


def model_info(model: nn.Module, name: Optional[str] = None) -> Dict[str, Any]:
    """Name, path (``config._name_or_path``), class and :func:`config_hash` of a model."""
    config = getattr(model, "config", None)
    path = str(getattr(config, "_name_or_path", "") or "")
    return {
        "name": name or path or type(model).__name__,
        "path": path,
        "class": type(model).__name__,
        "config_hash": config_hash(model),
    }


@dataclass
class AttributionResult:
    """One explained text: its tokens' relevance for one explained score, and where it came from.

    ``relevance`` is a float32 tensor ``[L]`` (one value per token); ``explained`` the
    explained score (a logit); ``delta`` Captum's convergence delta (explained minus summed
    relevance). ``model``, ``rules``, ``versions`` and ``created`` record the provenance.
    """

    tokens: List[str]
    relevance: Tensor
    target_index: int
    target_name: str
    explained: float
    delta: float = 0.0
    text: str = ""
    position: int = -1
    prediction: Optional[str] = None
    prediction_prob: Optional[float] = None
    model: Dict[str, Any] = field(default_factory=dict)
    composite: str = ""
    rules: Dict[str, str] = field(default_factory=dict)
    versions: Dict[str, str] = field(default_factory=versions)
    created: str = field(default_factory=lambda: datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    method: str = "MambaLRP"

    def __post_init__(self) -> None:
        self.relevance = torch.as_tensor(self.relevance).detach().to(torch.float32).cpu().reshape(-1)
        self.tokens = [str(t) for t in self.tokens]
        if len(self.tokens) != len(self.relevance):
            raise ValueError(
                f"a result needs one relevance value per token: {len(self.tokens)} tokens, {len(self.relevance)} values"
            )

    @classmethod
    def from_explanation(
        cls,
        explanation: TextExplanation,
        model: nn.Module,
        lrp: Optional[MambaLRP] = None,
        model_name: Optional[str] = None,
        composite: str = "",
    ) -> AttributionResult:
        """A result from :func:`captum_mambalrp.text.explain_texts`'s output; ``lrp`` (the
        ``MambaLRP`` that computed it) gives the rule table; ``composite`` names its rule set::

            lrp = MambaLRP(model)
            kept = [AttributionResult.from_explanation(e, model, lrp) for e in explain_texts(model, tokenizer, texts, lrp=lrp)]
        """
        rules = lrp.rule_table() if lrp is not None else {}
        return cls(
            tokens=list(explanation.tokens),
            relevance=explanation.relevance,
            target_index=int(explanation.target_index),
            target_name=str(explanation.target_label),
            explained=float(explanation.explained),
            delta=float(explanation.delta),
            text=explanation.text,
            position=int(explanation.position),
            prediction=str(explanation.pred_label),
            prediction_prob=float(explanation.pred_prob),
            model=model_info(model, model_name),
            composite=composite,
            rules=dict(rules),
        )

    def to_dict(self) -> Dict[str, Any]:
        """The result as JSON-ready data (the schema's ``results`` entries)."""
        return {
            "method": self.method,
            "text": self.text,
            "tokens": list(self.tokens),
            "relevance": [float(v) for v in self.relevance.tolist()],
            "target": {"index": self.target_index, "name": self.target_name, "position": self.position},
            "prediction": {"label": self.prediction, "prob": self.prediction_prob},
            "explained": self.explained,
            "delta": self.delta,
            "model": dict(self.model),
            "composite": self.composite,
            "rules": dict(self.rules),
            "versions": dict(self.versions),
            "created": self.created,
        }

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> AttributionResult:
        """The inverse of :meth:`to_dict`.

        Raises:
            ValueError: a field is missing or of the wrong type (named in the message).
        """
        if not isinstance(data, dict):
            raise ValueError("a result must be a JSON object")
        try:
            target, prediction = data["target"], data.get("prediction") or {}
            return cls(
                tokens=list(data["tokens"]),
                relevance=torch.tensor([float(v) for v in data["relevance"]], dtype=torch.float32),
                target_index=int(target["index"]),
                target_name=str(target.get("name", target["index"])),
                position=int(target.get("position", -1)),
                explained=float(data["explained"]),
                delta=float(data.get("delta", 0.0)),
                text=str(data.get("text", "")),
                prediction=prediction.get("label"),
                prediction_prob=prediction.get("prob"),
                model=dict(data.get("model") or {}),
                composite=str(data.get("composite", "")),
                rules=dict(data.get("rules") or {}),
                versions=dict(data.get("versions") or {}),
                created=str(data.get("created", "")),
                method=str(data.get("method", "MambaLRP")),
            )
        except KeyError as err:
            raise ValueError(f"a result lacks the field {err.args[0]!r}") from None
        except (TypeError, AttributeError) as err:
            raise ValueError(f"a result has a field of the wrong type: {err}") from None

    def heatmap(self, color: bool = True, words: Union[bool, str] = False, legend: bool = False) -> str:
        """The terminal heatmap of this result (:func:`~captum_mambalrp.visualization.terminal_heatmap`)."""
        from .visualization import terminal_heatmap

        return terminal_heatmap(self.tokens, self.relevance, color=color, words=words, legend=legend)


def records(results: Sequence[AttributionResult], words: Union[bool, str] = False) -> List[Any]:
    """Captum ``VisualizationDataRecord`` s of saved results (for ``captum_html`` or
    ``visualize_text``)."""
    from .visualization import text_records

    return text_records(
        [r.relevance for r in results],
        [r.tokens for r in results],
        pred_class=[r.prediction or "" for r in results],
        pred_prob=[r.prediction_prob or 0.0 for r in results],
        attr_class=[r.target_name for r in results],
        explained=[r.explained for r in results],
        delta=[r.delta for r in results],
        words=words,
    )


def save_results(path: Union[str, os.PathLike], results: Union[AttributionResult, Sequence[AttributionResult]]) -> str:
    """Write ``results`` (one or a list) to ``path`` as JSON; returns the absolute path.

    Raises:
        ValueError: nothing to save.
    """
    items = [results] if isinstance(results, AttributionResult) else list(results)
    if not items:
        raise ValueError("no results to save")
    payload = {"schema": SCHEMA, "version": SCHEMA_VERSION, "results": [r.to_dict() for r in items]}
    with open(path, "w", encoding="utf-8") as f:
        json.dump(payload, f, ensure_ascii=False, indent=1, allow_nan=False)
        f.write("\n")
    return os.path.abspath(path)


def load_results(path: Union[str, os.PathLike]) -> List[AttributionResult]:
    """The results saved in ``path`` by :func:`save_results`.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a results file (not JSON, another schema), a newer schema version,
            or a malformed result; the message says which.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such results file: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            payload = json.load(f)
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not a results file (not JSON: {err})") from None
    if not isinstance(payload, dict) or payload.get("schema") != SCHEMA:
        raise ValueError(f"{path} is not a captum-mambalrp results file (no schema {SCHEMA!r}); save one with save_results")
    version = payload.get("version")
    if not isinstance(version, int) or version > SCHEMA_VERSION:
        raise ValueError(
            f"{path} has results schema version {version!r}; this captum-mambalrp reads up to {SCHEMA_VERSION}: upgrade it"
        )
    items = payload.get("results")
    if not isinstance(items, list) or not items:
        raise ValueError(f"{path} holds no results")
    out = []
    for i, item in enumerate(items):
        try:
            out.append(AttributionResult.from_dict(item))
        except ValueError as err:
            raise ValueError(f"{path}: result {i}: {err}") from None
    return out


__all__ = [
    "SCHEMA",
    "SCHEMA_VERSION",
    "AttributionResult",
    "config_hash",
    "load_results",
    "model_info",
    "records",
    "save_results",
    "versions",
]
