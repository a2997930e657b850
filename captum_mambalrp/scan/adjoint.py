"""A relevance scan from any forward-only scan kernel: the adjoint is a reversed scan.

With dt, A, B, C constant, the gradient of the scan for x is the adjoint recurrence
(see :mod:`.linear_scan`)::

    u_t = exp(dt_{t+1} A) u_{t+1} + g_t C_t,        dx_t = dt_t <B_t, u_t> + D g_t

Run backwards in time (``s = L - 1 - t``) this *is* a forward selective scan::

    h_s = exp(dt'_s A) h_{s-1} + dt'_s x'_s B'_s,   y'_s = <C'_s, h_s>

with ``dt'_s = dt_{t+1}`` (any positive value at ``t = L - 1``, where the carried state is
zero: 1), ``x'_s = g_t / dt'_s``, ``B' = C``, ``C' = B`` reversed, and
``dx_t = dt_t y'_{L-1-t} + D g_t``. So a fast forward kernel (mamba-ssm's) serves the
backward pass as well, computing nothing but dx (its own backward computes the gradients
of delta, A, B, C and D too, which MambaLRP discards). ``dt'`` is floored at
``DT_FLOOR``: a step that small decays by ``exp(DT_FLOOR * A) == 1`` in float32 (for
``|A| < 1e12``), so only the division ``g / dt'`` is kept finite.

The element-wise steps before and after the kernel (reverse, shift, divide; reverse,
scale, add ``D g``) are one Triton kernel each on CUDA, torch operations elsewhere.
Layouts: ``"mamba1"`` (x ``[b, d, l]``, dt ``[b, d, l]``, D ``[d]``) and ``"ssd"`` (x
``[b, l, h, p]``, dt ``[b, l, h]``, D ``[h]`` or ``[h, p]``); B and C as the kernel takes them.
"""

from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch
from torch import Tensor

from ..rules.fused import _kernel, fused_kernels_enabled, triton, tl

#: Smallest step size used in the reversed scan (keeps ``g / dt`` finite where dt underflowed).
DT_FLOOR = 1e-20

ForwardKernel = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor, Optional[Tensor]], Tensor]
TIME = {"mamba1": -1, "ssd": 1}


def _dt_per_x(dt: Tensor, layout: str) -> Tensor:
    return dt if layout == "mamba1" else dt[..., None]


def _D_per_x(D: Tensor, layout: str) -> Tensor:
    return D[:, None] if layout == "mamba1" or D.dim() == 1 else D


def prepare_torch(g: Tensor, dt: Tensor, layout: str) -> Tuple[Tensor, Tensor]:
    """``(x', dt')`` of the reversed problem, with torch operations (the definition)."""
    time = TIME[layout]
    length = dt.shape[time]
    tail = torch.ones_like(dt.narrow(time, 0, 1))
    dt_rev = torch.cat([dt.narrow(time, 1, length - 1), tail], dim=time).flip(time).clamp_min_(DT_FLOOR)
    return g.flip(time) / _dt_per_x(dt_rev, layout), dt_rev


def finish_torch(y_rev: Tensor, g: Tensor, dt: Tensor, D: Optional[Tensor], layout: str) -> Tensor:
    """``dx = dt * reverse(y') + D g``, with torch operations (the definition)."""
    grad = y_rev.flip(TIME[layout]) * _dt_per_x(dt, layout)
    return grad if D is None else grad + _D_per_x(D, layout) * g


# ---------------------------------------------------------------- fused (CUDA)
# Tensors are addressed as [batch, channel, time]; channel c belongs to head c // P (its dt).


def _x_strides(t: Tensor, layout: str) -> Optional[Tuple[int, int, int]]:
    """(batch, channel, time) strides of an x-shaped tensor (SSD: head and p flattened)."""
    if layout == "mamba1":
        return t.stride(0), t.stride(1), t.stride(2)
    if t.stride(2) != t.shape[3] * t.stride(3):
        return None
    return t.stride(0), t.stride(3), t.stride(1)


def _dt_strides(t: Tensor, layout: str) -> Tuple[int, int, int]:
    return (t.stride(0), t.stride(1), t.stride(2)) if layout == "mamba1" else (t.stride(0), t.stride(2), t.stride(1))


def _dims(g: Tensor, layout: str) -> Tuple[int, int, int, int]:
    """batch, channels, length, channels per head."""
    if layout == "mamba1":
        return g.shape[0], g.shape[1], g.shape[2], 1
    return g.shape[0], g.shape[2] * g.shape[3], g.shape[1], g.shape[3]


if triton is not None:

    def _prepare_kernel(g_ptr, dt_ptr, x_ptr, dtr_ptr, channels, length, per_head, floor,
                        sg0, sg1, sg2, sd0, sd1, sd2, sx0, sx1, sx2, sr0, sr1, sr2,
                        BLOCK_C: tl.constexpr, BLOCK_T: tl.constexpr):
        b = tl.program_id(0).to(tl.int64)
        c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        s = tl.program_id(2) * BLOCK_T + tl.arange(0, BLOCK_T)
        mask = (c[:, None] < channels) & (s[None, :] < length)
        head = (c // per_head).to(tl.int64)[:, None]
        c, s = c.to(tl.int64)[:, None], s.to(tl.int64)[None, :]
        t = length - 1 - s  # the original step read at reversed step s
        nxt = tl.load(dt_ptr + b * sd0 + head * sd1 + (t + 1) * sd2, mask=mask & (s > 0), other=1.0).to(tl.float32)
        step = tl.maximum(nxt, floor)
        g = tl.load(g_ptr + b * sg0 + c * sg1 + t * sg2, mask=mask, other=0.0).to(tl.float32)
        tl.store(x_ptr + b * sx0 + c * sx1 + s * sx2, tl.math.div_rn(g, step), mask=mask)
        tl.store(dtr_ptr + b * sr0 + head * sr1 + s * sr2, step, mask=mask & (c % per_head == 0))

    def _finish_kernel(y_ptr, g_ptr, dt_ptr, d_ptr, out_ptr, channels, length, per_head,
                       sy0, sy1, sy2, sg0, sg1, sg2, sd0, sd1, sd2, so0, so1, so2,
                       HAS_D: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_T: tl.constexpr):
        b = tl.program_id(0).to(tl.int64)
        c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        t = tl.program_id(2) * BLOCK_T + tl.arange(0, BLOCK_T)
        mask = (c[:, None] < channels) & (t[None, :] < length)
        head = (c // per_head).to(tl.int64)[:, None]
        cc, t = c.to(tl.int64)[:, None], t.to(tl.int64)[None, :]
        y = tl.load(y_ptr + b * sy0 + cc * sy1 + (length - 1 - t) * sy2, mask=mask, other=0.0).to(tl.float32)
        dt = tl.load(dt_ptr + b * sd0 + head * sd1 + t * sd2, mask=mask, other=0.0).to(tl.float32)
        out = y * dt
        if HAS_D:
            g = tl.load(g_ptr + b * sg0 + cc * sg1 + t * sg2, mask=mask, other=0.0).to(tl.float32)
            dd = tl.load(d_ptr + c, mask=c < channels, other=0.0).to(tl.float32)
            out += dd[:, None] * g
        tl.store(out_ptr + b * so0 + cc * so1 + t * so2, out, mask=mask)


_BLOCK = (32, 64)


def _grid(batch: int, channels: int, length: int) -> Tuple[int, int, int]:
    return (batch, triton.cdiv(channels, _BLOCK[0]), triton.cdiv(length, _BLOCK[1]))


def _fusable(g: Tensor, dt: Tensor, layout: str) -> bool:
    return g.dtype == dt.dtype == torch.float32 and fused_kernels_enabled(g, dt) and _x_strides(g, layout) is not None


def prepare(g: Tensor, dt: Tensor, layout: str) -> Tuple[Tensor, Tensor]:
    """:func:`prepare_torch`, as one Triton kernel on CUDA (float32)."""
    if not _fusable(g, dt, layout):
        return prepare_torch(g, dt, layout)
    batch, channels, length, per_head = _dims(g, layout)
    x_rev, dt_rev = torch.empty_like(g, memory_format=torch.contiguous_format), torch.empty_like(dt)
    _kernel(_prepare_kernel)[_grid(batch, channels, length)](
        g, dt, x_rev, dt_rev, channels, length, per_head, DT_FLOOR,
        *_x_strides(g, layout), *_dt_strides(dt, layout), *_x_strides(x_rev, layout), *_dt_strides(dt_rev, layout),
        BLOCK_C=_BLOCK[0], BLOCK_T=_BLOCK[1], num_warps=4)
    return x_rev, dt_rev


def _channel_D(D: Tensor, g: Tensor, layout: str) -> Tensor:
    if layout == "mamba1" or D.dim() == 2:
        return D.reshape(-1).contiguous()
    return D.repeat_interleave(g.shape[3])


def finish(y_rev: Tensor, g: Tensor, dt: Tensor, D: Optional[Tensor], layout: str) -> Tensor:
    """:func:`finish_torch`, as one Triton kernel on CUDA (float32)."""
    if not (_fusable(g, dt, layout) and y_rev.dtype == torch.float32 and _x_strides(y_rev, layout) is not None):
        return finish_torch(y_rev, g, dt, D, layout)
    batch, channels, length, per_head = _dims(g, layout)
    out = torch.empty_like(g, memory_format=torch.contiguous_format)
    Dc = None if D is None else _channel_D(D.float(), g, layout)
    _kernel(_finish_kernel)[_grid(batch, channels, length)](
        y_rev, g, dt, dt if Dc is None else Dc, out, channels, length, per_head,
        *_x_strides(y_rev, layout), *_x_strides(g, layout), *_dt_strides(dt, layout), *_x_strides(out, layout),
        HAS_D=Dc is not None, BLOCK_C=_BLOCK[0], BLOCK_T=_BLOCK[1], num_warps=4)
    return out


def reversed_adjoint(forward: ForwardKernel, g: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor,
                     D: Optional[Tensor], layout: str) -> Tensor:
    """``d<g, y>/dx`` of the scan ``y = forward(x, dt, A, B, C, D)`` in ``layout``, by one call
    of ``forward`` on the reversed problem. Float32 in, float32 out."""
    time = TIME[layout]
    x_rev, dt_rev = prepare(g, dt, layout)
    y_rev = forward(x_rev, dt_rev, A, C.flip(time), B.flip(time), None)
    return finish(y_rev, g, dt, D, layout)


class ReversedAdjointScan(torch.autograd.Function):
    """A forward-only scan kernel as a relevance scan: forward ``y = kernel(x, ...)``,
    backward ``dx`` by :func:`reversed_adjoint` (gradient for x only; dt, A, B, C, D constant)."""

    @staticmethod
    def forward(ctx, x, dt, A, B, C, D, kernel, layout):  # type: ignore[override]
        ctx.save_for_backward(dt, A, B, C, D)
        ctx.kernel, ctx.layout, ctx.x_dtype = kernel, layout, x.dtype
        return kernel(x.float(), dt, A, B, C, D)

    @staticmethod
    def backward(ctx, grad_y):  # type: ignore[override]
        dt, A, B, C, D = ctx.saved_tensors
        with torch.no_grad():
            grad_x = reversed_adjoint(ctx.kernel, grad_y.float(), dt, A, B, C, D, ctx.layout)
        return (grad_x.to(ctx.x_dtype),) + (None,) * 7
