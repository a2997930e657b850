"""Dashboard views beyond a fresh explanation: the words of a view's tokens (subword pieces
merged, for the page's *words* switch) and the view of a saved result
(:mod:`captum_mambalrp.results`)."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Dict, List, Sequence

from ..results import SCHEMA, SCHEMA_VERSION, AttributionResult, load_results, model_info

if TYPE_CHECKING:
    from .explain import Explainer
from ..visualization.words import word_groups


def with_words(view: Dict[str, Any]) -> Dict[str, Any]:
    """The view with ``words``: ``[[word, [token indices]], ...]`` (see
    :func:`~captum_mambalrp.visualization.words.word_groups`); the page sums the relevance
    of each word's pieces when its *words* switch is on. Returns the same dict."""
    view["words"] = [[word, index] for word, index in word_groups(view.get("tokens") or [])]
    return view


def result_view(result: AttributionResult, source: str = "") -> Dict[str, Any]:
    """The dashboard view of a saved result: its MambaLRP heatmap, prediction, target and
    provenance (model, rules, versions, date). It has no per-layer relevance and no other
    methods (a result file keeps MambaLRP's token relevance only).

    Returns:
        a view as :meth:`Explainer.explain <captum_mambalrp.dashboard.Explainer.explain>` gives, with ``saved``.
    """
    total = float(result.relevance.sum())
    prediction = result.prediction if result.prediction is not None else result.target_name
    view: Dict[str, Any] = {
        "text": result.text or " ".join(result.tokens),
        "tokens": list(result.tokens),
        "prediction": {"label": prediction, "prob": result.prediction_prob},
        "top": [],
        "target": {
            "label": result.target_name,
            "index": result.target_index,
            "logit": result.explained,
            "position": result.position,
        },
        "delta": result.delta,
        "methods": [
            {
                "key": "mambalrp",
                "name": result.method,
                "description": "saved result",
                "relevance": [float(v) for v in result.relevance.tolist()],
                "sum": total,
                "delta": result.explained - total,
                "seconds": None,
            }
        ],
        "layers": None,
        "saved": {
            "file": source,
            "model": str(result.model.get("name", "")),
            "config_hash": result.model.get("config_hash"),
            "composite": result.composite,
            "created": result.created,
            "versions": ", ".join(f"{k} {v}" for k, v in result.versions.items()),
            "record": result.to_dict(),  # saved again as it is (``results_file``)
        },
    }
    return with_words(view)


def view_result(view: Dict[str, Any], explainer: Explainer) -> AttributionResult:
    """The MambaLRP result of a dashboard view, with the provenance of ``explainer`` (its
    model, rule set, rule table); a view of a saved result gives back that result.

    Raises:
        ValueError: the view is not one the dashboard made (a field missing or malformed).
    """
    if not isinstance(view, dict):
        raise ValueError("a view must be a JSON object")
    saved = view.get("saved")
    if isinstance(saved, dict) and isinstance(saved.get("record"), dict):
        return AttributionResult.from_dict(saved["record"])
    try:
        row = next(m for m in view["methods"] if isinstance(m, dict) and m.get("key") == "mambalrp")
        target, prediction = view["target"], view.get("prediction") or {}
        data = {
            "text": view.get("text", ""),
            "tokens": view["tokens"],
            "relevance": row["relevance"],
            "target": {"index": target["index"], "name": target["label"], "position": target.get("position", -1)},
            "prediction": {"label": prediction.get("label"), "prob": prediction.get("prob")},
            "explained": target["logit"],
            "delta": view.get("delta", 0.0),
        }
    except (KeyError, TypeError, StopIteration):
        raise ValueError("a view lacks its MambaLRP row, tokens or target") from None
    result = AttributionResult.from_dict(data)
    result.model = model_info(explainer.model, explainer.source)
    result.composite = explainer.composite
    result.rules = explainer.lrp.rule_table()
    return result


def results_file(views: Sequence[Dict[str, Any]], explainer: Explainer) -> Dict[str, Any]:
    """The content of a results file (as :func:`~captum_mambalrp.results.save_results`
    writes it) for dashboard views."""
    return {"schema": SCHEMA, "version": SCHEMA_VERSION, "results": [view_result(v, explainer).to_dict() for v in views]}


def load_result_views(paths: Sequence[str]) -> List[Dict[str, Any]]:
    """The views of every result in the files ``paths`` (see :func:`~captum_mambalrp.results.load_results`).

    Raises:
        FileNotFoundError, ValueError: a file is missing or not a results file.
    """
    views: List[Dict[str, Any]] = []
    for path in paths:
        views.extend(result_view(r, os.path.basename(path)) for r in load_results(path))
    return views


__all__ = ["load_result_views", "result_view", "results_file", "view_result", "with_words"]
