"""The Captum-facing attribution classes."""

from .layer import LayerMambaLRP
from .mamba_lrp import MambaLRP, find_embedding
from .targets import output_scores, select_targets

__all__ = ["LayerMambaLRP", "MambaLRP", "find_embedding", "output_scores", "select_targets"]
