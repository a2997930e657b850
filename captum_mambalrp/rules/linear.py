"""LRP rules for linear layers and the depthwise causal convolution.

Both rules subclass Captum's own rule of the same name, so code that checks for
``captum.attr._utils.lrp_rules.EpsilonRule`` or ``GammaRule`` accepts them too.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from captum.attr._utils.lrp_rules import EpsilonRule as CaptumEpsilonRule
from captum.attr._utils.lrp_rules import GammaRule as CaptumGammaRule
from torch import Tensor, nn

from ..kernels import fused_kernels_enabled
from ..scan.precision import compute_dtype
from .base import CONV, LINEAR, MambaRule, stabilize, with_gradient_of


def affine(module: nn.Module, x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """``module``'s own affine map (``nn.Linear`` or ``nn.Conv1d``) with other parameters."""
    if isinstance(module, nn.Linear):
        return F.linear(x, weight, bias)
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        return module._conv_forward(x, weight, bias)
    raise TypeError(f"{type(module).__name__} is neither nn.Linear nor nn.Conv1d / nn.Conv2d")


#: LRP-epsilon's default stabiliser (Captum's), in float32 terms: see :func:`default_epsilon`.
DEFAULT_EPSILON = 1e-9


def default_epsilon(dtype: torch.dtype) -> float:
    """The default stabiliser for a computation in ``dtype``: ``1e-9`` in float32 (and for
    bf16/fp16 models, whose rule factors are computed in float32), scaled with the unit
    roundoff in float64 (``1e-9 * eps64 / eps32``, about ``1.9e-18``), so that it stays below the
    dtype's resolution and a float64 model conserves relevance to float64 rounding.

    >>> default_epsilon(torch.float32)
    1e-09
    """
    scale = torch.finfo(compute_dtype(dtype)).eps / torch.finfo(torch.float32).eps
    return DEFAULT_EPSILON * scale


class EpsilonRule(MambaRule, CaptumEpsilonRule):
    """LRP-epsilon: ``R_i = sum_j x_i w_ij R_j / (z_j + epsilon * sign(z_j))`` (AttnLRP, Eq. 8).

    As modified gradient: the gradient reaching ``z`` is scaled by
    ``z / (z + epsilon * sign(z))`` (a constant), then flows through ``W`` as usual.
    With a tiny ``epsilon`` this is Gradient x Input; a bias ``b_j`` absorbs the share
    ``b_j / z_j`` of ``R_j``. The default (``epsilon=None``) is Captum's ``1e-9`` in float32,
    scaled to float64's resolution for a float64 model (:func:`default_epsilon`); a given
    ``epsilon`` is used as it is in every dtype.
    """

    kinds = frozenset({LINEAR, CONV})
    linear_is_elementwise = True

    def __init__(self, epsilon: Optional[float] = None) -> None:
        CaptumEpsilonRule.__init__(self, DEFAULT_EPSILON if epsilon is None else epsilon)
        self._per_dtype = epsilon is None

    @property
    def epsilon(self) -> float:
        return self.STABILITY_FACTOR

    def linear(self, module: nn.Module, x: Tensor, z: Tensor) -> Tensor:
        per_dtype = getattr(self, "_per_dtype", False) and self.STABILITY_FACTOR == DEFAULT_EPSILON
        return _EpsilonScale.apply(z, default_epsilon(z.dtype) if per_dtype else self.STABILITY_FACTOR)

    def __repr__(self) -> str:
        return f"EpsilonRule(epsilon={self.STABILITY_FACTOR!r})"


def epsilon_scaled(grad: Tensor, z: Tensor, epsilon: float) -> Tensor:
    """``grad * |z| / (|z| + epsilon)``: ``grad`` times LRP-epsilon's factor
    ``z / (z + epsilon * sign(z))`` (``sign(0) := 1``), written without the sign, returned in
    ``grad``'s dtype. On CUDA one fused kernel (``kernels.elementwise``), elsewhere these
    operations; both compute a bf16 / fp16 factor in float32, where the default ``epsilon`` (1e-9)
    exists (fp16 rounds it to zero: ``0 / 0`` at an output that is exactly zero, a padded token's).

    >>> epsilon_scaled(torch.ones(2).half(), torch.tensor([0.0, 2.0]).half(), 1e-9).tolist()
    [0.0, 1.0]
    """
    if grad.shape == z.shape and grad.dtype == z.dtype and fused_kernels_enabled(grad, z):
        from ..kernels import elementwise

        return elementwise.epsilon_scaled(grad, z, epsilon)
    cd = compute_dtype(z.dtype)  # float32 for bf16 / fp16 (the casts are no-ops otherwise)
    magnitude = z.abs().to(cd)
    return (grad.to(cd) * (magnitude / (magnitude + epsilon))).to(grad.dtype)


class _EpsilonScale(torch.autograd.Function):
    """Identity forward; backward scales the gradient by ``z / (z + eps sign z)``.

    It keeps only ``z`` itself (shared with whatever else keeps it), and computes the
    ratio in the backward pass: no extra tensor lives between forward and backward.
    """

    @staticmethod
    def forward(ctx, z: Tensor, epsilon: float) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(z)
        ctx.epsilon = epsilon
        return z.view_as(z)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        (z,) = ctx.saved_tensors
        return epsilon_scaled(grad, z, ctx.epsilon), None


class GammaRule(MambaRule, CaptumGammaRule):
    """LRP-gamma: contributions of the output's sign are favoured by ``gamma``.

    With ``W+ = W + gamma * max(W, 0)``, ``W- = W + gamma * min(W, 0)`` and
    ``x = x+ + x-`` split by sign,
    ``z+ = W+ x+ + W- x- (+ b + gamma b+)`` and ``z- = W- x+ + W+ x- (+ b + gamma b-)``;
    ``zp = z+`` where ``z > 0`` else ``z-``, and
    ``R_i = sum_j x_i (d zp_j / d x_i) R_j / zp_j``. ``gamma = 0`` is LRP-0 (Montavon et al.,
    *Layer-wise relevance propagation: an overview*, 2019, the LRP-gamma rule).
    """

    kinds = frozenset({LINEAR, CONV})

    def __init__(self, gamma: float = 0.25, set_bias_to_zero: bool = False, epsilon: float = 1e-9) -> None:
        CaptumGammaRule.__init__(self, gamma, set_bias_to_zero)
        self.epsilon = epsilon

    def linear(self, module: nn.Module, x: Tensor, z: Tensor) -> Tensor:
        weight: Tensor = getattr(module, "weight")  # noqa: B009  (nn.Module's attributes are typed Tensor | Module)
        bias = None if self.set_bias_to_zero else getattr(module, "bias", None)
        w_pos = weight + self.gamma * weight.clamp(min=0)
        w_neg = weight + self.gamma * weight.clamp(max=0)
        b_pos = b_neg = None
        if bias is not None:
            b_pos = bias + self.gamma * bias.clamp(min=0)
            b_neg = bias + self.gamma * bias.clamp(max=0)
        x_pos, x_neg = x.clamp(min=0), x.clamp(max=0)
        z_up = affine(module, x_pos, w_pos, b_pos) + affine(module, x_neg, w_neg, None)
        z_down = affine(module, x_pos, w_neg, b_neg) + affine(module, x_neg, w_pos, None)
        zp = torch.where(z > 0, z_up, z_down)
        # the ratio of a bf16 / fp16 layer in float32, where epsilon exists (fp16 rounds 1e-9 to zero)
        cd = compute_dtype(z.dtype)
        ratio = (z.detach().to(cd) / stabilize(zp.detach().to(cd), self.epsilon)).to(z.dtype)
        return with_gradient_of(z, zp * ratio)
