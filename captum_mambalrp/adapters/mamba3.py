"""mamba-ssm's ``Mamba3`` mixer (``mamba_ssm/modules/mamba3.py``): SISO and MIMO, with or without
the output norm, computed in torch (Mamba3's own kernels are CUDA/Triton/TileLang only).

For ``u [b, l, d_model]`` with ``h`` heads of size ``p``, state size ``n``, MIMO rank ``R``
(``R = 1``: SISO), ``g`` B/C groups (docs/rules.md, section "Mamba3")::

    z, x, B, C, dd_dt, dd_A, trap, angle = split(in_proj(u))   # no conv
    dt_t    = softplus(dd_dt + dt_bias);  a_t = dt_t * min(-softplus(dd_A), -A_floor)
    lam_t   = sigmoid(trap);  theta_t = sum_{s<=t} pi * tanh(angle_s) * dt_s      (per rotary pair)
    k_{t,r} = rot(theta_t) (rmsnorm(B_{t,r}) + B_bias_r);  q_{t,r} = rot(theta_t) (rmsnorm(C_{t,r}) + C_bias_r)
    v_{t,r} = x_t * mimo_x_r                                                   (SISO: v = x)
    S_t     = exp(a_t) S_{t-1} + exp(a_t) dt_t (1 - lam_t) sum_r v_{t-1,r} k_{t-1,r}^T
                               + dt_t lam_t sum_r v_{t,r} k_{t,r}^T             (trapezoidal rule)
    y_{t,r} = S_t q_{t,r} + D v_{t,r}
    out     = out_proj(sum_r mimo_o_r * y_{t,r} * silu(z_t * mimo_z_r))        (SISO: y * silu(z))
            | out_proj(sum_r mimo_o_r * w * norm_p(y_{t,r}) * silu(z_t * mimo_z_r))   (is_outproj_norm)

Unrolled, ``y_{t,r'} = sum_{s<=t} sum_r w_{t,s} (q_{t,r'} . k_{s,r}) v_{s,r} + D v_{t,r'}`` with
``w_{t,s} = c_s exp(a_{s+1} + ... + a_t)`` for ``s < t``, ``c_s = dt_s lam_s + dt_{s+1}(1 - lam_{s+1})``,
and ``w_{t,t} = dt_t lam_t``: an SSD scan (decay ``exp(a_t)``, input coefficient ``c_s``, keys
``k``, queries ``q``, so :func:`..scan.ssd_scan` with every backend) plus a diagonal correction
``(dt_t lam_t - c_t)(q_{t,r'} . k_{t,r}) v_{t,r}``.

MambaLRP's rules: ``dt``, ``a``, ``lam``, ``theta``, ``k`` and ``q`` (all computed from the input)
are constants (``ssm``), so the layer is linear in ``x``: the scan, the trapezoid's two terms,
the complex (rotary) state, the MIMO up/down projections and ``D`` are linear maps with fixed
coefficients; the SiLU on ``z`` passes relevance unchanged (``gate_act``) and each product
``y * silu(.)`` gives each factor half (``gate``); the output norm's factor is a constant (``norm``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..rules.base import NORM, GradientRule, MambaRule
from ..rules.composites import Composite
from ..scan import compute_dtype, ssd_scan
from .base import Adapter, Component, register
from .common import MixerRules, mixer_rules, rules_as_components
from .hf_mamba2 import reject_packed
from .norms import grouped_rms_norm
from .patching import Patcher


@dataclass
class Mamba3Parts:
    """Where the parts of a ``Mamba3`` mixer live, and its sizes."""

    in_proj: nn.Linear
    out_proj: nn.Linear
    dt_bias: Tensor
    B_bias: Tensor  # [h, R, n]
    C_bias: Tensor
    B_norm: Tuple[Tensor, float]  # (weight [n], eps)
    C_norm: Tuple[Tensor, float]
    D: Tensor
    d_inner: int
    n_heads: int
    head_dim: int
    d_state: int
    n_groups: int
    rank: int
    n_angles: int
    A_floor: float
    mimo: Optional[Tuple[Tensor, Tensor, Tensor]]  # (mimo_x, mimo_z, mimo_o) [h, R, p]
    norm: Optional[Tuple[Tensor, float]]  # output norm (weight [d_inner], eps), per head, before the gate

    @property
    def rotate_pairwise(self) -> bool:
        """SISO rotates pairs ``(2i, 2i+1)``; MIMO's kernels pair ``i`` with ``i + n/2``."""
        return self.mimo is None


def mamba3_parts(mixer: Any) -> Mamba3Parts:
    """Parts of mamba-ssm's ``Mamba3`` (SISO or MIMO, output norm or not).

    Returns:
        The :class:`Mamba3Parts` reading ``mixer``'s modules, parameters and sizes (nothing copied).
    """
    mimo = (mixer.mimo_x, mixer.mimo_z, mixer.mimo_o) if mixer.is_mimo else None
    norm = (mixer.norm.weight, float(mixer.norm.eps)) if mixer.is_outproj_norm else None
    return Mamba3Parts(
        in_proj=mixer.in_proj,
        out_proj=mixer.out_proj,
        dt_bias=mixer.dt_bias,
        B_bias=mixer.B_bias,
        C_bias=mixer.C_bias,
        B_norm=(mixer.B_norm.weight, float(mixer.B_norm.eps)),
        C_norm=(mixer.C_norm.weight, float(mixer.C_norm.eps)),
        D=mixer.D,
        d_inner=int(mixer.d_inner),
        n_heads=int(mixer.nheads),
        head_dim=int(mixer.headdim),
        d_state=int(mixer.d_state),
        n_groups=int(mixer.num_bc_heads),
        rank=int(mixer.mimo_rank),
        n_angles=int(mixer.num_rope_angles),
        A_floor=float(mixer.A_floor),
        mimo=mimo,
        norm=norm,
    )


def rotate(x: Tensor, theta: Tensor, pairwise: bool) -> Tensor:
    """Rotate pairs of ``x [..., n]`` by ``theta [..., n_angles]`` (pairs past ``n_angles`` unrotated):
    ``(x0, x1) -> (x0 cos - x1 sin, x0 sin + x1 cos)`` with pairs ``(2i, 2i+1)`` (``pairwise``) or
    ``(i, i + n/2)``. As a complex number per pair, ``x * exp(i theta)``: Mamba3's complex state.

    Returns:
        The rotated tensor, ``x``'s shape.

    >>> rotate(torch.tensor([1.0, 0.0, 5.0, 6.0]), torch.tensor([math.pi / 2]), True).round().abs().tolist()
    [0.0, 1.0, 5.0, 6.0]
    """
    half = x.shape[-1] // 2
    pad = half - theta.shape[-1]
    cos = F.pad(torch.cos(theta), (0, pad), value=1.0)
    sin = F.pad(torch.sin(theta), (0, pad), value=0.0)
    if pairwise:
        x0, x1 = x.unflatten(-1, (half, 2)).unbind(-1)
        return torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1).flatten(-2)
    x0, x1 = x[..., :half], x[..., half:]
    return torch.cat([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1)


def _rms(x: Tensor, norm: Tuple[Tensor, float]) -> Tensor:
    weight, eps = norm
    return weight.to(x.dtype) * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def mamba3_forward(parts: Mamba3Parts, rules: MixerRules, norm_rule: MambaRule, hidden: Tensor) -> Tensor:
    """The Mamba3 mixer on ``hidden [b, l, d_model]`` with MambaLRP's rules applied (module doc).

    Returns:
        ``[b, l, d_model]`` in ``hidden``'s dtype.
    """
    b, length, _ = hidden.shape
    dtype = hidden.dtype
    cd = compute_dtype(dtype)
    h, p, n, g, R = parts.n_heads, parts.head_dim, parts.d_state, parts.n_groups, parts.rank
    bc = n * g * R
    z, x, B, C, dd_dt, dd_A, trap, angles = torch.split(
        parts.in_proj(hidden), [parts.d_inner, parts.d_inner, bc, bc, h, h, h, parts.n_angles], dim=-1
    )
    z = z.to(cd).unflatten(-1, (h, p))
    x = x.to(cd).unflatten(-1, (h, p))

    # the input-dependent parameters (constants under the SSM rule)
    dt = F.softplus(dd_dt.to(cd) + parts.dt_bias.to(cd))  # [b, l, h]
    a = dt * (-F.softplus(dd_A.to(cd))).clamp(max=-parts.A_floor)  # log decay
    lam = torch.sigmoid(trap.to(cd))
    theta = torch.cumsum(math.pi * torch.tanh(angles.to(cd))[:, :, None, :] * dt[..., None], dim=1)  # [b, l, h, S]
    per_head = (b, length, R, g, n)

    def keys(t: Tensor, norm: Tuple[Tensor, float], bias: Tensor) -> Tensor:
        t = _rms(t.to(cd).reshape(per_head), norm).repeat_interleave(h // g, dim=3)  # [b, l, R, h, n]
        t = t + bias.to(cd).transpose(0, 1)
        return rotate(t, theta[:, :, None], parts.rotate_pairwise)

    k, q = keys(B, parts.B_norm, parts.B_bias), keys(C, parts.C_norm, parts.C_bias)
    gamma = dt * lam  # weight of v_t k_t in S_t
    shifted = F.pad((dt * (1 - lam))[:, 1:], (0, 0, 0, 1))  # dt_{t+1} (1 - lam_{t+1}): v_t k_t's share in S_{t+1}
    c = gamma + shifted
    decay = -a  # ssd_scan's decay exp(dt * A) with A = -1 and its dt = -a > 0
    k_in = k * (c / decay.clamp_min(torch.finfo(cd).tiny))[:, :, None, :, None]  # so that decay * k_in = c k
    diag = (gamma - c)[:, :, None, None, :] * torch.einsum("blshn,blrhn->blsrh", q, k)  # [b, l, R', R, h]
    A = -torch.ones(h, dtype=cd, device=hidden.device)
    decay, A, k_in, q = rules.ssm.ssm_constants(decay, A, k_in, q)
    diag = rules.ssm.ssm_constants(diag, A, k_in, q)[0]

    # the linear part: v -> y
    v = x[:, :, None] if parts.mimo is None else x[:, :, None] * parts.mimo[0].to(cd).transpose(0, 1)  # [b, l, R, h, p]
    # y_{r'} = sum_r SSD(v_r; keys k_r, queries q_r'): one batched scan over (r', r)
    xs = v[:, :, None].expand(b, length, R, R, h, p).permute(2, 3, 0, 1, 4, 5).reshape(R * R * b, length, h, p)
    ks = k_in[:, :, None].expand(b, length, R, R, h, n).permute(2, 3, 0, 1, 4, 5).reshape(R * R * b, length, h, n)
    qs = q[:, :, :, None].expand(b, length, R, R, h, n).permute(2, 3, 0, 1, 4, 5).reshape(R * R * b, length, h, n)
    dts = decay.repeat(R * R, 1, 1)
    y = ssd_scan(xs, dts, A, ks, qs, None, linear=rules.ssm.ssm_is_linear, backend=rules.backend, model_dtype=dtype)
    y = y.reshape(R, R, b, length, h, p).sum(1).permute(1, 2, 0, 3, 4)  # [b, l, R', h, p]
    y = y + torch.einsum("blsrh,blrhp->blshp", diag, v) + parts.D.to(cd)[:, None] * v

    # gate (and output norm), MIMO down projection
    zr = z[:, :, None] if parts.mimo is None else z[:, :, None] * parts.mimo[1].to(cd).transpose(0, 1)
    gate = rules.gate_act.activation(zr, F.silu)
    if parts.norm is not None:
        weight, eps = parts.norm
        y = grouped_rms_norm(y.flatten(-2), weight.to(cd), eps, p, norm_rule).unflatten(-1, (h, p))
    y = rules.gate.gate(y, gate)
    y = y[:, :, 0] if parts.mimo is None else (y * parts.mimo[2].to(cd).transpose(0, 1)).sum(2)
    return parts.out_proj(y.flatten(-2).to(dtype))


def is_mamba3(module: nn.Module) -> bool:
    cls = type(module)
    return cls.__name__ == "Mamba3" and cls.__module__ == "mamba_ssm.modules.mamba3"


class MambaSSM3Adapter(Adapter):
    """mamba-ssm's ``Mamba3`` (SISO and MIMO, with or without the output norm)."""

    label = "mamba-ssm Mamba3 mixer (SISO, MIMO)"

    def claims(self, module: nn.Module) -> bool:
        return is_mamba3(module)

    def affine_parts(self, module: Any) -> Dict[str, nn.Module]:
        return {"in_proj": module.in_proj, "out_proj": module.out_proj}

    def install(self, module: Any, name: str, composite: Composite, patcher: Patcher, backend: str) -> List[Component]:
        parts = mamba3_parts(module)
        rules = mixer_rules(name, None, composite, backend)
        components = [c for c in rules_as_components(name, rules) if not c.name.endswith(".conv_act")]  # no conv
        norm_rule: MambaRule = GradientRule()
        if parts.norm is not None:
            norm_rule = composite.rule_for(f"{name}.norm", NORM, module.norm)
            components.append(Component(f"{name}.norm", NORM, norm_rule))

        def forward(
            u: Tensor, seq_idx: Optional[Tensor] = None, cu_seqlens: Optional[Tensor] = None, inference_params: object = None
        ) -> Tensor:
            if inference_params is not None:
                raise ValueError("MambaLRP explains whole sequences: call the model without inference_params (no decoding cache)")
            reject_packed({"seq_idx": seq_idx, "cu_seqlens": cu_seqlens})
            return mamba3_forward(parts, rules, norm_rule, u)

        patcher.replace_forward(module, forward)
        return components


register(MambaSSM3Adapter())
