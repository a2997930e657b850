"""Mamba1's selective scan, for relevance and for the plain gradient.

Layout (that of mamba-ssm's kernels and transformers): ``x, delta: [b, d, l]``,
``A: [d, n]``, ``B, C: [b, n, l]``, ``D: [d]``. ``delta`` is final (bias and softplus
applied). The output is float32 ``[b, d, l]``:

    h_t = exp(delta_t * A) * h_{t-1} + delta_t * B_t * x_t,    y_t = C_t . h_t + D * x_t

:func:`relevance_scan` treats delta, A, B, C as constants (MambaLRP's SSM rule). Its
backward pass computes only the gradient with respect to ``x``, by the adjoint scan

    u_t = C_t * g_t + exp(delta_{t+1} * A) * u_{t+1},    dx_t = delta_t * (B_t . u_t) + D * g_t

recomputing the decays chunk by chunk, so nothing of size ``b x d x l x n`` is kept
between forward and backward: memory is ``O(b d l)`` plus one chunk of states.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .recurrence import linear_recurrence

DEFAULT_CHUNK = 64


def _decay(delta: Tensor, A: Tensor) -> Tensor:
    """``exp(delta_t * A)`` for a chunk of steps: ``[b, d, T]`` x ``[d, n]`` -> ``[b, d, T, n]``."""
    return torch.exp(delta.unsqueeze(-1) * A[None, :, None, :])


def _outer(v: Tensor, M: Tensor) -> Tensor:
    """``v_t * M_t`` per channel: ``[b, d, T]`` x ``[b, T, n]`` -> ``[b, d, T, n]``."""
    return v.unsqueeze(-1) * M.unsqueeze(1)


def scan_forward(
    x: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor], chunk: int = DEFAULT_CHUNK
) -> Tensor:
    """The scan in float32, chunk by chunk (differentiable in every argument)."""
    x, delta, A = x.float(), delta.float(), A.float()
    Bt, Ct = B.float().transpose(1, 2), C.float().transpose(1, 2)  # [b, l, n]
    length = x.shape[-1]
    h = x.new_zeros(x.shape[0], x.shape[1], A.shape[-1])
    outputs = []
    for s in range(0, length, chunk):
        e = min(s + chunk, length)
        dt = delta[:, :, s:e]
        states, h = linear_recurrence(_decay(dt, A), _outer(dt * x[:, :, s:e], Bt[:, s:e]), h)
        outputs.append(torch.einsum("bdtn,btn->bdt", states, Ct[:, s:e]))
    y = torch.cat(outputs, dim=-1)
    if D is not None:
        y = y + D.float()[None, :, None] * x
    return y


def scan_input_gradient(
    grad_y: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor], chunk: int = DEFAULT_CHUNK
) -> Tensor:
    """``dL/dx`` of :func:`scan_forward` with delta, A, B, C constant (the adjoint scan)."""
    g, delta, A = grad_y.float(), delta.float(), A.float()
    Bt, Ct = B.float().transpose(1, 2), C.float().transpose(1, 2)
    length = g.shape[-1]
    u = g.new_zeros(g.shape[0], g.shape[1], A.shape[-1])
    # the adjoint's decay at step t is the forward decay of step t + 1 (none after the end)
    next_delta = torch.nn.functional.pad(delta[:, :, 1:], (0, 1))
    grads = []
    for e in range(length, 0, -chunk):
        s = max(e - chunk, 0)
        states, u = linear_recurrence(
            _decay(next_delta[:, :, s:e], A), _outer(g[:, :, s:e], Ct[:, s:e]), u, reverse=True
        )
        grads.append(delta[:, :, s:e] * torch.einsum("bdtn,btn->bdt", states, Bt[:, s:e]))
    grad_x = torch.cat(grads[::-1], dim=-1)
    if D is not None:
        grad_x = grad_x + D.float()[None, :, None] * g
    return grad_x


class _RelevanceScan(torch.autograd.Function):
    """Forward: the scan. Backward: gradient for ``x`` only (parameters are constants)."""

    @staticmethod
    def forward(ctx, x, delta, A, B, C, D, chunk):  # type: ignore[override]
        ctx.save_for_backward(delta, A, B, C, D)
        ctx.chunk = chunk
        ctx.x_dtype = x.dtype
        with torch.no_grad():
            return scan_forward(x, delta, A, B, C, D, chunk)

    @staticmethod
    def backward(ctx, grad_y):  # type: ignore[override]
        delta, A, B, C, D = ctx.saved_tensors
        with torch.no_grad():
            grad_x = scan_input_gradient(grad_y, delta, A, B, C, D, ctx.chunk)
        return grad_x.to(ctx.x_dtype), None, None, None, None, None, None


def relevance_scan(
    x: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor] = None, chunk: int = DEFAULT_CHUNK
) -> Tensor:
    """The scan with delta, A, B, C, D constant: linear in ``x``, memory ``O(b d l)``."""
    D = None if D is None else D.detach()
    return _RelevanceScan.apply(x, delta.detach(), A.detach(), B.detach(), C.detach(), D, chunk)
