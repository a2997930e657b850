"""The relevance scan as a Triton kernel (CUDA; also runs under ``TRITON_INTERPRET=1``).

The same math as :mod:`.linear_scan`, in a channel layout that covers both Mamba1 and
Mamba2: channel ``c`` belongs to head ``c // P`` (its dt and A) and to group
``head // (H / G)`` (its B and C)::

    forward   h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t,      y_t  = <C_t, h_t> + D x_t
    adjoint   u_t = exp(dt_{t+1} A) u_{t+1} + g_t C_t,       dx_t = dt_t <B_t, u_t> + D g_t

One program per (batch, block of channels) runs sequentially over time with the state
block ``[BLOCK_C, N]`` in registers, reading time in tiles of ``BLOCK_T`` steps (one
coalesced load per tile instead of a dependent load per step); loads are cast to float32
and the result is float32 whatever the input dtype. Mamba1 is ``P = 1, G = 1`` (A per
channel and state); Mamba2 is ``P = head_dim`` (dt and a scalar A per head).
"""

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..kernels import jit


def _scan_kernel(
    v_ptr,
    dt_ptr,
    a_ptr,
    min_ptr,
    mout_ptr,
    d_ptr,
    out_ptr,
    h0_ptr,
    hout_ptr,
    length,
    channels,
    n_state,
    head_dim,
    group_channels,
    s_vb,
    s_vl,
    s_vc,
    s_db,
    s_dl,
    s_dh,
    s_ah,
    s_an,
    s_ib,
    s_il,
    s_ig,
    s_in,
    s_ob,
    s_ol,
    s_og,
    s_on,
    s_rb,
    s_rl,
    s_rc,
    HAS_D: tl.constexpr,
    HAS_H0: tl.constexpr,
    STORE_H: tl.constexpr,
    REVERSE: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    pid_b = tl.program_id(0).to(tl.int64)
    pid_c = tl.program_id(1)
    # 64-bit channel and head indices: Mamba1's x and dt are [b, d, l], a channel's offset d * l
    # passes 2^31 at 8192 channels and 2^18 steps (mamba-ssm's kernels fail there: mamba#1015)
    offs_c = pid_c.to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < channels
    offs_n = tl.arange(0, BLOCK_N)
    mask_n = offs_n < n_state
    head = offs_c // head_dim
    group = ((pid_c * BLOCK_C) // group_channels).to(tl.int64)
    a = tl.load(a_ptr + head[:, None] * s_ah + offs_n[None, :] * s_an, mask=mask_c[:, None] & mask_n[None, :], other=0.0).to(
        tl.float32
    )
    if HAS_D:
        dd = tl.load(d_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)
    v_base = v_ptr + pid_b * s_vb + offs_c * s_vc
    dt_base = dt_ptr + pid_b * s_db + head * s_dh
    in_base = min_ptr + pid_b * s_ib + group * s_ig + offs_n * s_in
    out_base = mout_ptr + pid_b * s_ob + group * s_og + offs_n * s_on
    res_base = out_ptr + pid_b * s_rb + offs_c * s_rc
    # carried states: contiguous float32 [b, channels, n]
    h_offs = pid_b * channels * n_state + offs_c[:, None] * n_state + offs_n[None, :]
    h_mask = mask_c[:, None] & mask_n[None, :]
    if HAS_H0:
        h = tl.load(h0_ptr + h_offs, mask=h_mask, other=0.0).to(tl.float32)
    else:
        h = tl.zeros([BLOCK_C, BLOCK_N], dtype=tl.float32)
    steps = tl.arange(0, BLOCK_T)
    n_tiles = tl.cdiv(length, BLOCK_T)
    for k in range(0, n_tiles):
        # one coalesced load of BLOCK_T steps, then the steps from registers
        if REVERSE:
            t0 = (n_tiles - 1 - k).to(tl.int64) * BLOCK_T
        else:
            t0 = (k + tl.zeros([], dtype=tl.int64)) * BLOCK_T
        offs_t = t0 + steps
        mask_t = offs_t < length
        mask_ct = mask_c[:, None] & mask_t[None, :]
        mask_tn = mask_t[:, None] & mask_n[None, :]
        vs = tl.load(v_base[:, None] + offs_t[None, :] * s_vl, mask=mask_ct, other=0.0).to(tl.float32)
        dts = tl.load(dt_base[:, None] + offs_t[None, :] * s_dl, mask=mask_ct, other=0.0).to(tl.float32)
        ins = tl.load(in_base[None, :] + offs_t[:, None] * s_il, mask=mask_tn, other=0.0).to(tl.float32)
        outs = tl.load(out_base[None, :] + offs_t[:, None] * s_ol, mask=mask_tn, other=0.0).to(tl.float32)
        res = tl.zeros([BLOCK_C, BLOCK_T], dtype=tl.float32)
        for j in tl.static_range(BLOCK_T):
            if REVERSE:
                pick = steps == BLOCK_T - 1 - j
            else:
                pick = steps == j
            v = tl.sum(tl.where(pick[None, :], vs, 0.0), axis=1)
            dt = tl.sum(tl.where(pick[None, :], dts, 0.0), axis=1)
            m_in = tl.sum(tl.where(pick[:, None], ins, 0.0), axis=0)
            m_out = tl.sum(tl.where(pick[:, None], outs, 0.0), axis=0)
            decay = tl.exp(dt[:, None] * a)
            if REVERSE:
                h = h + v[:, None] * m_in[None, :]
                r = tl.sum(h * m_out[None, :], axis=1) * dt
                h = h * decay
            else:
                h = decay * h + (dt * v)[:, None] * m_in[None, :]
                r = tl.sum(h * m_out[None, :], axis=1)
            res = tl.where(pick[None, :], r[:, None], res)
        if HAS_D:
            res += dd[:, None] * vs
        tl.store(res_base[:, None] + offs_t[None, :] * s_rl, res, mask=mask_ct)
    if STORE_H:  # forward: h_{l-1}; reverse: exp(dt_0 A) u_0, the gradient for the state before
        tl.store(hout_ptr + h_offs, h, mask=h_mask)


Strides = Tuple[int, ...]
#: Time steps loaded per tile (one coalesced load, then the steps run from registers).
BLOCK_T = 16


def _block_c(n_state: int, groups: int, group_channels: int) -> int:
    """Channels per program: small blocks for many programs (batch 1 has few channels to
    spread over the SMs); a block never straddles two groups of B and C."""
    target = 16 if n_state <= 32 else 8
    if groups == 1:
        return target
    block = 1
    while block * 2 <= target and group_channels % (block * 2) == 0:
        block *= 2
    return block


def _launch(
    v: Tensor,
    sv: Strides,
    dt: Tensor,
    sd: Strides,
    A: Tensor,
    sa: Strides,
    M_in: Tensor,
    si: Strides,
    M_out: Tensor,
    so: Strides,
    D: Optional[Tensor],
    out: Tensor,
    sr: Strides,
    batch: int,
    length: int,
    channels: int,
    n_state: int,
    head_dim: int,
    groups: int,
    reverse: bool,
    h0: Optional[Tensor] = None,
    h_out: Optional[Tensor] = None,
) -> None:
    group_channels = channels // groups
    block_c = _block_c(n_state, groups, group_channels)
    block_n = max(triton.next_power_of_2(n_state), 2)
    warps = max(1, min(4, block_c * block_n // 256))
    grid = (batch, triton.cdiv(channels, block_c))
    jit(_scan_kernel)[grid](
        v,
        dt,
        A,
        M_in,
        M_out,
        D if D is not None else dt,
        out,
        h0 if h0 is not None else dt,
        h_out if h_out is not None else dt,
        length,
        channels,
        n_state,
        head_dim,
        group_channels,
        *sv,
        *sd,
        *sa,
        *si,
        *so,
        *sr,
        HAS_D=D is not None,
        HAS_H0=h0 is not None,
        STORE_H=h_out is not None,
        REVERSE=reverse,
        BLOCK_C=block_c,
        BLOCK_N=block_n,
        BLOCK_T=BLOCK_T,
        num_warps=warps,
    )


def _mamba1(
    v: Tensor,
    delta: Tensor,
    A: Tensor,
    M_in: Tensor,
    M_out: Tensor,
    D: Optional[Tensor],
    reverse: bool,
    h0: Optional[Tensor] = None,
    h_out: Optional[Tensor] = None,
) -> Tensor:
    """``v, delta [b, d, l]``, ``A [d, n]``, ``M_in, M_out [b, n, l]`` -> float32 ``[b, d, l]``
    (stored ``[b, l, d]``, the layout the mixer's next linear layer reads)."""
    b, d, length = v.shape
    out = torch.empty(b, length, d, device=v.device, dtype=torch.float32)
    _launch(
        v,
        (v.stride(0), v.stride(2), v.stride(1)),
        delta,
        (delta.stride(0), delta.stride(2), delta.stride(1)),
        A,
        (A.stride(0), A.stride(1)),
        M_in,
        (M_in.stride(0), M_in.stride(2), 0, M_in.stride(1)),
        M_out,
        (M_out.stride(0), M_out.stride(2), 0, M_out.stride(1)),
        D,
        out,
        (out.stride(0), out.stride(1), out.stride(2)),
        b,
        length,
        d,
        A.shape[1],
        1,
        1,
        reverse,
        h0,
        h_out,
    )
    return out.transpose(1, 2)


def _ssd(
    v: Tensor,
    dt: Tensor,
    A: Tensor,
    M_in: Tensor,
    M_out: Tensor,
    D: Optional[Tensor],
    reverse: bool,
    h0: Optional[Tensor] = None,
    h_out: Optional[Tensor] = None,
) -> Tensor:
    """``v [b, l, h, p]``, ``dt [b, l, h]``, ``A [h]``, ``M_in, M_out [b, l, g, n]``,
    ``D`` per channel ``[h * p]`` -> float32 ``[b, l, h, p]``."""
    b, length, heads, p = v.shape
    flat = v.reshape(b, length, heads * p)
    out = torch.empty(b, length, heads * p, device=v.device, dtype=torch.float32)
    groups = M_in.shape[2]
    _launch(
        flat,
        (flat.stride(0), flat.stride(1), flat.stride(2)),
        dt,
        (dt.stride(0), dt.stride(1), dt.stride(2)),
        A,
        (A.stride(0), 0),
        M_in,
        tuple(M_in.stride()),
        M_out,
        tuple(M_out.stride()),
        D,
        out,
        (out.stride(0), out.stride(1), out.stride(2)),
        b,
        length,
        heads * p,
        M_in.shape[3],
        p,
        groups,
        reverse,
        h0,
        h_out,
    )
    return out.view(b, length, heads, p)


_LAYOUTS = {"mamba1": _mamba1, "ssd": _ssd}


class _TritonRelevanceScan(torch.autograd.Function):
    """Forward: the scan kernel. Backward: the adjoint kernel, gradient for ``x`` only."""

    @staticmethod
    def forward(ctx, x, dt, A, B, C, D, layout):  # type: ignore[override]
        ctx.save_for_backward(dt, A, B, C, D)
        ctx.layout, ctx.x_dtype = layout, x.dtype
        return _LAYOUTS[layout](x, dt, A, B, C, D, reverse=False)

    @staticmethod
    def backward(ctx, grad_y):  # type: ignore[override]
        dt, A, B, C, D = ctx.saved_tensors
        grad_x = _LAYOUTS[ctx.layout](grad_y, dt, A, C, B, D, reverse=True)
        return grad_x.to(ctx.x_dtype), None, None, None, None, None, None


def _channel_D(D: Optional[Tensor], heads: int, p: int) -> Optional[Tensor]:
    if D is None:
        return None
    D = D.detach().float()
    return (D.repeat_interleave(p) if D.dim() == 1 else D.reshape(heads * p)).contiguous()


def selective_scan(x: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor]) -> Tensor:
    """Mamba1 layout (see :func:`captum_mambalrp.scan.selective_scan`), constants detached."""
    Dc = None if D is None else D.detach().float().contiguous()
    return _TritonRelevanceScan.apply(x, delta.detach(), A.detach().float(), B.detach(), C.detach(), Dc, "mamba1")


def _state_shape(x: Tensor, A: Tensor, B: Tensor, layout: str) -> Tuple[int, ...]:
    """The carried state's shape: Mamba1 ``[b, d, n]``; SSD ``[b, h, p, n]`` (both ``[b, channels, n]`` in memory)."""
    if layout == "mamba1":
        return (x.shape[0], x.shape[1], A.shape[1])
    return (x.shape[0], x.shape[2], x.shape[3], B.shape[3])


class _TritonRelevanceScanState(torch.autograd.Function):
    """:class:`_TritonRelevanceScan` for a piece of a sequence: from the carried state ``h0``
    (float32, see :func:`_state_shape`), also returning the last state; the backward pass starts
    the adjoint from the last state's gradient and returns the gradient for ``h0`` (the kernel's
    final state in reverse, ``exp(dt_0 A) u_0``)."""

    @staticmethod
    def forward(ctx, x, h0, dt, A, B, C, D, layout):  # type: ignore[override]
        ctx.save_for_backward(dt, A, B, C, D)
        shape = _state_shape(x, A, B, layout)
        ctx.x_dtype, ctx.has_h0, ctx.layout, ctx.x_shape, ctx.state_shape = x.dtype, h0 is not None, layout, x.shape, shape
        h_last = torch.empty(shape, device=x.device, dtype=torch.float32)
        h_in = None if h0 is None else h0.detach().float().contiguous()
        y = _LAYOUTS[layout](x, dt, A, B, C, D, reverse=False, h0=h_in, h_out=h_last)
        return y, h_last

    @staticmethod
    def backward(ctx, grad_y, grad_h):  # type: ignore[override]
        dt, A, B, C, D = ctx.saved_tensors
        grad_h0 = torch.empty(ctx.state_shape, device=dt.device, dtype=torch.float32) if ctx.has_h0 else None
        g = torch.zeros(ctx.x_shape, device=dt.device, dtype=torch.float32) if grad_y is None else grad_y
        gh = None if grad_h is None else grad_h.float().contiguous()
        grad_x = _LAYOUTS[ctx.layout](g, dt, A, C, B, D, reverse=True, h0=gh, h_out=grad_h0)
        return grad_x.to(ctx.x_dtype), grad_h0, None, None, None, None, None, None


def selective_scan_state(
    x: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor], h0: Optional[Tensor]
) -> Tuple[Tensor, Tensor]:
    """Mamba1 layout on a piece of a sequence: ``(y, h_last)`` from the state ``h0 [b, d, n]``
    (``None``: zero), float32 (see :func:`captum_mambalrp.scan.selective_scan`)."""
    Dc = None if D is None else D.detach().float().contiguous()
    return _TritonRelevanceScanState.apply(x, h0, delta.detach(), A.detach().float(), B.detach(), C.detach(), Dc, "mamba1")


def ssd_scan_state(
    x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor], h0: Optional[Tensor]
) -> Tuple[Tensor, Tensor]:
    """SSD layout on a piece of a sequence: ``(y, h_last)`` from the state ``h0 [b, h, p, n]``
    (``None``: zero), float32 (see :func:`captum_mambalrp.scan.ssd_scan_state`)."""
    heads, p = x.shape[2], x.shape[3]
    Dc = _channel_D(D, heads, p)
    return _TritonRelevanceScanState.apply(x, h0, dt.detach(), A.detach().float(), B.detach(), C.detach(), Dc, "ssd")


def ssd_scan(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor]) -> Tensor:
    """Mamba2 layout (see :func:`captum_mambalrp.scan.ssd_scan`), constants detached."""
    heads, p = x.shape[2], x.shape[3]
    return _TritonRelevanceScan.apply(x, dt.detach(), A.detach().float(), B.detach(), C.detach(), _channel_D(D, heads, p), "ssd")
