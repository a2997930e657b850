"""Rule for the routing of a mixture-of-experts layer."""

from __future__ import annotations

from torch import Tensor

from .base import ROUTER, MambaRule


class ConstantRouterRule(MambaRule):
    """Routing weights and the top-k choice are constants for relevance.

    A mixture-of-experts layer computes ``y = sum_{e in topk(x)} w_e(x) E_e(x)`` (plus shared
    experts). With the choice ``topk(x)`` (never differentiable) and the weights ``w_e(x)``
    detached, ``y`` is a fixed weighted sum of the selected experts' outputs, so relevance
    flows through the experts only, ``R_{E_e} = w_e E_e R_y / y``, and is conserved (the
    expert MLPs get their own rules). This mirrors MambaLRP's treatment of the scan
    parameters (input-dependent, constant for relevance). (LXT's Qwen3-MoE patch instead
    applies the uniform rule to ``w_e * E_e``, sending half of the relevance into the router;
    ``GradientRule`` here keeps the routing weights' plain gradient.)
    """

    kinds = frozenset({ROUTER})

    def routing(self, weights: Tensor) -> Tensor:
        return weights.detach()
