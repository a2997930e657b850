"""Rules for softmax attention ``O = softmax(q k^T * s + M) v`` (transformers' attention layers).

Both rules act on the three operands and leave the attention itself to plain autograd, so
one implementation of attention (``adapters.attention.lrp_attention``) serves every rule:

- :class:`AttnLRPRule` (Achtibat et al., *AttnLRP*, ICML 2024), in the efficient form of
  LXT (``lxt/efficient/patches.py: wrap_attention_forward``): the uniform rule on each
  matrix product, the gradient (Gradient x Input) through the softmax;
- :class:`ConstantAttentionRule` (CP-LRP, Ali et al., *XAI for Transformers: Better
  Explanations through Conservative Propagation*, ICML 2022): the attention weights are
  constants, so the layer is linear in ``v`` and relevance is conserved exactly.
"""

from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor

from .base import ATTENTION, MambaRule


class _ScaleGradient(torch.autograd.Function):
    """Identity forward (the same values); backward multiplies the gradient by ``factor``."""

    @staticmethod
    def forward(ctx, x: Tensor, factor: float) -> Tensor:  # type: ignore[override]
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        return grad * ctx.factor, None


def scale_gradient(x: Tensor, factor: float) -> Tensor:
    """``x`` unchanged, with its gradient multiplied by ``factor`` (LXT's ``divide_gradient``
    with ``factor = 1 / divisor``).

    Returns:
        A tensor equal to ``x`` whose backward scales the incoming gradient.

    >>> x = torch.ones(2, requires_grad=True)
    >>> scale_gradient(x, 0.25).sum().backward(); x.grad.tolist()
    [0.25, 0.25]
    """
    return _ScaleGradient.apply(x, factor)


class AttnLRPRule(MambaRule):
    """AttnLRP on ``O = A v`` with ``A = softmax(q k^T * s + M)``.

    - The uniform rule on a product of two inputs (AttnLRP, Eq. 7 and Prop. 3.2; for a matrix
      product epsilon-LRP over its terms, then the uniform rule on each term, Prop. 3.3): each
      operand of ``o = a * b`` gets half, ``R_a = R_b = R_o / 2``; as modified gradient, the
      gradient reaching the product is halved.
    - The softmax (AttnLRP, Prop. 3.1: Taylor decomposition at ``x`` with its bias term) keeps
      its gradient: ``R_i = x_i (R_i^out - s_i sum_j R_j^out)`` for ``s = softmax(x)``, which is
      Gradient x Input; ``sum_i R_i`` differs from ``sum_j R_j^out`` by the expansion's bias
      term, which is not passed on (``return_convergence_delta`` reports it).
    - Applied to the two products of attention: ``v`` gets half of ``R_O``; the other half
      reaches ``A``, crosses the softmax and is split in half again by ``q k^T``, so ``q`` and
      ``k`` get a quarter each. As LXT does (``wrap_attention_forward``), the gradients of
      ``q``, ``k`` and ``v`` are multiplied by ``1/4``, ``1/4`` and ``1/2`` before plain
      autograd attention: the same products, since every later operation is linear in the
      gradient.

    RoPE, the scaling ``s`` and the additive mask ``M`` are linear maps or constants (the
    rotary ``cos``/``sin`` depend on positions only) and need no rule; GQA/MQA repeat the
    shared key/value heads (their gradients add up).
    """

    kinds = frozenset({ATTENTION})

    def attention(self, query: Tensor, key: Tensor, value: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        return scale_gradient(query, 0.25), scale_gradient(key, 0.25), scale_gradient(value, 0.5)


class ConstantAttentionRule(MambaRule):
    """CP-LRP: the attention weights ``A = softmax(q k^T * s + M)`` are constants.

    Detaching ``q`` and ``k`` (Ali et al. 2022, Sec. 3.2, as LXT's ``cp_wrap_attention_forward``)
    makes ``O = A v`` linear in ``v`` with a fixed matrix, ``R_v = sum_t A_{t.} v R_O / O``:
    the attention layer conserves relevance exactly, as MambaLRP's rule makes the selective
    scan linear in its input.
    """

    kinds = frozenset({ATTENTION})

    def attention(self, query: Tensor, key: Tensor, value: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        return query.detach(), key.detach(), value
