"""Identity rule for element-wise activations (SiLU in Mamba)."""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from .base import ACTIVATION, MambaRule, stabilize


def is_silu(fn: Callable[[Tensor], Tensor]) -> bool:
    """``F.silu``, an ``nn.SiLU`` module, or its bound ``forward``."""
    owner = getattr(fn, "__self__", fn)
    return fn is torch.nn.functional.silu or isinstance(owner, torch.nn.SiLU)


class IdentityActivationRule(MambaRule):
    """Relevance passes an element-wise activation unchanged: ``R_in = R_out``.

    With ``a = f(x)`` the rule is ``a = x * (f(x) / x).detach()``; for SiLU this is
    ``x * sigmoid(x).detach()`` exactly (no division). Other activations divide by a
    stabilised ``x`` (``x + epsilon * sign(x)``).
    """

    kinds = frozenset({ACTIVATION})

    def __init__(self, epsilon: float = 1e-6) -> None:
        self.epsilon = epsilon

    def activation(self, x: Tensor, fn: Callable[[Tensor], Tensor]) -> Tensor:
        if is_silu(fn):
            return x * torch.sigmoid(x).detach()
        out = fn(x)
        return x * (out / stabilize(x, self.epsilon)).detach()
