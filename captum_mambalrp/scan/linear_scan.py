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

How it runs (the torch backend, CPU or GPU): everything is turned time-major once
(``[l, ..., n]``), then the time axis is cut into chunks of ``chunk`` steps. For each
chunk the decays ``exp(dt A)`` and the inputs ``dt x B`` of its steps are formed
(``[chunk, ..., n]``, a block that stays in cache), the recurrence runs in place over
that block, one fused ``addcmul`` per step, and the readout ``<C, h>`` is a batched
matrix-vector product. Only the last state crosses to the next chunk, so no tensor of
size ``x.numel() * n`` ever exists, and the backward pass recomputes the blocks: the
memory kept between forward and backward is dt, B, C (``O(x)``).
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from .precision import compute_dtype
from .recurrence import linear_recurrence

#: Steps per chunk, chosen by measurement (benchmarks/cpu_scan_chunks.py): blocks of
#: ``chunk x d x n`` floats that stay in cache while the recurrence runs over them.
DEFAULT_CHUNK = 16


def _readout(states: Tensor, M: Tensor) -> Tensor:
    """``sum_n states * M`` over the last axis: a batched mat-vec when ``M`` broadcasts
    over the axis before ``n`` (both layouts), else multiply and sum."""
    if M.dim() == states.dim() and M.shape[-2] == 1:
        return torch.matmul(states, M.transpose(-1, -2)).squeeze(-1)
    return (states * M).sum(-1)


def _scan_time_major(
    v: Tensor,
    dt: Tensor,
    A: Tensor,
    M_in: Tensor,
    M_out: Tensor,
    reverse: bool,
    chunk: int,
    inplace: bool,
    h0: Optional[Tensor] = None,
    state: Optional[List[Tensor]] = None,
) -> Tensor:
    """``r_t = <M_out_t, h_t>`` with ``h_t = exp(dt A) h_{t-/+1} + v_t M_in_t``, time-major.

    ``v [l, ...]`` (already scaled by dt in the forward scan), ``dt [l, ...]`` and
    ``M_in, M_out [l, ..., n]`` broadcast against ``v[..., None]``. Forward: the decay of
    step t is ``exp(dt_t A)``; reverse (the adjoint): the state of step t+1 reaches step
    t through ``exp(dt_{t+1} A)``.

    ``h0``: the state before the first step (forward) or after the last (reverse: it enters
    the last step undecayed, ``h_{l-1} = v_{l-1} M_in_{l-1} + h0``); none: zero. ``state``: a
    list that receives the last state reached (forward ``h_{l-1}``; reverse ``h_0``).
    """
    length = v.shape[0]
    h: Optional[Tensor] = h0
    if reverse and h0 is not None:  # the carried state enters the last step with decay 1: dt_l = 0
        dt = torch.cat([dt, torch.zeros_like(dt[:1])], dim=0)
    out: Optional[Tensor] = None
    pieces = []
    bounds = [(s, min(s + chunk, length)) for s in range(0, length, chunk)]
    for s, e in reversed(bounds) if reverse else bounds:
        inputs = v[s:e].unsqueeze(-1) * M_in[s:e]
        step_dt = dt[s + 1 : e + 1] if reverse else dt[s:e]
        decay = (step_dt.unsqueeze(-1) * A).exp_() if inplace else torch.exp(step_dt.unsqueeze(-1) * A)
        states = linear_recurrence(decay, inputs, h, reverse=reverse, inplace=inplace)
        h = states[0] if reverse else states[-1]
        if inplace:
            h = h.clone()
        r = _readout(states, M_out[s:e])
        if not inplace:  # keep the graph: concatenate
            pieces.append(r)
            continue
        if out is None:
            out = r.new_empty((length,) + tuple(r.shape[1:]))
        out[s:e] = r
    if state is not None and h is not None:
        state.append(h)
    if not inplace:
        if reverse:
            pieces.reverse()
        return torch.cat(pieces, dim=0)
    assert out is not None
    return out


def _lead(t: Tensor, ndim: int) -> Tensor:
    """``t`` with leading size-1 axes up to ``ndim`` axes (so that moving time keeps alignment)."""
    return t.reshape((1,) * (ndim - t.dim()) + tuple(t.shape)) if t.dim() < ndim else t


def _time_major(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor):
    """Canonical tensors moved to ``[l, ...]`` (states ``[l, ..., n]``); A loses its time axis."""
    k = x.dim()
    return (
        x.movedim(-1, 0),
        _lead(dt, k).movedim(-1, 0),
        _lead(A, k + 1).squeeze(-2),
        _lead(B, k + 1).movedim(-2, 0),
        _lead(C, k + 1).movedim(-2, 0),
    )


def scan_forward(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Optional[Tensor],
    chunk: int = DEFAULT_CHUNK,
    h0: Optional[Tensor] = None,
    state: Optional[List[Tensor]] = None,
) -> Tensor:
    """The scan in ``compute_dtype`` (float32; float64 for float64 inputs). Differentiable in
    every argument when any needs a gradient (the plain-gradient ablation keeps every state
    then); otherwise memory-lean. ``h0 [..., n]``: the state before the first step (a piece of
    a longer sequence); ``state``: a list that receives the last state ``h_{l-1}``."""
    cd = compute_dtype(torch.promote_types(x.dtype, dt.dtype))
    x, dt, A, B, C = x.to(cd), dt.to(cd), A.to(cd), B.to(cd), C.to(cd)
    h0 = None if h0 is None else h0.to(cd)
    inplace = not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, dt, A, B, C, h0)))
    xt, dtt, At, Bt, Ct = _time_major(x, dt, A, B, C)
    y = _scan_time_major(dtt * xt, dtt, At, Bt, Ct, reverse=False, chunk=chunk, inplace=inplace, h0=h0, state=state)
    y = y.movedim(0, -1)
    return y if D is None else y + D.to(cd) * x


def scan_input_gradient(
    g: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Optional[Tensor],
    chunk: int = DEFAULT_CHUNK,
    grad_state: Optional[Tensor] = None,
    state: Optional[List[Tensor]] = None,
) -> Tensor:
    """``d<g, y>/dx`` with dt, A, B, C, D constant: the adjoint scan (no graph).

    With a carried state (a piece of a longer sequence): ``grad_state`` is the gradient
    reaching the piece's last state ``h_{l-1}`` (it joins the adjoint at the last step,
    ``u_{l-1} = g_{l-1} C_{l-1} + grad_state``), and ``state`` receives the gradient for the
    state before the piece, ``exp(dt_0 A) u_0``."""
    cd = compute_dtype(torch.promote_types(g.dtype, dt.dtype))
    g, dt = g.to(cd), dt.to(cd)
    gt, dtt, At, Bt, Ct = _time_major(g, dt, A.to(cd), B.to(cd), C.to(cd))
    gs = None if grad_state is None else grad_state.to(cd)
    first: List[Tensor] = []
    with torch.no_grad():
        u = _scan_time_major(gt, dtt, At, Ct, Bt, reverse=True, chunk=chunk, inplace=True, h0=gs, state=first)
        if state is not None:  # u_0 back through step 0's decay
            state.append((dtt[0].unsqueeze(-1) * At).exp_() * first[0])
    grad = dt * u.movedim(0, -1)
    return grad if D is None else grad + D.to(cd) * g


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


def relevance_scan(
    x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor] = None, chunk: int = DEFAULT_CHUNK
) -> Tensor:
    """The scan with dt, A, B, C, D constant: linear in ``x``; memory ``O(x)``."""
    D = None if D is None else D.detach()
    return _RelevanceScan.apply(x, dt.detach(), A.detach(), B.detach(), C.detach(), D, chunk)


class _RelevanceScanState(torch.autograd.Function):
    """:class:`_RelevanceScan` for a piece of a sequence: from the carried state ``h0``, also
    returning the last state; backward: the gradients for ``x`` and ``h0``."""

    @staticmethod
    def forward(ctx, x, h0, dt, A, B, C, D, chunk):  # type: ignore[override]
        ctx.save_for_backward(dt, A, B, C, D)
        ctx.chunk, ctx.x_dtype, ctx.h_dtype = chunk, x.dtype, None if h0 is None else h0.dtype
        last: List[Tensor] = []
        with torch.no_grad():
            y = scan_forward(x, dt, A, B, C, D, chunk, h0=h0, state=last)
        return y, last[0]

    @staticmethod
    def backward(ctx, grad_y, grad_h):  # type: ignore[override]
        dt, A, B, C, D = ctx.saved_tensors
        first: List[Tensor] = []
        with torch.no_grad():
            grad_x = scan_input_gradient(grad_y, dt, A, B, C, D, ctx.chunk, grad_state=grad_h, state=first)
        grad_h0 = None if ctx.h_dtype is None else first[0].to(ctx.h_dtype)
        return grad_x.to(ctx.x_dtype), grad_h0, None, None, None, None, None, None


def relevance_scan_state(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Optional[Tensor] = None,
    h0: Optional[Tensor] = None,
    chunk: int = DEFAULT_CHUNK,
) -> Tuple[Tensor, Tensor]:
    """:func:`relevance_scan` on a piece of a sequence: ``(y, h_last)`` from the state ``h0``
    (``[..., n]``, the broadcast shape of ``x[..., None]`` and the states; ``None``: zero), linear
    in ``(x, h0)`` (dt, A, B, C, D constant); the gradients flow to ``x`` and ``h0``.

    Returns:
        ``y`` as :func:`relevance_scan`, and the state after the last step (compute dtype).

    >>> x, dt = torch.randn(1, 2, 6), torch.rand(1, 2, 6)
    >>> A, B, C = -torch.rand(2, 1, 3), torch.randn(1, 1, 6, 3), torch.randn(1, 1, 6, 3)
    >>> y1, h = relevance_scan_state(x[..., :4], dt[..., :4], A, B[..., :4, :], C[..., :4, :])
    >>> y2, _ = relevance_scan_state(x[..., 4:], dt[..., 4:], A, B[..., 4:, :], C[..., 4:, :], h0=h)
    >>> torch.allclose(torch.cat([y1, y2], -1), relevance_scan(x, dt, A, B, C), atol=1e-6)
    True
    """
    D = None if D is None else D.detach()
    return _RelevanceScanState.apply(x, h0, dt.detach(), A.detach(), B.detach(), C.detach(), D, chunk)
