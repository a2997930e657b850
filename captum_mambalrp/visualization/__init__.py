"""Pictures of relevance: terminal colours, Captum's text records and HTML."""

from .text import captum_html, terminal_heatmap, text_records

__all__ = ["captum_html", "terminal_heatmap", "text_records"]
