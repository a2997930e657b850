"""Mamba1 mixers (transformers Mamba and FalconMamba; mamba-ssm's ``Mamba``).

All of them compute, for ``hidden [b, l, h]``::

    x, z  = in_proj(hidden).chunk(2)                 # [b, d, l] each
    x     = silu(conv1d(x)[..., :l])                 # depthwise causal conv
    dt, B, C = split(x_proj(x))                      # (FalconMamba: RMS-normed)
    delta = softplus(dt_proj.weight @ dt + dt_proj.bias)
    y     = scan(x, delta, -exp(A_log), B, C, D) * silu(z)
    out   = out_proj(y)

:func:`mamba1_forward` is that computation with a rule at each step; the adapters
only say where the parts of each implementation live.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..rules.gate import gate_with_activation
from ..scan import compute_dtype, selective_scan
from .common import MixerRules, mask_padding


@dataclass
class Mamba1Parts:
    """Where the parts of a Mamba1 mixer live, whatever the implementation."""

    in_proj: nn.Linear
    conv1d: nn.Conv1d
    x_proj: nn.Linear
    dt_proj: nn.Linear
    out_proj: nn.Linear
    A_log: Tensor
    D: Tensor
    dt_rank: int
    d_state: int
    act: Callable[[Tensor], Tensor]
    dt_norm: Optional[Callable[[Tensor], Tensor]] = None
    B_norm: Optional[Callable[[Tensor], Tensor]] = None
    C_norm: Optional[Callable[[Tensor], Tensor]] = None
    #: the gate's activation when it differs from the conv's (transformers' hybrids gate with SiLU
    #: whatever ``hidden_act`` the conv uses); ``None``: ``act``
    gate_fn: Optional[Callable[[Tensor], Tensor]] = None


def mamba1_forward(parts: Mamba1Parts, rules: MixerRules, hidden: Tensor, attention_mask: Optional[Tensor] = None) -> Tensor:
    """The Mamba1 mixer on ``hidden [b, l, h]`` with MambaLRP's rules applied."""
    dtype, length = hidden.dtype, hidden.shape[1]
    xz = parts.in_proj(mask_padding(hidden, attention_mask)).transpose(1, 2)
    x, z = xz.chunk(2, dim=1)
    # the compute dtype (float32; float64 for a float64 model) from the conv's output on: the scan,
    # dt and the rule factors; a bf16 model's activations are rounded once, where x_proj reads them
    cd = compute_dtype(dtype)
    x = rules.conv_act.activation(parts.conv1d(x)[..., :length].to(cd), parts.act)
    x = mask_padding(x.transpose(1, 2), attention_mask)  # [b, l, d]
    dt, B, C = torch.split(parts.x_proj(x.to(dtype)), [parts.dt_rank, parts.d_state, parts.d_state], dim=-1)
    if parts.dt_norm is not None and parts.B_norm is not None and parts.C_norm is not None:
        dt, B, C = parts.dt_norm(dt), parts.B_norm(B), parts.C_norm(C)
    dt = parts.dt_proj.weight.to(cd) @ dt.transpose(1, 2).to(cd)
    bias = parts.dt_proj.bias
    delta = F.softplus(dt.to(cd) + (0.0 if bias is None else bias.to(cd)[:, None]))
    A = -torch.exp(parts.A_log.to(cd))
    delta, A, B, C = rules.ssm.ssm_constants(delta, A, B.transpose(1, 2), C.transpose(1, 2))
    y = selective_scan(x.transpose(1, 2), delta, A, B, C, parts.D.to(cd), linear=rules.ssm.ssm_is_linear, backend=rules.backend)
    y = gate_with_activation(rules.gate, rules.gate_act, y, z.to(cd), parts.gate_fn or parts.act, transposed_out=True)
    return parts.out_proj(y.transpose(1, 2).to(dtype))


def hf_mamba1_parts(mixer: Any) -> Mamba1Parts:
    """Parts of transformers' ``MambaMixer`` / ``FalconMambaMixer``."""
    falcon = hasattr(mixer, "b_layernorm")
    return Mamba1Parts(
        in_proj=mixer.in_proj,
        conv1d=mixer.conv1d,
        x_proj=mixer.x_proj,
        dt_proj=mixer.dt_proj,
        out_proj=mixer.out_proj,
        A_log=mixer.A_log,
        D=mixer.D,
        dt_rank=int(mixer.time_step_rank),
        d_state=mixer.ssm_state_size,
        act=mixer.act.forward,
        dt_norm=mixer.dt_layernorm if falcon else None,
        B_norm=mixer.b_layernorm if falcon else None,
        C_norm=mixer.c_layernorm if falcon else None,
    )
