"""Rule for the multiplicative gate ``y * silu(z)``."""

from __future__ import annotations

from typing import Callable

from torch import Tensor

from ..kernels import fused_kernels_enabled
from .activation import IdentityActivationRule, is_silu
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


def gate_with_activation(
    gate_rule: MambaRule,
    act_rule: MambaRule,
    y: Tensor,
    z: Tensor,
    act: Callable[[Tensor], Tensor],
    transposed_out: bool = False,
) -> Tensor:
    """``gate_rule.gate(y, act_rule.activation(z, act))``. On CUDA, MambaLRP's default pair
    (half rule, identity rule on SiLU) runs as one fused kernel each way
    (``kernels.elementwise.half_silu_gate``, the same math; ``transposed_out`` stores its
    ``[b, r, c]`` result ``[b, c, r]``-contiguous, the layout the next linear layer reads)."""
    if (
        type(gate_rule) is HalfGateRule
        and type(act_rule) is IdentityActivationRule
        and act_rule.epsilon is None
        and is_silu(act)
        and y.dim() == 3
        and y.shape == z.shape
        and y.dtype == z.dtype
        and fused_kernels_enabled(y, z)
    ):
        from ..kernels import elementwise

        return elementwise.half_silu_gate(y, z, transposed_out)
    return gate_rule.gate(y, act_rule.activation(z, act))
