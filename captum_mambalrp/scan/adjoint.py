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
import torch.nn.functional as F
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


def step_of(dt: Tensor, dt_bias: Optional[Tensor], layout: str) -> Tensor:
    """The step ``softplus(dt + dt_bias)`` (``dt`` raw, ``dt_bias`` per channel / head, as
    mamba-ssm's kernels take them with ``delta_softplus=True``), in ``dt_bias``'s dtype; ``dt``
    itself without a bias."""
    if dt_bias is None:
        return dt
    return F.softplus(dt.to(dt_bias.dtype) + (dt_bias[:, None] if layout == "mamba1" else dt_bias))


def prepare_torch(g: Tensor, dt: Tensor, layout: str, dt_bias: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """``(x', dt')`` of the reversed problem, with torch operations (the definition)."""
    dt = step_of(dt, dt_bias, layout)
    time = TIME[layout]
    length = dt.shape[time]
    tail = torch.ones_like(dt.narrow(time, 0, 1))
    dt_rev = torch.cat([dt.narrow(time, 1, length - 1), tail], dim=time).flip(time).clamp_min_(DT_FLOOR)
    return g.flip(time) / _dt_per_x(dt_rev, layout), dt_rev


def finish_torch(
    y_rev: Tensor, g: Tensor, dt: Tensor, D: Optional[Tensor], layout: str, dt_bias: Optional[Tensor] = None
) -> Tensor:
    """``dx = dt * reverse(y') + D g``, with torch operations (the definition)."""
    grad = y_rev.flip(TIME[layout]) * _dt_per_x(step_of(dt, dt_bias, layout), layout)
    return grad if D is None else grad + _D_per_x(D, layout) * g


def _fusable(g: Tensor, dt: Tensor, layout: str, raw: bool = False) -> bool:
    """Can the Triton kernels take ``g`` and ``dt`` (float32; a raw ``dt`` of any float dtype but
    float64)?"""
    dt_ok = dt.dtype != torch.float64 if raw else dt.dtype == torch.float32
    if not (g.dtype == torch.float32 and dt_ok and fused_kernels_enabled(g, dt)):
        return False
    from ..kernels import elementwise

    return elementwise.x_strides(g, layout) is not None


def prepare(g: Tensor, dt: Tensor, layout: str, dt_bias: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """:func:`prepare_torch`, as one Triton kernel on CUDA (float32)."""
    if not _fusable(g, dt, layout, dt_bias is not None):
        return prepare_torch(g, dt, layout, dt_bias)
    from ..kernels import elementwise

    return elementwise.reversed_prepare(g, dt, layout, DT_FLOOR, dt_bias)


def _channel_D(D: Tensor, g: Tensor, layout: str) -> Tensor:
    """D per channel of x (SSD: per head repeated over p, or per (head, p))."""
    if layout == "mamba1" or D.dim() == 2:
        return D.reshape(-1).contiguous()
    return D.repeat_interleave(g.shape[3])


def finish(y_rev: Tensor, g: Tensor, dt: Tensor, D: Optional[Tensor], layout: str, dt_bias: Optional[Tensor] = None) -> Tensor:
    """:func:`finish_torch`, as one Triton kernel on CUDA (float32)."""
    raw = dt_bias is not None
    if not (y_rev.dtype == torch.float32 and _fusable(y_rev, dt, layout, raw) and _fusable(g, dt, layout, raw)):
        return finish_torch(y_rev, g, dt, D, layout, dt_bias)
    from ..kernels import elementwise

    D_channel = None if D is None else _channel_D(D.float(), g, layout)
    return elementwise.reversed_finish(y_rev, g, dt, D_channel, layout, dt_bias)


def reversed_adjoint(
    forward: ForwardKernel,
    g: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Optional[Tensor],
    layout: str,
    dt_bias: Optional[Tensor] = None,
) -> Tensor:
    """``d<g, y>/dx`` of the scan ``y = forward(x, dt, A, B, C, D)`` in ``layout``, by one call
    of ``forward`` on the reversed problem. Float32 (or float64) in, the same out. With
    ``dt_bias`` the scan's step is ``softplus(dt + dt_bias)`` (:func:`step_of`), computed where
    the steps around the kernel read ``dt``."""
    time = TIME[layout]
    x_rev, dt_rev = prepare(g, dt, layout, dt_bias)
    y_rev = forward(x_rev, dt_rev, A, C.flip(time), B.flip(time), None)
    return finish(y_rev, g, dt, D, layout, dt_bias)


class ReversedAdjointScan(torch.autograd.Function):
    """A forward-only scan kernel as a relevance scan: forward ``y = kernel(x, ...)``,
    backward ``dx`` by :func:`reversed_adjoint` (gradient for x only; dt, A, B, C, D constant)."""

    @staticmethod
    def forward(ctx, x, dt, A, B, C, D, kernel, layout, dt_bias=None, x_kernel=None):  # type: ignore[override]
        # dt, B, C in the dtype the forward kernel reads (the compute dtype, or a bf16 model's own
        # dtype: relevance_scan_from's kernel_dtype); A (and D, dt_bias) always in the compute
        # dtype. With dt_bias, dt is the raw step: the kernel applies the bias and softplus.
        # x_kernel: x already in that dtype (the caller's copy), read instead of casting x
        ctx.save_for_backward(dt, A, B, C, D, dt_bias)
        ctx.kernel, ctx.layout, ctx.x_dtype = kernel, layout, x.dtype
        extra = {} if dt_bias is None else {"dt_bias": dt_bias}
        u = x.to(dt.dtype) if x_kernel is None or x_kernel.dtype != dt.dtype else x_kernel
        return kernel(u, dt, A, B, C, D, **extra).to(A.dtype)

    @staticmethod
    def backward(ctx, grad_y):  # type: ignore[override]
        dt, A, B, C, D, dt_bias = ctx.saved_tensors
        cd = A.dtype  # the adjoint in the compute dtype, on the constants the forward kernel read
        B, C = B.to(cd), C.to(cd)
        if dt_bias is None:
            dt = dt.to(cd)  # a raw step is read as it is (prepare / finish compute the step)
        with torch.no_grad():
            grad_x = reversed_adjoint(ctx.kernel, grad_y.to(cd), dt, A, B, C, D, ctx.layout, dt_bias)
        return (grad_x.to(ctx.x_dtype),) + (None,) * 9


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
    dt_bias: Optional[Tensor] = None,
    x_kernel: Optional[Tensor] = None,
) -> Tensor:
    """``kernel`` as a relevance scan: dt, A, B, C, D detached and cast to the compute dtype
    (constants; float32, float64 for float64 inputs), gradient for x by :func:`reversed_adjoint`.
    Compute dtype out. ``kernel_dtype`` (a bf16 / fp16 model's dtype): the forward kernel reads
    x, dt, B, C rounded to it (as the model's own kernel reads them; its output is returned in the
    compute dtype), and the reversed adjoint runs in the compute dtype on those rounded constants,
    so forward and backward pass use one linear map and the gradient is not rounded.

    ``dt_bias`` (Mamba1 layout, a kernel taking ``dt_bias=``): ``dt`` is the raw step (a bf16
    model's ``dt_proj`` output, as its own kernel reads it); the kernel computes the step
    ``softplus(dt + dt_bias)`` in float32 (mamba-ssm's ``delta_softplus``), and so do the steps
    around the reversed kernel, which read the raw step as it was kept: no step tensor is made.
    ``x_kernel``: ``x``'s values already in ``kernel_dtype`` (a copy the caller has; the kernel
    reads it instead of a new cast of ``x``)."""
    cd = compute_dtype(torch.promote_types(x.dtype, dt.dtype))
    A_c, D_c = (None if t is None else t.detach().to(cd) for t in (A, D))
    dt_k, B_k, C_k = (t.detach().to(kernel_dtype or cd) for t in (dt, B, C))
    bias = None if dt_bias is None else dt_bias.detach().to(cd)
    x_k = None if x_kernel is None else x_kernel.detach()
    return ReversedAdjointScan.apply(x, dt_k, A_c, B_k, C_k, D_c, kernel, layout, bias, x_k)
