"""Token relevance as Captum ``VisualizationDataRecord`` s, HTML, and terminal colours
(the colour convention of :mod:`.colors`: red for the explained class, blue against)."""

from __future__ import annotations

import html
from typing import TYPE_CHECKING, Any, List, Optional, Sequence, Union

import torch
from torch import Tensor

from .colors import ansi, css, legend_html, text_colour
from .colors import legend as legend_line
from .words import merge_subwords

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
    pred_class: Optional[Sequence[object]] = None,
    pred_prob: Optional[Sequence[float]] = None,
    attr_class: Optional[Sequence[object]] = None,
    explained: Optional[Sequence[float]] = None,
    delta: Optional[Sequence[float]] = None,
    true_class: Optional[Sequence[object]] = None,
    attention_mask: Optional[Tensor] = None,
    words: Union[bool, str] = False,
) -> List[VisualizationDataRecord]:
    """One :class:`captum.attr.visualization.VisualizationDataRecord` per example.

    ``relevance`` is ``[B, L]`` or one tensor per example (or ``[L]`` with a flat token list,
    for one example); with ``attention_mask`` the
    padded positions are dropped. Word importances are normalised per example.
    ``attr_score`` is the explained logit (``explained``; without it, the summed relevance),
    ``convergence_score`` the delta. The class fields are optional (shown empty).
    ``words=True`` (or a scheme name, see :func:`~captum_mambalrp.visualization.words.word_groups`)
    merges subword pieces into words, each with the sum of its pieces' relevance.
    Tokens and class names are HTML-escaped (Captum's ``visualize_text`` inserts them as they are).

    Returns:
        a list of records, one per example.

    Raises:
        ValueError: an example's token count differs from its relevance values.

    >>> recs = text_records(torch.tensor([[0.5, -1.0]]), [["good", "bad"]])
    >>> recs[0].word_attributions.tolist(), recs[0].attr_score
    ([0.5, -1.0], -0.5)
    >>> len(text_records(torch.tensor([0.5, -1.0]), ["good", "bad"]))  # one example, flat
    1
    """
    from captum.attr import visualization as viz

    def field(values: Optional[Sequence[object]], i: int, default: object) -> object:
        return values[i] if values is not None else default

    if len(tokens) and isinstance(tokens[0], str):  # one example given flat: [L] relevance, L tokens
        tokens = [tokens]  # type: ignore[list-item]
        relevance = torch.as_tensor(relevance).reshape(1, -1)
        attention_mask = None if attention_mask is None else attention_mask.reshape(1, -1)
    records = []
    for i, toks in enumerate(tokens):
        row = relevance[i] if attention_mask is None else relevance[i][attention_mask[i].bool()]
        row = torch.as_tensor(row).detach().float().cpu()
        if len(row) != len(toks):
            raise ValueError(f"example {i}: {len(toks)} tokens but {len(row)} relevance values (pass attention_mask?)")
        shown = list(toks)
        if words:
            shown, row = merge_subwords(shown, row, "auto" if words is True else str(words))
        records.append(
            viz.VisualizationDataRecord(
                word_attributions=normalise(row),
                pred_prob=float(field(pred_prob, i, 0.0)),  # type: ignore[arg-type]
                pred_class=_escaped(field(pred_class, i, "")),
                true_class=_escaped(field(true_class, i, "")),
                attr_class=_escaped(field(attr_class, i, "")),
                attr_score=float(field(explained, i, float(row.sum()))),  # type: ignore[arg-type]
                raw_input_ids=[html.escape(t) for t in shown],
                convergence_score=float(field(delta, i, 0.0)),  # type: ignore[arg-type]
            )
        )
    return records


def _safe(value: object) -> str:
    """Text for HTML: records from :func:`text_records` are escaped already; escaping the
    unescaped text again keeps them as they are and makes any other record safe too."""
    return html.escape(html.unescape(str(value)))


PAGE_CSS = (
    "body{font-family:system-ui,sans-serif;margin:16px;color:#1d1d1f}"
    "table{border-collapse:collapse}th,td{border:1px solid #ddd;padding:4px 8px;text-align:left;vertical-align:top}"
    "th{background:#f0f1f4}td.tokens{line-height:2.0}"
    "mark{padding:1px 3px;margin:0 1px;border-radius:3px;border:1px solid #e3e3e3}"
)


def records_table(records: Sequence[VisualizationDataRecord], legend: bool = True) -> str:
    """The records as an HTML table (Captum's ``visualize_text`` columns), tokens coloured
    by this package's convention (red: for the explained class, blue: against), with a legend.

    Returns:
        an HTML fragment (every text escaped).
    """
    head = (
        "<tr><th>True Label</th><th>Predicted Label</th><th>Attribution Label</th>"
        "<th>Attribution Score</th><th>Convergence Delta</th><th>Word Importance</th></tr>"
    )
    rows = []
    for r in records:
        marks = " ".join(
            f'<mark style="background-color:{css(v)};color:{text_colour(v)}" '
            f'data-relevance="{float(v):.6g}" title="{float(v):+.3f}">{_safe(t)}</mark>'
            for t, v in zip(r.raw_input_ids, torch.as_tensor(r.word_attributions).tolist())
        )
        rows.append(
            f"<tr><td>{_safe(r.true_class)}</td><td>{_safe(r.pred_class)} ({float(r.pred_prob):.2f})</td>"
            f"<td>{_safe(r.attr_class)}</td><td>{float(r.attr_score):.4f}</td><td>{float(r.convergence_score):.2e}</td>"
            f'<td class="tokens">{marks}</td></tr>'
        )
    return (legend_html() if legend else "") + f"<table>{head}{''.join(rows)}</table>"


def captum_html(records: Sequence[VisualizationDataRecord], title: str = "MambaLRP relevance") -> str:
    """A standalone HTML page of the records: Captum's ``visualize_text`` table in this
    package's colours (red: for the explained class, blue: against; Captum's own function
    colours green/red), with a legend. Tokens, labels and the title are escaped.

    Returns:
        the page as a string (what ``captum-mambalrp explain --html`` writes).
    """
    return (
        "<!DOCTYPE html><html><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title><style>{PAGE_CSS}</style></head><body>"
        f"<h3>{html.escape(title)}</h3>{records_table(records)}"
        "<p style='font-size:12px;color:#555'>Word importance: relevance scaled per text by its largest magnitude. "
        "Attribution score: the explained logit; convergence delta: explained logit minus summed relevance.</p>"
        "</body></html>"
    )


def visualize_text(records: Sequence[VisualizationDataRecord], legend: bool = True) -> Any:
    """In a notebook: display the records as :func:`records_table` (this package's colours)
    and return the IPython ``HTML`` object; a drop-in for Captum's ``visualize_text``."""
    from IPython.display import HTML, display

    shown = HTML(records_table(records, legend=legend))
    display(shown)
    return shown


def terminal_heatmap(
    tokens: Sequence[str], relevance: Tensor, color: bool = True, words: Union[bool, str] = False, legend: bool = False
) -> str:
    """Tokens on coloured backgrounds (24-bit ANSI: red for, blue against the explained
    class), or ``token(+0.12)`` without colour (the relevance scaled to [-1, 1]).

    ``words=True`` (or a scheme name) merges subword pieces into words first (summed
    relevance); ``legend=True`` appends :func:`~captum_mambalrp.visualization.colors.legend`
    on a line of its own.

    Returns:
        the line(s) to print.

    >>> terminal_heatmap(["good", "bad"], torch.tensor([1.0, -0.5]), color=False)
    'good(+1.00) bad(-0.50)'
    """
    values = torch.as_tensor(relevance).detach().float().cpu()
    shown = list(tokens)
    if words:
        shown, values = merge_subwords(shown, values, "auto" if words is True else str(words))
    parts = []
    for tok, v in zip(shown, normalise(values).tolist()):
        if color:
            parts.append(ansi(v, tok))
        else:
            parts.append(f"{tok}({v:+.2f})")
    line = " ".join(parts)
    return line + "\n" + legend_line(color) if legend else line
