"""The one colour convention of every picture this package draws.

**Red** = relevance *for* the explained class (positive), **blue** = *against* it (negative),
**white** = none. The intensity is the relevance scaled by the largest magnitude of what is
shown (a text, a heatmap), so the strongest token or pixel is fully red or fully blue:

    rgb(v) = (255, 255 (1 - v), 255 (1 - v))      for v in [0, 1]
    rgb(v) = (255 (1 + v), 255 (1 + v), 255)      for v in [-1, 0]

The terminal heatmap, the HTML page of ``captum-mambalrp explain``, the image heatmaps, the
dashboard and its exported pages all use it (the dashboard's JavaScript repeats
:func:`rgb`; a test compares them), each with a legend (:func:`legend`, :func:`legend_html`).
"""

from __future__ import annotations

import html
from typing import Any, Tuple

POSITIVE_NAME = "red"
NEGATIVE_NAME = "blue"
LEGEND = "red: for the explained class (positive relevance) · white: none · blue: against it (negative relevance)"


def rgb(value: float) -> Tuple[int, int, int]:
    """The colour of a relevance ``value`` already scaled to [-1, 1] (clipped outside).

    Returns:
        ``(r, g, b)`` in 0..255: red for positive, blue for negative, white for zero.

    >>> rgb(1.0), rgb(-1.0), rgb(0.0)
    ((255, 0, 0), (0, 0, 255), (255, 255, 255))
    """
    value = max(-1.0, min(1.0, float(value)))
    fade = int(255 * (1 - abs(value)))
    return (255, fade, fade) if value >= 0 else (fade, fade, 255)


def css(value: float) -> str:
    """:func:`rgb` as a CSS colour.

    >>> css(1.0), css(-0.5)
    ('rgb(255, 0, 0)', 'rgb(127, 127, 255)')
    """
    return "rgb({}, {}, {})".format(*rgb(value))


def text_colour(value: float) -> str:
    """Black text on light backgrounds, white on strong ones (``|value| > 0.6``)."""
    return "#fff" if abs(value) > 0.6 else "#000"


def relevance_cmap() -> Any:
    """A matplotlib colour map of the convention over [-1, 1] (blue, white, red), for
    ``imshow(..., vmin=-1, vmax=1)`` and Captum's ``visualize_image_attr(sign="all")``.

    Returns:
        a ``LinearSegmentedColormap`` named ``"mambalrp_relevance"``.
    """
    from matplotlib.colors import LinearSegmentedColormap

    return LinearSegmentedColormap.from_list("mambalrp_relevance", [(0.0, 0.0, 1.0), (1.0, 1.0, 1.0), (1.0, 0.0, 0.0)])


def ansi(value: float, text: str) -> str:
    """``text`` on the convention's colour for ``value`` in [-1, 1] (24-bit ANSI), in black on
    light backgrounds and white on strong ones (:func:`text_colour`).

    >>> ansi(1.0, "x") == "\x1b[48;2;255;0;0m\x1b[38;2;255;255;255m x \x1b[0m"
    True
    """
    r, g, b = rgb(value)
    fg = "255;255;255" if text_colour(value) == "#fff" else "0;0;0"
    return f"\x1b[48;2;{r};{g};{b}m\x1b[38;2;{fg}m {text} \x1b[0m"


def legend(color: bool = True) -> str:
    """The legend for the terminal: coloured swatches (24-bit ANSI) or, without colour,
    the words alone.

    >>> legend(color=False)
    'legend: red = for the explained class (+), white = none, blue = against it (-)'
    """
    if not color:
        return "legend: red = for the explained class (+), white = none, blue = against it (-)"

    return "legend: " + " ".join((ansi(1.0, "for the class (+)"), ansi(0.0, "none"), ansi(-1.0, "against it (-)")))


def legend_html() -> str:
    """The legend as an HTML fragment (inline styles only): three swatches and their meaning.

    Returns:
        a ``<div class="legend">`` with the red, white and blue swatches.
    """
    items = ((1.0, "for the explained class (positive)"), (0.0, "none"), (-1.0, "against it (negative)"))
    spans = "".join(
        f'<span class="legend-item"><span class="swatch" style="display:inline-block;width:1.1em;height:1.1em;'
        f'vertical-align:middle;border:1px solid #999;background-color:{css(v)}"></span> {html.escape(label)}</span> '
        for v, label in items
    )
    return f'<div class="legend" style="margin:6px 0;font-size:13px"><b>Legend:</b> {spans}</div>'


__all__ = ["LEGEND", "css", "legend", "legend_html", "relevance_cmap", "rgb", "text_colour"]
