"""Which fused kernel serves which pair of rules: a dispatch table keyed by rule type.

Rules stay math (``rules/``): each defines its operation in torch. Where a fused kernel
computes the *same* math faster, it is listed here, keyed by the rule types it replaces
(their qualified names, so that this module never imports ``rules``, which imports it), with
the conditions under which it applies (the kernel's own limits: shapes, dtypes, devices).
Entry points: :func:`fused_gate`, :func:`fused_activation`, :func:`fused_rms_norm`; rule
types without an entry run the rules' torch definitions. ``tests/test_scan_backends.py``
checks that every key names a rule class.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Dict, Optional, Tuple

import torch
from torch import Tensor, nn

from . import fused_kernels_enabled

#: ``applies(act_rule, y, z, act_is_silu)`` and ``kernel(y, z, transposed_out, out_dtype)``
GateEntry = Tuple[Callable[[object, Tensor, Tensor, bool], bool], Callable[[Tensor, Tensor, bool, Optional[torch.dtype]], Tensor]]


def rule_key(rule: object) -> str:
    """A rule's type as the table keys it: ``"module.QualName"`` (exact type: a subclass,
    which may change the math, has its own name)."""
    return f"{type(rule).__module__}.{type(rule).__qualname__}"


LOW_PRECISION = (torch.bfloat16, torch.float16)


def _half_silu_applies(act_rule: object, y: Tensor, z: Tensor, act_is_silu: bool) -> bool:
    return (
        getattr(act_rule, "epsilon", None) is None
        and act_is_silu
        and y.dim() == 3
        and y.shape == z.shape
        and (y.dtype == z.dtype or (y.dtype == torch.float32 and z.dtype in LOW_PRECISION))
        and fused_kernels_enabled(y, z)
    )


def _half_silu_kernel(y: Tensor, z: Tensor, transposed_out: bool, out_dtype: Optional[torch.dtype]) -> Tensor:
    from . import elementwise

    return elementwise.half_silu_gate(y, z, transposed_out, out_dtype)


#: ``(gate rule type, activation rule type) -> (applies, kernel)``
GATE_KERNELS: Dict[Tuple[str, str], GateEntry] = {
    # MambaLRP's default pair: half rule on the product, identity rule on the SiLU
    ("captum_mambalrp.rules.gate.HalfGateRule", "captum_mambalrp.rules.activation.IdentityActivationRule"): (
        _half_silu_applies,
        _half_silu_kernel,
    ),
}


#: ``applies(act_rule, conv, act_is_silu, dtype)`` and ``kernel(conv, start, length, d_x, dtype, mask)``
SplitActivationEntry = Tuple[
    Callable[[object, Tensor, bool, torch.dtype], bool],
    Callable[[Tensor, int, int, int, torch.dtype, Optional[Tensor]], Tuple[Tensor, Tensor]],
]
#: ``applies(act_rule, x, act_is_silu, dtype)`` and ``kernel(x, dtype, low)``: the result in ``dtype``
#: and, for a ``low`` dtype, the same values rounded to it (else None), written by one pass
ActivationEntry = Tuple[
    Callable[[object, Tensor, bool, torch.dtype], bool],
    Callable[[Tensor, torch.dtype, Optional[torch.dtype]], Tuple[Tensor, Optional[Tensor]]],
]


def _identity_silu_upcast_applies(act_rule: object, x: Tensor, act_is_silu: bool, dtype: torch.dtype) -> bool:
    return (
        getattr(act_rule, "epsilon", None) is None
        and act_is_silu
        and x.dim() == 3
        and x.dtype in (torch.float32, *LOW_PRECISION)
        and dtype == torch.float32
        and fused_kernels_enabled(x)
    )


def _identity_silu_upcast_kernel(x: Tensor, dtype: torch.dtype, low: Optional[torch.dtype]) -> Tuple[Tensor, Optional[Tensor]]:
    from . import elementwise

    if low is None:
        return elementwise.identity_silu_upcast(x, dtype), None
    return elementwise.identity_silu_upcast_pair(x, dtype, low)


#: ``activation rule type -> (applies, kernel)``: the rule on ``act(x.to(dtype))`` from ``x`` as
#: it is (a mixer's conv output: bf16, or float32), keeping ``x`` for the backward pass
ACTIVATION_KERNELS: Dict[str, ActivationEntry] = {
    "captum_mambalrp.rules.activation.IdentityActivationRule": (_identity_silu_upcast_applies, _identity_silu_upcast_kernel),
}


def fused_activation(
    act_rule: object, x: Tensor, act_is_silu: bool, dtype: torch.dtype, low: Optional[torch.dtype] = None
) -> Optional[Tuple[Tensor, Optional[Tensor]]]:
    """``act_rule.activation(x.to(dtype), act)`` by a fused kernel, and with ``low`` its copy
    rounded to ``low`` from the same pass (else None in its place); ``None`` when no kernel is
    listed for this rule type or its conditions do not hold here.

    >>> from captum_mambalrp.rules import GradientRule
    >>> fused_activation(GradientRule(), torch.ones(1, 2, 2).bfloat16(), True, torch.float32) is None
    True
    """
    entry = ACTIVATION_KERNELS.get(rule_key(act_rule))
    if entry is None or not entry[0](act_rule, x, act_is_silu, dtype):
        return None
    return entry[1](x, dtype, low)


#: the environment variable that turns off (``"0"``) :func:`fused_split_activation`'s kernel alone
SPLIT_KERNEL_ENV = "CAPTUM_MAMBALRP_SPLIT_KERNEL"


def _identity_silu_split_applies(act_rule: object, conv: Tensor, act_is_silu: bool, dtype: torch.dtype) -> bool:
    return (
        os.environ.get(SPLIT_KERNEL_ENV, "1") != "0"
        and getattr(act_rule, "epsilon", None) is None
        and act_is_silu
        and conv.dim() == 3
        and conv.dtype in (torch.float32, *LOW_PRECISION)
        and dtype == torch.float32
        and fused_kernels_enabled(conv)
    )


def _identity_silu_split_kernel(
    conv: Tensor, start: int, length: int, d_x: int, dtype: torch.dtype, mask: Optional[Tensor]
) -> Tuple[Tensor, Tensor]:
    from . import elementwise

    return elementwise.identity_silu_split(conv, start, length, d_x, dtype, mask)


#: ``activation rule type -> (applies, kernel)``: the rule on the activation of a Mamba2 mixer's conv
#: output, with the slice, transpose and split into x and the SSM rule's constants that follow it
SPLIT_ACTIVATION_KERNELS: Dict[str, SplitActivationEntry] = {
    "captum_mambalrp.rules.activation.IdentityActivationRule": (_identity_silu_split_applies, _identity_silu_split_kernel),
}


def fused_split_activation(
    act_rule: object,
    conv: Tensor,
    start: int,
    length: int,
    d_x: int,
    act_is_silu: bool,
    dtype: torch.dtype,
    mask: Optional[Tensor] = None,
) -> Optional[Tuple[Tensor, Tensor]]:
    """``act_rule.activation(conv[:, :, start:start + length].to(dtype), act)`` transposed to ``[b,
    length, channels]``, times the padding mask ``[b, length]`` where one is given, and split at
    ``d_x`` into ``x`` and the other channels (which must be constants for the caller: they carry no
    gradient), by a fused kernel; or ``None`` when no kernel is listed for this rule type or its
    conditions do not hold here (the caller runs the torch steps).

    >>> from captum_mambalrp.rules import GradientRule
    >>> fused_split_activation(GradientRule(), torch.ones(1, 4, 5), 0, 5, 2, True, torch.float32) is None
    True
    """
    entry = SPLIT_ACTIVATION_KERNELS.get(rule_key(act_rule))
    if entry is None or not entry[0](act_rule, conv, act_is_silu, dtype):
        return None
    return entry[1](conv, start, length, d_x, dtype, mask)


def fused_gate(
    gate_rule: object,
    act_rule: object,
    y: Tensor,
    z: Tensor,
    act_is_silu: bool,
    transposed_out: bool = False,
    out_dtype: Optional[torch.dtype] = None,
) -> Optional[Tensor]:
    """``gate_rule.gate(y, act_rule.activation(z, act))`` by a fused kernel, or ``None`` when
    no kernel is listed for these exact rule types or its conditions do not hold here
    (``act_is_silu``: the activation is SiLU, as the caller's rules tell).

    Returns:
        the gated tensor (``[b, r, c]``; ``transposed_out``: stored ``[b, c, r]``-contiguous; in
        ``out_dtype``, default ``y``'s), or ``None`` (the caller runs the rules' torch definitions).

    >>> import torch
    >>> from captum_mambalrp.rules import GradientRule
    >>> fused_gate(GradientRule(), GradientRule(), torch.ones(1, 2, 2), torch.ones(1, 2, 2), True) is None
    True
    """
    entry = GATE_KERNELS.get((rule_key(gate_rule), rule_key(act_rule)))
    if entry is None or not entry[0](act_rule, y, z, act_is_silu):
        return None
    return entry[1](y, z, transposed_out, out_dtype)


#: ``applies(x, weight, bias, group_size)`` and ``kernel(x, weight, eps, group_size, out_dtype)``
NormEntry = Tuple[
    Callable[[Tensor, Optional[Tensor], Optional[Tensor], int], bool],
    Callable[[Tensor, Optional[Tensor], float, int, Optional[torch.dtype]], Tensor],
]


#: the fewest elements of ``x`` for which the norm kernel runs. A Triton launch costs about 0.1 ms
#: of host time, more than torch's handful of element-wise launches; where a pass is bound by its
#: launches (Mamba2-2.7B shape, bf16, 4096 tokens: 58 ms of host time against 20 ms of GPU time
#: for 8 layers) the kernel made it 5.9 ms slower; bound by the GPU, Falcon-Mamba-7B's 8 layers at
#: 4096 tokens gained 1.9 ms from it (docs/benchmarks_history.md, run 6). 2^24: Falcon-Mamba-7B's block norm
#: at 4096 tokens (4096 x 4096) runs it, Mamba2-2.7B's (4096 x 2560) does not.
NORM_KERNEL_MIN_ELEMENTS = 1 << 24


def _constant_rms_applies(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], group_size: int) -> bool:
    return (
        bias is None
        and x.numel() >= NORM_KERNEL_MIN_ELEMENTS
        and x.dim() >= 2
        and x.shape[-1] % group_size == 0
        and (weight is None or (weight.shape == x.shape[-1:] and not weight.requires_grad and fused_kernels_enabled(weight)))
        and fused_kernels_enabled(x)
    )


def _constant_rms_kernel(
    x: Tensor, weight: Optional[Tensor], eps: float, group_size: int, out_dtype: Optional[torch.dtype]
) -> Tensor:
    from . import norm

    return norm.constant_rms_norm(x, weight, eps, group_size, out_dtype)


#: ``norm rule type -> (applies, kernel)``: RMSNorm (grouped or not) with the rule's factor
NORM_KERNELS: Dict[str, NormEntry] = {
    "captum_mambalrp.rules.norm.ConstantNormRule": (_constant_rms_applies, _constant_rms_kernel),
}


def fused_rms_norm(
    rule: object,
    x: Tensor,
    weight: Optional[Tensor],
    eps: float,
    group_size: int,
    bias: Optional[Tensor] = None,
    out_dtype: Optional[torch.dtype] = None,
) -> Optional[Tensor]:
    """``rms_norm`` (``adapters/norms.py``) under ``rule`` by a fused kernel, or ``None`` when no
    kernel is listed for this rule type or its conditions do not hold here.

    >>> from captum_mambalrp.rules import ConstantNormRule
    >>> fused_rms_norm(ConstantNormRule(), torch.ones(2, 4), None, 1e-6, 4) is None  # a CPU tensor
    True
    """
    entry = NORM_KERNELS.get(rule_key(rule))
    if entry is None or not entry[0](x, weight, bias, group_size):
        return None
    return entry[1](x, weight, eps, group_size, out_dtype)


#: the environment variable that turns the depthwise conv kernel off ("0"; on by default)
CONV_KERNEL_ENV = "CAPTUM_MAMBALRP_CONV_KERNEL"


def conv_applies(module: nn.Module, x: Tensor) -> bool:
    """May ``kernels.conv`` compute ``module(x)``? A depthwise ``nn.Conv1d`` with causal padding
    (``K - 1``, zeros), stride and dilation 1, constant weight and bias, on a 3-d input of its
    dtype where the fused kernels run (CUDA, or Triton's interpreter; ``CAPTUM_MAMBALRP_FUSED``),
    unless ``CAPTUM_MAMBALRP_CONV_KERNEL=0`` is in the environment (torch's convolution then; on the
    H200 the kernel took a Falcon-Mamba-7B pass from 3.15x to 2.68x the forward, run 5 of
    docs/benchmarks_history.md).

    >>> import torch
    >>> conv = torch.nn.Conv1d(4, 4, 4, groups=4, padding=3).requires_grad_(False)
    >>> conv_applies(conv, torch.ones(1, 4, 5))  # a CPU tensor, outside the interpreter
    False
    """
    if os.environ.get(CONV_KERNEL_ENV, "1") == "0" or not isinstance(module, nn.Conv1d) or x.dim() != 3:
        return False
    d, k, bias = module.in_channels, module.kernel_size[0], module.bias
    return (
        module.groups == d == module.out_channels == x.shape[1]
        and module.stride == (1,)
        and module.dilation == (1,)
        and module.padding == (k - 1,)
        and module.padding_mode == "zeros"
        and x.dtype == module.weight.dtype
        and not module.weight.requires_grad
        and (bias is None or not bias.requires_grad)
        and fused_kernels_enabled(x, module.weight)
    )


#: the environment variable that sets the dtype of a bf16 / fp16 mixer conv's output: ``compute``
#: (the default: float32) or ``model`` (the input's dtype, as the module computes it)
CONV_OUTPUT_ENV = "CAPTUM_MAMBALRP_CONV_OUTPUT"
CONV_OUTPUT_DEFAULT = "compute"


def conv_output_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of a mixer conv's output for an input of ``dtype``: float32 for bf16 / fp16 (the
    default, ``CAPTUM_MAMBALRP_CONV_OUTPUT=compute``), ``dtype`` itself otherwise and with
    ``CAPTUM_MAMBALRP_CONV_OUTPUT=model``. The models' fused kernels (causal-conv1d's conv with its
    SiLU, mamba-ssm's conv-and-scan) keep the conv's value in float32 for the activation that
    follows; rounding it to bf16 there is one rounding per layer more than that forward makes, and
    rounds the gradient the conv's rule receives. Measured (docs/benchmarks.md, "conv output in
    float32"): on the H200, bf16, three random models per shape, Falcon-Mamba-7B's explained score
    5x and its relevance 1.6x closer to the float64 truth (both now closer than transformers' own
    bf16 forward); Mamba2's logits closer, its relevance not (0.187 -> 0.192); 2-5 % more time, the conv output
    kept in float32 (2 more bytes per conv channel and token: Falcon-Mamba-7B, 1 MiB per token
    where the whole pass is kept); ``model`` is the faster, less precise choice.

    Raises:
        ValueError: the variable holds another value.

    >>> conv_output_dtype(torch.bfloat16), conv_output_dtype(torch.float64)
    (torch.float32, torch.float64)
    """
    value = os.environ.get(CONV_OUTPUT_ENV, CONV_OUTPUT_DEFAULT)
    if value not in ("model", "compute"):
        raise ValueError(f"{CONV_OUTPUT_ENV}={value!r}: set it to 'compute' (the default) or 'model'")
    return torch.float32 if value == "compute" and dtype in LOW_PRECISION else dtype


def conv_forward(module: nn.Conv1d, own_forward: Callable[..., Tensor], in_mixer: bool = False) -> Callable[..., Tensor]:
    """A forward for ``module`` (a mixer's depthwise conv) that computes its value by
    ``kernels.conv`` where :func:`conv_applies`, else by ``own_forward``; installed reversibly by
    the adapters' installation (``Patcher.replace_forward``), so the module's hooks (its LRP rule)
    still run.

    The output's dtype is the input's, but in a sequence mixer (``in_mixer``, whose callers take the
    activation in float32) :func:`conv_output_dtype`'s: float32 for a bf16 / fp16 input (summed in
    float32, not rounded; the input's dtype with ``CAPTUM_MAMBALRP_CONV_OUTPUT=model``).

    >>> conv = torch.nn.Conv1d(4, 4, 4, groups=4, padding=3).bfloat16().requires_grad_(False)
    >>> conv_forward(conv, conv.forward)(torch.randn(1, 4, 5).bfloat16()).dtype
    torch.bfloat16
    """

    def forward(x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        if args or kwargs:
            return own_forward(x, *args, **kwargs)
        out_dtype = conv_output_dtype(x.dtype) if in_mixer else x.dtype
        if conv_applies(module, x):
            from . import conv

            return conv.depthwise_causal_conv(module, x, out_dtype)
        weight, bias = module.weight, module.bias
        if out_dtype != x.dtype and weight.dtype == x.dtype and weight.device == x.device:
            return module._conv_forward(x.to(out_dtype), weight.to(out_dtype), None if bias is None else bias.to(out_dtype))
        return own_forward(x)

    return forward
