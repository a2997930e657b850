"""The selective scan in one canonical layout, shared by Mamba1 and Mamba2.

Canonical tensors (time is the last axis of ``x``, the one before last of states)::

    x  [..., l]        the scan input (Mamba1: [b, d, l]; Mamba2: [b, h, p, l])
    dt [..., l]        step sizes, broadcastable to x (Mamba2: one per head)
    A  [..., n]        decay rates, broadcastable to states [..., l, n] after dt[..., None]
    B, C [..., l, n]   input and output maps, broadcastable to states
    D  broadcastable to x, or None

    h_t = exp(dt_t A) * h_{t-1} + dt_t x_t B_t,     y_t = <C_t, h_t> + D x_t

:func:`relevance_scan` treats dt, A, B, C, D as constants (MambaLRP's SSM rule); its
backward is the adjoint scan, also a linear recurrence run in reverse::

    u_t = g_t C_t + exp(dt_{t+1} A) * u_{t+1},     dx_t = dt_t <B_t, u_t> + D g_t

Decays and states are formed chunk by chunk and recomputed in the backward pass, so
nothing of size ``x.numel() * n`` is kept between forward and backward.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .recurrence import linear_recurrence

DEFAULT_CHUNK = 64


def _scan(v: Tensor, dt: Tensor, A: Tensor, M_in: Tensor, M_out: Tensor, scale_in: bool, chunk: int, reverse: bool) -> Tensor:
    """``sum_n M_out * h`` with ``h_t = exp(dt' A) h + (dt v if scale_in else v) M_in``.

    Forward: ``M_in = B``, ``M_out = C``, ``dt`` scales the input. Adjoint (``reverse``):
    ``M_in = C``, ``M_out = B``, the decay is that of the next step and ``dt`` scales the
    readout (done by the caller).
    """
    length = v.shape[-1]
    decay_dt = torch.nn.functional.pad(dt[..., 1:], (0, 1)) if reverse else dt
    h = None
    outputs = []
    bounds = [(s, min(s + chunk, length)) for s in range(0, length, chunk)]
    for s, e in (reversed(bounds) if reverse else bounds):
        step = dt[..., s:e] if scale_in else 1.0
        inputs = (step * v[..., s:e]).unsqueeze(-1) * M_in[..., s:e, :]
        decay = torch.exp(decay_dt[..., s:e].unsqueeze(-1) * A)
        states, h = linear_recurrence(decay, inputs, h, reverse=reverse)
        outputs.append((states * M_out[..., s:e, :]).sum(-1))
    return torch.cat(outputs[::-1] if reverse else outputs, dim=-1)


def scan_forward(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor], chunk: int = DEFAULT_CHUNK) -> Tensor:
    """The scan in float32 (differentiable in every argument)."""
    x = x.float()
    y = _scan(x, dt.float(), A.float(), B.float(), C.float(), scale_in=True, chunk=chunk, reverse=False)
    return y if D is None else y + D.float() * x


def scan_input_gradient(g: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor], chunk: int = DEFAULT_CHUNK) -> Tensor:
    """``d<g, y>/dx`` with dt, A, B, C, D constant: the adjoint scan."""
    g, dt = g.float(), dt.float()
    grad = dt * _scan(g, dt, A.float(), C.float(), B.float(), scale_in=False, chunk=chunk, reverse=True)
    return grad if D is None else grad + D.float() * g


class _RelevanceScan(torch.autograd.Function):
    """Forward: the scan. Backward: the gradient for ``x`` only."""

    @staticmethod
    def forward(ctx, x, dt, A, B, C, D, chunk):  # type: ignore[override]
        ctx.save_for_backward(dt, A, B, C, D)
        ctx.chunk, ctx.x_dtype = chunk, x.dtype
        with torch.no_grad():
            return scan_forward(x, dt, A, B, C, D, chunk)

    @staticmethod
    def backward(ctx, grad_y):  # type: ignore[override]
        dt, A, B, C, D = ctx.saved_tensors
        with torch.no_grad():
            grad_x = scan_input_gradient(grad_y, dt, A, B, C, D, ctx.chunk)
        return grad_x.to(ctx.x_dtype), None, None, None, None, None, None


def relevance_scan(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor] = None, chunk: int = DEFAULT_CHUNK) -> Tensor:
    """The scan with dt, A, B, C, D constant: linear in ``x``; memory ``O(x)``."""
    D = None if D is None else D.detach()
    return _RelevanceScan.apply(x, dt.detach(), A.detach(), B.detach(), C.detach(), D, chunk)
