"""Mamba2 mixers (transformers' ``Mamba2Mixer``; mamba-ssm's ``Mamba2``): one computation.

For ``hidden [b, l, d_model]``, with ``h`` heads of size ``p``, ``g`` groups, state ``n``::

    z0, x0, z, xBC, dt = split(in_proj(hidden))       # z0, x0: mamba-ssm's optional gated MLP
    xBC     = silu(conv1d(xBC)[..., :l])                # depthwise causal conv over x, B and C
    x, B, C = split(xBC)                                # x [b, l, h, p]; B, C [b, l, g, n]
    dt      = clamp(softplus(dt + dt_bias), *dt_limit)  # [b, l, h]
    y       = SSD(x; dt, A = -exp(A_log), B, C) + D x   # the scan (scan.ssd_scan)
    y       = w * norm_g(y * silu(z))                   # gated grouped RMSNorm (norm before gate: False)
            | w * norm_g(y) * silu(z)                   #   (norm before gate: True)
            | y * silu(z)                               #   (no norm)
    y       = cat(x0 * silu(z0), y)                     # only with the gated MLP part
    out     = out_proj(y)

MambaLRP's rules: the SiLU after the conv and the SiLU on ``z`` pass relevance unchanged
(``conv_act``, ``gate_act``); ``dt`` (after bias, softplus and clamp), ``A``, ``B``, ``C`` are
constants, so the scan is linear in ``x`` (``ssm``); each product ``y * silu(z)`` gives each
factor half (``gate``); the norm's factor ``rsqrt(mean_g(.^2) + eps)`` is a constant per group
(``norm``). :func:`mamba2_forward` is that computation; adapters only say where the parts are.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..kernels.dispatch import fused_split_activation
from ..rules.activation import activation_in, is_silu
from ..rules.base import NORM, GradientRule, MambaRule
from ..rules.composites import Composite
from ..rules.gate import gate_with_activation
from ..scan import compute_dtype, ssd_scan, ssd_scan_state
from .base import Component
from .common import MixerRules, mask_padding, mixer_rules, rules_as_components
from .norms import grouped_rms_norm


@dataclass
class GatedNorm:
    """The gated, grouped RMSNorm after the scan."""

    weight: Tensor
    eps: float
    group_size: int
    norm_before_gate: bool = False


@dataclass
class Mamba2Parts:
    """Where the parts of a Mamba2 mixer live, whatever the implementation."""

    in_proj: Callable[[Tensor], Tensor]
    conv1d: nn.Conv1d
    out_proj: nn.Module
    A_log: Tensor
    D: Tensor
    dt_bias: Tensor
    n_heads: int
    head_dim: int
    n_groups: int
    d_state: int
    act: Callable[[Tensor], Tensor]
    norm: Optional[GatedNorm]
    dt_limit: Tuple[float, float] = (0.0, math.inf)
    d_mlp: int = 0
    #: the gate's activation when it differs from the conv's (transformers gates with SiLU in its
    #: gated norm whatever ``hidden_act`` the conv uses); ``None``: ``act``
    gate_fn: Optional[Callable[[Tensor], Tensor]] = None

    @property
    def d_ssm(self) -> int:
        return self.n_heads * self.head_dim

    def scan_D(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """``D`` in ``dtype`` as ``ssd_scan`` takes it: ``[h]``, or ``[h, p]`` when it has one entry per channel."""
        D = self.D.to(dtype)
        return D if D.numel() == self.n_heads else D.reshape(self.n_heads, self.head_dim)


def gated_output(
    y: Tensor, z: Tensor, parts: Mamba2Parts, rules: MixerRules, norm_rule: MambaRule, out_dtype: Optional[torch.dtype] = None
) -> Tensor:
    """The gate ``y * silu(z)`` and the grouped norm around it, in the order the mixer uses
    (``gate_with_activation``: a fused kernel where one serves the rules; the norm likewise),
    returned in ``out_dtype`` (``None``: as computed)."""
    act, norm = parts.gate_fn or parts.act, parts.norm
    if norm is not None and norm.norm_before_gate:
        y = grouped_rms_norm(y, norm.weight, norm.eps, norm.group_size, norm_rule)
    out = gate_with_activation(rules.gate, rules.gate_act, y, z, act)
    if norm is not None and not norm.norm_before_gate:
        return grouped_rms_norm(out, norm.weight, norm.eps, norm.group_size, norm_rule, out_dtype=out_dtype)
    return out if out_dtype is None else out.to(out_dtype)


def mamba2_forward(
    parts: Mamba2Parts, rules: MixerRules, norm_rule: MambaRule, hidden: Tensor, attention_mask: Optional[Tensor] = None
) -> Tensor:
    """The Mamba2 mixer on ``hidden [b, l, d_model]`` with MambaLRP's rules applied."""
    return mamba2_piece(parts, rules, norm_rule, hidden, attention_mask)[0]


def mamba2_piece(
    parts: Mamba2Parts,
    rules: MixerRules,
    norm_rule: MambaRule,
    hidden: Tensor,
    attention_mask: Optional[Tensor] = None,
    state: Optional[Tuple[Tensor, Tensor]] = None,
    carry: bool = False,
) -> Tuple[Tensor, Optional[Tuple[Tensor, Tensor]]]:
    """:func:`mamba2_forward` on one piece of a sequence (``recompute="sequence"``): ``state`` =
    ``(conv [b, d_ssm + 2 g n, k-1], ssm [b, h, p, n])``, the conv's last inputs (model dtype) and
    the scan's state (compute dtype) that the previous piece left (``None``: the sequence starts
    here); with ``carry=True`` the piece returns its own for the next one, else ``None``."""
    batch, length, _ = hidden.shape
    dtype = hidden.dtype
    h, p, gn = parts.n_heads, parts.head_dim, parts.n_groups * parts.d_state
    zxbcdt = parts.in_proj(mask_padding(hidden, attention_mask))
    z0, x0, z, xBC, dt = torch.split(zxbcdt, [parts.d_mlp, parts.d_mlp, parts.d_ssm, parts.d_ssm + 2 * gn, h], dim=-1)
    # the compute dtype (float32; float64 for a float64 model) from the conv's output on: the scan,
    # dt and the rule factors (a bf16 model's activations are rounded once, where out_proj reads them)
    cd = compute_dtype(dtype)
    xBC_in = xBC.transpose(1, 2)
    start = 0
    if state is not None:  # the conv's window reaches k - 1 steps into the previous piece
        xBC_in = torch.cat([state[0], xBC_in], dim=-1)
        start = int(parts.conv1d.padding[0])
    conv = parts.conv1d(xBC_in)  # [b, d_ssm + 2 g n, steps]: the steps start .. start + length are the mixer's
    split = None
    if rules.ssm.ssm_is_linear:  # B and C are the SSM rule's constants
        split = fused_split_activation(rules.conv_act, conv, start, length, parts.d_ssm, is_silu(parts.act), cd, attention_mask)
    if split is not None:  # one kernel each way for the activation's rule, the slice, transpose and split
        x, BC = split
        B, C = BC.split([gn, gn], dim=-1)
    else:
        xBC = activation_in(rules.conv_act, conv[..., start : start + length], parts.act, cd)
        xBC = mask_padding(xBC.transpose(1, 2), attention_mask)
        x, B, C = torch.split(xBC, [parts.d_ssm, gn, gn], dim=-1)
    dt = F.softplus(dt.to(cd) + parts.dt_bias.to(cd)).clamp(parts.dt_limit[0], parts.dt_limit[1])
    A = -torch.exp(parts.A_log.to(cd))
    grouped = (batch, length, parts.n_groups, parts.d_state)
    dt, A, B, C = rules.ssm.ssm_constants(dt, A, B.reshape(grouped), C.reshape(grouped))
    scan_args = (x.reshape(batch, length, h, p), dt, A, B, C, parts.scan_D(cd))
    linear, backend = rules.ssm.ssm_is_linear, rules.backend
    new_state: Optional[Tuple[Tensor, Tensor]] = None
    if state is None and not carry:
        y = ssd_scan(*scan_args, linear=linear, backend=backend, model_dtype=dtype)
    else:
        h0 = None if state is None else state[1]
        y, h_last = ssd_scan_state(*scan_args, h0, linear=linear, backend=backend, model_dtype=dtype)
        if carry:
            k = int(parts.conv1d.kernel_size[0])
            if xBC_in.shape[-1] < k - 1:  # a piece shorter than the window: zeros before the start
                xBC_in = F.pad(xBC_in, (k - 1 - xBC_in.shape[-1], 0))
            new_state = (xBC_in[..., xBC_in.shape[-1] - (k - 1) :], h_last)
    # out_proj reads the model's dtype: the norm writes it (one rounding, as the cast after it)
    y = gated_output(y.reshape(batch, length, parts.d_ssm), z, parts, rules, norm_rule, None if parts.d_mlp else dtype)
    if parts.d_mlp:
        mlp = gate_with_activation(rules.gate, rules.gate_act, x0.to(cd), z0, parts.act)
        y = torch.cat([mlp, y], dim=-1)
    return parts.out_proj(y.to(dtype)), new_state


def mamba2_rules(
    name: str, act_module: nn.Module, norm_module: Optional[nn.Module], composite: Composite, backend: str
) -> Tuple[MixerRules, MambaRule, List[Component]]:
    """The rules of a Mamba2 mixer (those of Mamba1's components, plus ``<mixer>.norm``) and
    its component list."""
    rules = mixer_rules(name, act_module, composite, backend)
    norm_rule = composite.rule_for(f"{name}.norm", NORM, norm_module) if norm_module is not None else GradientRule()
    components = rules_as_components(name, rules)
    if norm_module is not None:
        components.append(Component(f"{name}.norm", NORM, norm_rule))
    return rules, norm_rule, components
