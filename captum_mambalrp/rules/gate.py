"""Rule for the multiplicative gate ``y * silu(z)``."""

from __future__ import annotations

from torch import Tensor

from .base import GATE, MambaRule


class HalfGateRule(MambaRule):
    """Each factor of a product receives half of its relevance.

    ``p = y * g`` is rewritten as ``p / 2 + (p / 2).detach()``: the gradient reaching
    ``p`` is halved, and the product rule hands ``g * grad / 2`` to ``y`` and
    ``y * grad / 2`` to ``g``, so ``R_y = R_g = R_p / 2`` and ``R_y + R_g = R_p``.
    """

    kinds = frozenset({GATE})

    def gate(self, y: Tensor, g: Tensor) -> Tensor:
        half = (y * g) * 0.5
        return half + half.detach()
