"""Mamba1 mixers (transformers Mamba and FalconMamba; mamba-ssm's ``Mamba``).

All of them compute, for ``hidden [b, l, h]``::

    x, z  = in_proj(hidden).chunk(2)                 # [b, d, l] each
    x     = silu(conv1d(x)[..., :l])                 # depthwise causal conv
    dt, B, C = split(x_proj(x))                      # (FalconMamba: RMS-normed)
    delta = softplus(dt_proj.weight @ dt + dt_proj.bias)   # inside the scan (mamba-ssm's kernel)
    y     = scan(x, delta, -exp(A_log), B, C, D) * silu(z)
    out   = out_proj(y)

:func:`mamba1_forward` is that computation with a rule at each step; the adapters
only say where the parts of each implementation live.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..rules.activation import activation_in_and_rounded
from ..rules.gate import gate_with_activation
from ..rules.ssm import takes_raw_step
from ..scan import compute_dtype, rounded_inputs, selective_scan, selective_scan_state
from ..scan.adjoint import step_of
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


@dataclass
class Mamba1State:
    """What a Mamba1 mixer carries from one piece of a sequence to the next: the conv's last
    ``k - 1`` inputs ``conv [b, d, k-1]`` (model dtype) and the scan's state ``ssm [b, d, n]``
    (compute dtype)."""

    conv: Tensor
    ssm: Tensor

    def tensors(self) -> Tuple[Tensor, Tensor]:
        return self.conv, self.ssm


def mamba1_forward(parts: Mamba1Parts, rules: MixerRules, hidden: Tensor, attention_mask: Optional[Tensor] = None) -> Tensor:
    """The Mamba1 mixer on ``hidden [b, l, h]`` with MambaLRP's rules applied."""
    return mamba1_piece(parts, rules, hidden, attention_mask)[0]


def mamba1_piece(
    parts: Mamba1Parts,
    rules: MixerRules,
    hidden: Tensor,
    attention_mask: Optional[Tensor] = None,
    state: Optional[Mamba1State] = None,
    carry: bool = False,
) -> Tuple[Tensor, Optional[Mamba1State]]:
    """:func:`mamba1_forward` on one piece of a sequence (``recompute="sequence"``): ``state`` is
    what the previous piece left (``None``: the sequence starts here); with ``carry=True`` the
    piece also returns its own :class:`Mamba1State` for the next one, else ``None``. Pieces run
    one after the other give the whole sequence's output (the conv reads the carried inputs
    where it would read the previous piece's; the scan starts from the carried state)."""
    dtype, length = hidden.dtype, hidden.shape[1]
    # split before the transpose: the split's backward then writes in_proj's output gradient
    # [b, l, 2d]-contiguous, the layout in_proj's rule reads (no transposing copy of it)
    x, z = (t.transpose(1, 2) for t in parts.in_proj(mask_padding(hidden, attention_mask)).chunk(2, dim=-1))
    # the compute dtype (float32; float64 for a float64 model) from the conv's output on: the scan,
    # dt and the rule factors; a bf16 model's activations are rounded once, where x_proj reads them
    cd = compute_dtype(dtype)
    if state is None:
        conv = parts.conv1d(x)[..., :length]
        x_seen = x
    else:  # the conv's window reaches k - 1 steps into the previous piece
        x_seen = torch.cat([state.conv, x], dim=-1)
        pad = int(parts.conv1d.padding[0])
        conv = parts.conv1d(x_seen)[..., pad : pad + length]
    # x in the compute dtype and in the model's: what x_proj reads, also the scan's input where it
    # reads the model's dtype (one pass writes both on CUDA)
    x, low = activation_in_and_rounded(rules.conv_act, conv, parts.act, cd, dtype)
    x = mask_padding(x.transpose(1, 2), attention_mask)  # [b, l, d]
    x_model = x if low.dtype == x.dtype else mask_padding(low.transpose(1, 2), attention_mask)
    dt, B, C = torch.split(parts.x_proj(x_model), [parts.dt_rank, parts.d_state, parts.d_state], dim=-1)
    if parts.dt_norm is not None and parts.B_norm is not None and parts.C_norm is not None:
        dt, B, C = parts.dt_norm(dt), parts.B_norm(B), parts.C_norm(C)
    linear, backend = rules.ssm.ssm_is_linear, rules.backend
    # the raw step dt_proj.weight @ dt, in the model's dtype where the scan reads its inputs so
    # (a bf16 model's own kernel reads it so); its bias and softplus are applied by the scan
    raw = rounded_inputs(dtype, linear) or cd
    dt = parts.dt_proj.weight.to(raw) @ dt.transpose(1, 2).to(raw)
    bias = parts.dt_proj.bias
    dt_bias: Optional[Tensor] = torch.zeros(dt.shape[1], dtype=cd, device=dt.device) if bias is None else bias.to(cd)
    if not takes_raw_step(rules.ssm):  # a rule that reads the step itself gets it: softplus(dt + bias)
        dt, dt_bias = step_of(dt, dt_bias, "mamba1"), None
    A = -torch.exp(parts.A_log.to(cd))
    dt, A, B, C = rules.ssm.ssm_constants(dt, A, B.transpose(1, 2), C.transpose(1, 2))
    scan_args = (x.transpose(1, 2), dt, A, B, C, parts.D.to(cd))
    new_state: Optional[Mamba1State] = None
    if state is None and not carry:
        y = selective_scan(
            *scan_args, linear=linear, backend=backend, model_dtype=dtype, dt_bias=dt_bias, x_model=x_model.transpose(1, 2)
        )
    else:
        h0 = None if state is None else state.ssm
        y, h = selective_scan_state(*scan_args, h0, linear=linear, backend=backend, model_dtype=dtype, dt_bias=dt_bias)
        if carry:
            k = int(parts.conv1d.kernel_size[0])
            if x_seen.shape[-1] < k - 1:  # a piece shorter than the window: zeros before the start
                x_seen = F.pad(x_seen, (k - 1 - x_seen.shape[-1], 0))
            new_state = Mamba1State(x_seen[..., x_seen.shape[-1] - (k - 1) :], h)
    y = gate_with_activation(rules.gate, rules.gate_act, y, z, parts.gate_fn or parts.act, transposed_out=True, out_dtype=dtype)
    return parts.out_proj(y.transpose(1, 2)), new_state


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
