"""A relevance scan from any forward-only scan kernel: the adjoint is a reversed scan.

With dt, A, B, C constant, the gradient of the scan for x is the adjoint recurrence
(see :mod:`.linear_scan`)::

    u_t = exp(dt_{t+1} A) u_{t+1} + g_t C_t,        dx_t = dt_t <B_t, u_t> + D g_t

Run backwards in time (``s = L - 1 - t``) this *is* a forward selective scan::

    h_s = exp(dt'_s A) h_{s-1} + dt'_s x'_s B'_s,   y'_s = <C'_s, h_s>

with ``dt'_s = dt_{t+1}`` (any positive value at ``t = L - 1``, where the carried state is
zero), ``x'_s = g_t / dt'_s``, ``B' = C``, ``C' = B`` reversed, and
``dx_t = dt_t y'_{L-1-t} + D g_t``. So a fast forward kernel (mamba-ssm's) serves the
backward pass as well, computing nothing but dx (its own backward computes the gradients
of delta, A, B, C and D too, which MambaLRP discards). ``dt'`` is floored at
``DT_FLOOR``: a step that small decays by ``exp(DT_FLOOR * A) == 1`` in float32 (for
``|A| < 1e12``), so only the division ``g / dt'`` is kept finite.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

#: Smallest step size used in the reversed scan (keeps ``g / dt`` finite where dt underflowed).
DT_FLOOR = 1e-20

ForwardKernel = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor, Optional[Tensor]], Tensor]


def _next_steps(dt: Tensor, time: int) -> Tensor:
    """``dt_{t+1}`` along ``time`` (1 at the last step), reversed in time, floored."""
    length = dt.shape[time]
    tail = torch.ones_like(dt.narrow(time, 0, 1))
    shifted = torch.cat([dt.narrow(time, 1, length - 1), tail], dim=time)
    return shifted.flip(time).clamp_min_(DT_FLOOR)


def reversed_adjoint(
    forward: ForwardKernel, g: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
    time: int, dt_to_x: Callable[[Tensor], Tensor], D_to_x: Callable[[Tensor], Tensor],
) -> Tensor:
    """``d<g, y>/dx`` of the scan ``y = forward(x, dt, A, B, C, D)``, computed by one call of
    ``forward`` on the reversed problem. ``time`` is the time axis of ``g``, ``dt``, ``B`` and
    ``C`` (the same index in the kernel's layout); ``dt_to_x`` / ``D_to_x`` broadcast dt and
    D against x. Float32 in, float32 out."""
    dt_rev = _next_steps(dt, time)
    x_rev = g.flip(time) / dt_to_x(dt_rev)
    y_rev = forward(x_rev, dt_rev, A, C.flip(time), B.flip(time), None)
    grad = y_rev.flip(time) * dt_to_x(dt)
    return grad if D is None else grad + D_to_x(D) * g


class ReversedAdjointScan(torch.autograd.Function):
    """A forward-only scan kernel as a relevance scan: forward ``y = kernel(x, ...)``,
    backward ``dx`` by :func:`reversed_adjoint` (gradient for x only; dt, A, B, C, D constant)."""

    @staticmethod
    def forward(ctx, x, dt, A, B, C, D, kernel, time, dt_to_x, D_to_x):  # type: ignore[override]
        ctx.save_for_backward(dt, A, B, C, D)
        ctx.kernel, ctx.time, ctx.dt_to_x, ctx.D_to_x, ctx.x_dtype = kernel, time, dt_to_x, D_to_x, x.dtype
        return kernel(x.float(), dt, A, B, C, D)

    @staticmethod
    def backward(ctx, grad_y):  # type: ignore[override]
        dt, A, B, C, D = ctx.saved_tensors
        with torch.no_grad():
            grad_x = reversed_adjoint(ctx.kernel, grad_y.float(), dt, A, B, C, D, ctx.time, ctx.dt_to_x, ctx.D_to_x)
        return (grad_x.to(ctx.x_dtype),) + (None,) * 9
