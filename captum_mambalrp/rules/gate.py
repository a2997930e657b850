"""Rule for the multiplicative gate ``y * silu(z)``."""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from ..kernels.dispatch import fused_gate
from .activation import is_silu
from .base import GATE, MambaRule


class HalfGateRule(MambaRule):
    """Each factor of a product receives half of its relevance.

    ``p = y * g`` is rewritten as ``p / 2 + (p / 2).detach()``: the gradient reaching
    ``p`` is halved, and the product rule hands ``g * grad / 2`` to ``y`` and
    ``y * grad / 2`` to ``g``, so ``R_y = R_g = R_p / 2`` and ``R_y + R_g = R_p``.
    MambaLRP's gate rule (Jafari et al. 2024) is AttnLRP's uniform rule on an element-wise
    product (Achtibat et al. 2024, Eq. 7 and Prop. 3.2); it serves the SSM's gate ``y * silu(z)``
    and the gated MLPs (``act(gate_proj(x)) * up_proj(x)``) alike.
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
    out_dtype: Optional[torch.dtype] = None,
) -> Tensor:
    """``gate_rule.gate(y, act_rule.activation(z.to(y.dtype), act)).to(out_dtype)``: ``z`` may come
    in a lower precision than ``y`` (a bf16 model's gate input beside the float32 scan output; the
    upcast is exact), and ``out_dtype`` (default: ``y``'s) is what the layer after it reads (a bf16
    model's ``out_proj``). Where a fused kernel computes the same math for this pair of rule types
    (``kernels.dispatch.GATE_KERNELS``; on CUDA, MambaLRP's default pair), it runs instead, reads
    ``z`` as it is and keeps it (not a float32 copy) for the backward pass, and rounds its
    float32 result once to ``out_dtype`` (no float32 result and no cast each way); ``transposed_out``
    then stores its ``[b, r, c]`` result ``[b, c, r]``-contiguous, the layout the next linear
    layer reads."""
    fused = fused_gate(gate_rule, act_rule, y, z, is_silu(act), transposed_out, out_dtype)
    if fused is not None:  # (a kernel that does not round to out_dtype itself is cast here)
        return fused if out_dtype is None or fused.dtype == out_dtype else fused.to(out_dtype)
    out = gate_rule.gate(y, act_rule.activation(z.to(y.dtype), act))
    return out if out_dtype is None else out.to(out_dtype)
