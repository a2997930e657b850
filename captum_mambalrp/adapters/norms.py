"""Takeover of normalisation layers: RMSNorm variants and LayerNorm."""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor, nn

from ..kernels.dispatch import fused_rms_norm
from ..rules.base import MambaRule
from ..scan.precision import compute_dtype

RMSNORM_CLASS_NAMES = {
    "MambaRMSNorm",
    "FalconMambaRMSNorm",
    "LlamaRMSNorm",
    "RMSNorm",
    "Mamba2RMSNorm",
    # transformers' transformers and hybrids: ``w * x * rsqrt(mean(x^2) + eps)`` each (forwards read in 5.24)
    "Qwen3RMSNorm",
    "Qwen3MoeRMSNorm",
    "JambaRMSNorm",
    "BambaRMSNorm",
    "FalconH1RMSNorm",
    "NemotronHRMSNorm",
    "GraniteMoeHybridRMSNorm",
    "Zamba2RMSNorm",
}


def norm_epsilon(module: nn.Module) -> Optional[float]:
    """The module's epsilon; ``None`` means torch's default (``finfo(dtype).eps``, as ``nn.RMSNorm``)."""
    for attr in ("variance_epsilon", "eps", "epsilon"):
        value = getattr(module, attr, None)
        if isinstance(value, (float, int)):
            return float(value)
    return None


def is_rmsnorm(module: nn.Module) -> bool:
    return isinstance(module, getattr(nn, "RMSNorm", ())) or (
        type(module).__name__ in RMSNORM_CLASS_NAMES and isinstance(getattr(module, "weight", None), torch.Tensor)
    )


def rms_norm(
    x: Tensor,
    weight: Optional[Tensor],
    eps: Optional[float],
    rule: MambaRule,
    bias: Optional[Tensor] = None,
    out_dtype: Optional[torch.dtype] = None,
) -> Tensor:
    """``w * x * rule.norm_scale(rsqrt(mean(x^2) + eps))`` in float32 (float64 for float64 ``x``),
    cast back to ``x``'s dtype before the weight; ``out_dtype``: the result cast to it. Where a
    fused kernel computes the same for ``rule`` (``kernels.dispatch.NORM_KERNELS``: the constant
    factor, on CUDA), it runs instead."""
    return grouped_rms_norm(x, weight, eps, x.shape[-1], rule, bias, out_dtype)


def grouped_rms_norm(
    x: Tensor,
    weight: Optional[Tensor],
    eps: Optional[float],
    group_size: int,
    rule: MambaRule,
    bias: Optional[Tensor] = None,
    out_dtype: Optional[torch.dtype] = None,
) -> Tensor:
    """RMSNorm over consecutive groups of ``group_size`` channels (Mamba2's grouped norm; one
    group: :func:`rms_norm`): ``w * x_g * rule.norm_scale(rsqrt(mean_g(x^2) + eps))``, one
    factor per group."""
    if eps is None:
        eps = torch.finfo(x.dtype).eps
    fused = fused_rms_norm(rule, x, weight, eps, group_size, bias, out_dtype)
    if fused is not None:
        return fused
    shape = x.shape
    grouped = x.reshape(*shape[:-1], shape[-1] // group_size, group_size)
    x32 = grouped.to(compute_dtype(x))
    scale = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    out = (x32 * rule.norm_scale(scale)).to(x.dtype).reshape(shape)
    if weight is not None:
        out = weight * out
    if bias is not None:
        out = out + bias
    return out if out_dtype is None else out.to(out_dtype)


def layer_norm(x: Tensor, module: nn.LayerNorm, rule: MambaRule) -> Tensor:
    """LayerNorm with the factor ``rsqrt(var + eps)`` passed through ``rule.norm_scale``."""
    x32 = x.to(compute_dtype(x))
    centred = x32 - x32.mean(-1, keepdim=True)
    scale = torch.rsqrt(centred.pow(2).mean(-1, keepdim=True) + module.eps)
    out = (centred * rule.norm_scale(scale)).to(x.dtype)
    if module.weight is not None:
        out = out * module.weight
    if module.bias is not None:
        out = out + module.bias
    return out


def norm_forward(module: nn.Module, rule: MambaRule) -> Callable[..., Tensor]:
    """A forward for ``module`` (RMSNorm or LayerNorm) that applies ``rule``."""
    if isinstance(module, nn.LayerNorm):
        return lambda x, *args, **kwargs: layer_norm(x, module, rule)
    eps = norm_epsilon(module)
    return lambda x, *args, **kwargs: rms_norm(x, getattr(module, "weight", None), eps, rule, getattr(module, "bias", None))
