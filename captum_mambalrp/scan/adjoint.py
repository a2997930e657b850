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

from ..kernels import fused_kernels_enabled
from .precision import compute_dtype

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


def _fusable(g: Tensor, dt: Tensor, layout: str) -> bool:
    if not (g.dtype == dt.dtype == torch.float32 and fused_kernels_enabled(g, dt)):
        return False
    from ..kernels import elementwise

    return elementwise.x_strides(g, layout) is not None


def prepare(g: Tensor, dt: Tensor, layout: str) -> Tuple[Tensor, Tensor]:
    """:func:`prepare_torch`, as one Triton kernel on CUDA (float32)."""
    if not _fusable(g, dt, layout):
        return prepare_torch(g, dt, layout)
    from ..kernels import elementwise

    return elementwise.reversed_prepare(g, dt, layout, DT_FLOOR)


def _channel_D(D: Tensor, g: Tensor, layout: str) -> Tensor:
    """D per channel of x (SSD: per head repeated over p, or per (head, p))."""
    if layout == "mamba1" or D.dim() == 2:
        return D.reshape(-1).contiguous()
    return D.repeat_interleave(g.shape[3])


def finish(y_rev: Tensor, g: Tensor, dt: Tensor, D: Optional[Tensor], layout: str) -> Tensor:
    """:func:`finish_torch`, as one Triton kernel on CUDA (float32)."""
    if not (y_rev.dtype == torch.float32 and _fusable(y_rev, dt, layout) and _fusable(g, dt, layout)):
        return finish_torch(y_rev, g, dt, D, layout)
    from ..kernels import elementwise

    return elementwise.reversed_finish(y_rev, g, dt, None if D is None else _channel_D(D.float(), g, layout), layout)


def reversed_adjoint(
    forward: ForwardKernel, g: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor], layout: str
) -> Tensor:
    """``d<g, y>/dx`` of the scan ``y = forward(x, dt, A, B, C, D)`` in ``layout``, by one call
    of ``forward`` on the reversed problem. Float32 (or float64) in, the same out."""
    time = TIME[layout]
    x_rev, dt_rev = prepare(g, dt, layout)
    y_rev = forward(x_rev, dt_rev, A, C.flip(time), B.flip(time), None)
    return finish(y_rev, g, dt, D, layout)


class ReversedAdjointScan(torch.autograd.Function):
    """A forward-only scan kernel as a relevance scan: forward ``y = kernel(x, ...)``,
    backward ``dx`` by :func:`reversed_adjoint` (gradient for x only; dt, A, B, C, D constant)."""

    @staticmethod
    def forward(ctx, x, dt, A, B, C, D, kernel, layout):  # type: ignore[override]
        # dt, B, C in the dtype the forward kernel reads (the compute dtype, or a bf16 model's own
        # dtype: relevance_scan_from's kernel_dtype); A (and D) always in the compute dtype
        ctx.save_for_backward(dt, A, B, C, D)
        ctx.kernel, ctx.layout, ctx.x_dtype = kernel, layout, x.dtype
        return kernel(x.to(dt.dtype), dt, A, B, C, D).to(A.dtype)

    @staticmethod
    def backward(ctx, grad_y):  # type: ignore[override]
        dt, A, B, C, D = ctx.saved_tensors
        cd = A.dtype  # the adjoint in the compute dtype, on the constants the forward kernel read
        dt, B, C = dt.to(cd), B.to(cd), C.to(cd)
        with torch.no_grad():
            grad_x = reversed_adjoint(ctx.kernel, grad_y.to(cd), dt, A, B, C, D, ctx.layout)
        return (grad_x.to(ctx.x_dtype),) + (None,) * 7


def relevance_scan_from(
    kernel: ForwardKernel,
    layout: str,
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Optional[Tensor],
    kernel_dtype: Optional[torch.dtype] = None,
) -> Tensor:
    """``kernel`` as a relevance scan: dt, A, B, C, D detached and cast to the compute dtype
    (constants; float32, float64 for float64 inputs), gradient for x by :func:`reversed_adjoint`.
    Compute dtype out. ``kernel_dtype`` (a bf16 / fp16 model's dtype): the forward kernel reads
    x, dt, B, C rounded to it (as the model's own kernel reads them; its output is returned in the
    compute dtype), and the reversed adjoint runs in the compute dtype on those rounded constants,
    so forward and backward pass use one linear map and the gradient is not rounded."""
    cd = compute_dtype(torch.promote_types(x.dtype, dt.dtype))
    const = [None if t is None else t.detach().to(cd) for t in (dt, A, B, C, D)]
    if kernel_dtype is not None:
        const[0], const[2], const[3] = (t.to(kernel_dtype) for t in (const[0], const[2], const[3]))  # type: ignore[union-attr]
    return ReversedAdjointScan.apply(x, *const, kernel, layout)
