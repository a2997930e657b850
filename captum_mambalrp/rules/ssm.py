"""Rule for the selective state space model (the scan)."""

from __future__ import annotations

from typing import Iterable, Tuple

from torch import Tensor

from .base import SSM, MambaRule

PARAMETERS = ("delta", "B", "C")  # the input-dependent scan parameters


class ConstantSSMRule(MambaRule):
    """The input-dependent scan parameters are constants for relevance.

    With ``h_t = exp(delta_t A) h_{t-1} + delta_t B_t x_t`` and ``y_t = C_t h_t + D x_t``,
    detaching delta, A, B and C makes ``y`` linear in ``x``: ``y = M x`` with a fixed
    matrix ``M``, so ``sum_s x_s dy_t/dx_s = y_t`` and relevance is conserved
    (``D x`` included). The scan then needs the gradient with respect to ``x`` only,
    which the fast relevance scans exploit. This is MambaLRP's SSM rule (Jafari et al. 2024),
    the same idea as CP-LRP's constant attention weights (:class:`ConstantAttentionRule`).

    Args:
        constants: which of ``"delta"``, ``"B"``, ``"C"`` are held constant (default: all
            three, the rule of the paper). With fewer, the others pass relevance through
            their gradient, as without the rule (``"no_ssm_rule"``): an ablation of one piece
            (the composites ``"no_ssm_rule_delta"``, ``"no_ssm_rule_b"``, ``"no_ssm_rule_c"``),
            which no longer conserves. A is a parameter and always constant. For Mamba3,
            delta is its decay step and B, C its key and query.

    >>> ConstantSSMRule(["delta", "C"])
    ConstantSSMRule(constants=('delta', 'C'))
    """

    kinds = frozenset({SSM})

    def __init__(self, constants: Iterable[str] = PARAMETERS) -> None:
        held = set(constants)
        unknown = sorted(held - set(PARAMETERS))
        if unknown:
            raise ValueError(f"ConstantSSMRule: unknown scan parameters {unknown}; choose among {list(PARAMETERS)}")
        self._constants = tuple(p for p in PARAMETERS if p in held)

    @property
    def constants(self) -> Tuple[str, ...]:
        """The scan parameters held constant, in the order delta, B, C."""
        return self._constants

    def ssm_constants(self, delta: Tensor, A: Tensor, B: Tensor, C: Tensor) -> Tuple[Tensor, ...]:
        held = self._constants
        delta, B, C = (t.detach() if name in held else t for name, t in zip(PARAMETERS, (delta, B, C)))
        return delta, A.detach(), B, C

    @property
    def ssm_is_linear(self) -> bool:
        return len(self._constants) == len(PARAMETERS)

    def __repr__(self) -> str:
        return "ConstantSSMRule()" if self.ssm_is_linear else f"ConstantSSMRule(constants={self._constants!r})"


def takes_raw_step(rule: object) -> bool:
    """Does ``rule`` hold the scan parameters with :class:`ConstantSSMRule`'s own
    ``ssm_constants``, which only detaches them and never reads their values? Mamba1's step may
    then reach it raw (``dt_proj``'s product, before its bias and softplus), and the scan computes
    the step itself (mamba-ssm's kernel with ``delta_softplus``: no float32 step tensor is made);
    any other rule (a subclass overriding it, a probe that records the parameters) gets the step.

    >>> takes_raw_step(ConstantSSMRule()), takes_raw_step(object())
    (True, False)
    """
    return getattr(type(rule), "ssm_constants", None) is ConstantSSMRule.ssm_constants
