"""Rule for the selective state space model (the scan)."""

from __future__ import annotations

from typing import Tuple

from torch import Tensor

from .base import SSM, MambaRule


class ConstantSSMRule(MambaRule):
    """The input-dependent scan parameters are constants for relevance.

    With ``h_t = exp(delta_t A) h_{t-1} + delta_t B_t x_t`` and ``y_t = C_t h_t + D x_t``,
    detaching delta, A, B and C makes ``y`` linear in ``x``: ``y = M x`` with a fixed
    matrix ``M``, so ``sum_s x_s dy_t/dx_s = y_t`` and relevance is conserved
    (``D x`` included). The scan then needs the gradient with respect to ``x`` only,
    which the fast relevance scans exploit. This is MambaLRP's SSM rule (Jafari et al. 2024),
    the same idea as CP-LRP's constant attention weights (:class:`ConstantAttentionRule`).
    """

    kinds = frozenset({SSM})

    def ssm_constants(self, delta: Tensor, A: Tensor, B: Tensor, C: Tensor) -> Tuple[Tensor, ...]:
        return delta.detach(), A.detach(), B.detach(), C.detach()

    @property
    def ssm_is_linear(self) -> bool:
        return True
