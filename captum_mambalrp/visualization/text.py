"""Token relevance as Captum ``VisualizationDataRecord`` s, HTML, and terminal colours."""

from __future__ import annotations

import contextlib
import html
import io
from typing import TYPE_CHECKING, List, Optional, Sequence, Union

import torch
from torch import Tensor

if TYPE_CHECKING:
    from captum.attr._utils.visualization import VisualizationDataRecord


def normalise(relevance: Tensor) -> Tensor:
    """Scale to [-1, 1] by the largest magnitude (Captum's colour map expects that)."""
    relevance = relevance.detach().float().cpu()
    peak = relevance.abs().max()
    return relevance / peak if peak > 0 else relevance


def _escaped(value: object) -> object:
    """Strings HTML-escaped; class indices and other values as they are."""
    return html.escape(value) if isinstance(value, str) else value


def text_records(
    relevance: Union[Tensor, Sequence[Tensor]],
    tokens: Sequence[Sequence[str]],
    *,
    pred_class: Sequence[object],
    pred_prob: Sequence[float],
    attr_class: Sequence[object],
    explained: Sequence[float],
    delta: Optional[Sequence[float]] = None,
    true_class: Optional[Sequence[object]] = None,
    attention_mask: Optional[Tensor] = None,
) -> List[VisualizationDataRecord]:
    """One :class:`captum.attr.visualization.VisualizationDataRecord` per example.

    ``relevance`` is ``[B, L]`` or one tensor per example; with ``attention_mask`` the
    padded positions are dropped. Word importances are normalised per example.
    ``attr_score`` is the explained logit; ``convergence_score`` the delta. Tokens and
    class names are HTML-escaped (Captum's ``visualize_text`` inserts them as they are).
    """
    from captum.attr import visualization as viz

    records = []
    for i, toks in enumerate(tokens):
        row = relevance[i] if attention_mask is None else relevance[i][attention_mask[i].bool()]
        if len(row) != len(toks):
            raise ValueError(f"example {i}: {len(toks)} tokens but {len(row)} relevance values (pass attention_mask?)")
        records.append(
            viz.VisualizationDataRecord(
                word_attributions=normalise(row),
                pred_prob=float(pred_prob[i]),
                pred_class=_escaped(pred_class[i]),
                true_class=_escaped(true_class[i]) if true_class is not None else "",
                attr_class=_escaped(attr_class[i]),
                attr_score=float(explained[i]),
                raw_input_ids=[html.escape(t) for t in toks],
                convergence_score=float(delta[i]) if delta is not None else 0.0,
            )
        )
    return records


def captum_html(records: Sequence[VisualizationDataRecord], title: str = "MambaLRP relevance") -> str:
    """A standalone HTML page of Captum's ``visualize_text`` table (tokens are escaped)."""
    from captum.attr import visualization as viz

    with contextlib.redirect_stdout(io.StringIO()):  # visualize_text also "displays" the table
        table = viz.visualize_text(records).data
    return (
        "<!DOCTYPE html><html><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title></head><body>"
        f"<h3>{html.escape(title)}</h3>{table}</body></html>"
    )


def _rgb(value: float) -> tuple:
    """Red for positive, blue for negative relevance, white for none."""
    value = max(-1.0, min(1.0, value))
    fade = int(255 * (1 - abs(value)))
    return (255, fade, fade) if value >= 0 else (fade, fade, 255)


def terminal_heatmap(tokens: Sequence[str], relevance: Tensor, color: bool = True) -> str:
    """Tokens on coloured backgrounds (24-bit ANSI), or ``token(+0.12)`` without colour."""
    values = normalise(torch.as_tensor(relevance)).tolist()
    parts = []
    for tok, v in zip(tokens, values):
        if color:
            r, g, b = _rgb(v)
            parts.append(f"\x1b[48;2;{r};{g};{b}m\x1b[38;2;0;0;0m {tok} \x1b[0m")
        else:
            parts.append(f"{tok}({v:+.2f})")
    return " ".join(parts)
