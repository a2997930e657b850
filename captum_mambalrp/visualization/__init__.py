"""Pictures of relevance: terminal colours, Captum's text records and HTML, and Captum's
image heatmaps (Vision Mamba)."""

from .image import image_attr_figure, vim_heatmap
from .text import captum_html, terminal_heatmap, text_records

__all__ = ["captum_html", "image_attr_figure", "terminal_heatmap", "text_records", "vim_heatmap"]
