"""Identity rule for element-wise activations (SiLU in Mamba)."""

from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch
from torch import Tensor

from ..kernels.dispatch import fused_activation
from .base import ACTIVATION, MambaRule, stabilize

SILU_CLASSES = ("SiLU", "SiLUActivation")  # torch's and transformers' (ACT2FN["silu"])
RELU2_CLASSES = ("ReLUSquaredActivation",)  # transformers' ACT2FN["relu2"] (Nemotron-H's MLPs)


def is_silu(fn: Callable[[Tensor], Tensor]) -> bool:
    """``F.silu``, an ``nn.SiLU`` / transformers ``SiLUActivation`` module, or its bound ``forward``."""
    owner = getattr(fn, "__self__", fn)
    return (
        fn is torch.nn.functional.silu
        or isinstance(owner, torch.nn.SiLU)
        or (isinstance(owner, torch.nn.Module) and type(owner).__name__ in SILU_CLASSES)
    )


def is_relu_squared(fn: Callable[[Tensor], Tensor]) -> bool:
    """transformers' ``ReLUSquaredActivation`` module (``relu(x)^2``) or its bound ``forward``."""
    owner = getattr(fn, "__self__", fn)
    return isinstance(owner, torch.nn.Module) and type(owner).__name__ in RELU2_CLASSES


class IdentityActivationRule(MambaRule):
    """Relevance passes an element-wise activation unchanged: ``R_in = R_out``.

    ``a = f(x)`` is rewritten so that its gradient is ``f(x) / x``. For SiLU with
    ``epsilon=None`` (the default) this is ``x * sigmoid(x).detach()`` exactly: exactly
    conservative. With an ``epsilon`` (and always for other activations) it is the
    reference implementation's form ``x_s * (f(x) / x_s).detach()`` with the stabilised
    ``x_s = x + epsilon * sign(x)``, which loses the share ``epsilon / (|x| + epsilon)``.
    ``IdentityActivationRule(epsilon=1e-6)`` reproduces the authors' code bit for bit.
    Squared ReLU (Nemotron-H's MLPs) is ``x * relu(x)``: with ``epsilon=None`` it is rewritten
    as ``x * relu(x).detach()``, the identity rule without a stabiliser (exactly conservative),
    the whole activation treated as one element-wise map (as LXT's ``mlp_forward`` does).
    (AttnLRP, Eq. 9: ``R_in = R_out`` for element-wise non-linearities.)
    """

    kinds = frozenset({ACTIVATION})

    def __init__(self, epsilon: Optional[float] = None) -> None:
        self.epsilon = epsilon

    def activation(self, x: Tensor, fn: Callable[[Tensor], Tensor]) -> Tensor:
        if self.epsilon is None and is_silu(fn):
            return x * torch.sigmoid(x).detach()
        if self.epsilon is None and is_relu_squared(fn):
            return x * torch.relu(x).detach()
        out = fn(x)
        x_s = stabilize(x, 1e-6 if self.epsilon is None else self.epsilon)
        return x_s * (out / x_s).detach()


def activation_in(rule: MambaRule, x: Tensor, fn: Callable[[Tensor], Tensor], dtype: torch.dtype) -> Tensor:
    """``rule.activation(x.to(dtype), fn)``: an activation computed in ``dtype`` (the compute
    dtype) on an input that may be of a lower precision (a bf16 model's conv output). Where a
    fused kernel computes the same from ``x`` as it is (``kernels.dispatch.ACTIVATION_KERNELS``;
    on CUDA, the identity rule on SiLU), it runs instead and keeps ``x`` for the backward pass,
    not a factor in ``dtype`` (half the bytes for bf16, and none when ``x`` is kept anyway, as a
    conv output is by the conv's LRP-epsilon rule)."""
    fused = fused_activation(rule, x, is_silu(fn), dtype)
    if fused is not None:
        return fused[0]
    return rule.activation(x.to(dtype), fn)


def activation_in_and_rounded(
    rule: MambaRule, x: Tensor, fn: Callable[[Tensor], Tensor], dtype: torch.dtype, low: torch.dtype
) -> Tuple[Tensor, Tensor]:
    """:func:`activation_in` and its result cast to ``low`` (both differentiable): the compute
    dtype's activation a scan reads and the copy a bf16 model's next layer reads. A fused kernel
    writes both in one pass (no read of the float32 result for the cast); ``low == dtype``: the
    result itself, twice, as ``.to`` returns it."""
    if low == dtype:
        out = activation_in(rule, x, fn, dtype)
        return out, out
    fused = fused_activation(rule, x, is_silu(fn), dtype, low)
    if fused is not None and fused[1] is not None:
        return fused[0], fused[1]
    out = rule.activation(x.to(dtype), fn) if fused is None else fused[0]
    return out, out.to(low)
