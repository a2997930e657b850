"""Rule for RMSNorm (and the gated, grouped RMSNorm of Mamba2)."""

from __future__ import annotations

from torch import Tensor

from .base import NORM, MambaRule


class ConstantNormRule(MambaRule):
    """The normalising factor of RMSNorm is a constant for relevance.

    ``RMSNorm(x) = w * x * s`` with ``s = rsqrt(mean(x^2) + eps)``; detaching ``s``
    makes the layer linear in ``x`` (``R_in = R_out``: identity on each channel).
    The same holds per group for the grouped norm of Mamba2, and for LayerNorm's
    ``rsqrt(var + eps)`` (AttnLRP, Prop. 3.4 with the identity rule, Eq. 9; MambaLRP's and LXT's
    norm rule).
    """

    kinds = frozenset({NORM})

    def norm_scale(self, scale: Tensor) -> Tensor:
        return scale.detach()
