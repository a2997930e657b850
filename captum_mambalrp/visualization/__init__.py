"""Pictures of relevance: terminal colours, Captum's text records and HTML, and Captum's
image heatmaps (Vision Mamba), all in one colour convention (:mod:`.colors`: red for the
explained class, blue against, white none), and subword pieces merged into words (:mod:`.words`)."""

from .colors import legend, legend_html, relevance_cmap
from .image import image_attr_figure, vim_heatmap
from .text import captum_html, records_table, terminal_heatmap, text_records, visualize_text
from .words import merge_subwords, word_groups

__all__ = [
    "captum_html",
    "image_attr_figure",
    "legend",
    "legend_html",
    "merge_subwords",
    "records_table",
    "relevance_cmap",
    "terminal_heatmap",
    "text_records",
    "vim_heatmap",
    "visualize_text",
    "word_groups",
]
