"""Which fused kernel serves which pair of rules: a dispatch table keyed by rule type.

Rules stay math (``rules/``): each defines its operation in torch. Where a fused kernel
computes the *same* math faster, it is listed here, keyed by the rule types it replaces,
with the conditions under which it applies (the kernel's own limits: shapes, dtypes,
devices). :func:`fused_gate` is the only entry point today; a rule type without an entry
runs its torch definition.

The table is filled on first use (importing ``rules`` here at import time would be
circular: the rules import :mod:`captum_mambalrp.kernels` for ``fused_kernels_enabled``).
"""

from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple

from torch import Tensor

from . import fused_kernels_enabled

#: ``(gate rule type, activation rule type) -> (applies(gate_rule, act_rule, y, z, act), kernel(y, z, transposed_out))``
GateEntry = Tuple[Callable[..., bool], Callable[[Tensor, Tensor, bool], Tensor]]
GATE_KERNELS: Dict[Tuple[type, type], GateEntry] = {}


def _half_silu_applies(gate_rule: object, act_rule: object, y: Tensor, z: Tensor, act: Callable[[Tensor], Tensor]) -> bool:
    from ..rules.activation import is_silu

    return (
        getattr(act_rule, "epsilon", None) is None
        and is_silu(act)
        and y.dim() == 3
        and y.shape == z.shape
        and y.dtype == z.dtype
        and fused_kernels_enabled(y, z)
    )


def _half_silu_kernel(y: Tensor, z: Tensor, transposed_out: bool) -> Tensor:
    from . import elementwise

    return elementwise.half_silu_gate(y, z, transposed_out)


def _fill() -> None:
    if GATE_KERNELS:
        return
    from ..rules.activation import IdentityActivationRule
    from ..rules.gate import HalfGateRule

    # MambaLRP's default pair: half rule on the product, identity rule on the SiLU
    GATE_KERNELS[(HalfGateRule, IdentityActivationRule)] = (_half_silu_applies, _half_silu_kernel)


def fused_gate(
    gate_rule: object, act_rule: object, y: Tensor, z: Tensor, act: Callable[[Tensor], Tensor], transposed_out: bool = False
) -> Optional[Tensor]:
    """``gate_rule.gate(y, act_rule.activation(z, act))`` by a fused kernel, or ``None`` when
    no kernel is listed for these exact rule types (subclasses excluded: they may change the
    math) or its conditions do not hold here.

    Returns:
        the gated tensor (``[b, r, c]``; ``transposed_out``: stored ``[b, c, r]``-contiguous),
        or ``None`` (the caller runs the rules' torch definitions).

    >>> import torch
    >>> from captum_mambalrp.rules import GradientRule
    >>> fused_gate(GradientRule(), GradientRule(), torch.ones(1, 2, 2), torch.ones(1, 2, 2), torch.nn.functional.silu) is None
    True
    """
    _fill()
    entry = GATE_KERNELS.get((type(gate_rule), type(act_rule)))
    if entry is None or not entry[0](gate_rule, act_rule, y, z, act):
        return None
    return entry[1](y, z, transposed_out)
