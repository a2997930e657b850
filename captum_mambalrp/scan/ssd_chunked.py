"""Mamba2's SSD scan in its chunked matrix form (torch; the ``torch`` backend's SSD kernel).

With a scalar decay per head, ``a_t = dt_t A`` (Mamba2's SSD), the scan

    h_t = exp(a_t) h_{t-1} + dt_t x_t B_t,      y_t = <C_t, h_t> + D x_t

is a matrix product in chunks of ``T`` steps (Dao and Gu, 2024). With the prefix sums
``s_i = a_1 + ... + a_i`` inside a chunk and ``H`` the state entering it,

    y_i = sum_{j <= i} <C_i, B_j> exp(s_i - s_j) dt_j x_j  +  exp(s_i) <C_i, H>

and the states at chunk ends follow ``H_c = exp(s_T of chunk c) H_{c-1} + S_c`` with
``S_c = sum_j exp(s_T - s_j) dt_j x_j B_j`` (:func:`decay_scan_`, in place, two levels).
The products are batched matrix products (``torch.einsum``) laid out so that no large
tensor is permuted in memory; everything is float32 (float64 for float64 inputs). Within a chunk ``s_i - s_j`` is a
difference of sums of at most ``T`` steps, as in mamba-ssm's kernels.

Used forward-only for a relevance pass: its gradient for x is the same function on the reversed
problem (:mod:`.adjoint`), so nothing is kept for the backward pass but dt, A, B, C, D. With
``differentiable=True`` the same products run out of place, so that autograd differentiates them
in every input (the rules that keep the SSM's parameters in the graph: Gradient x Input, the
SSM-rule ablation): saved tensors of ``O(b l h (p + T))`` instead of the step-by-step scan's
``O(b l h p n)``.
"""

from __future__ import annotations

import math
import os
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..kernels import fused_kernels_enabled
from .precision import compute_dtype

#: Steps per chunk of the SSD matrix form.
CHUNK = 64

#: the environment variable that turns off (``"0"``) the Triton kernel of :func:`decay_scan_`
DECAY_KERNEL_ENV = "CAPTUM_MAMBALRP_DECAY_KERNEL"
#: the environment variable that turns off (``"0"``) the Triton kernel of the chunked form's
#: outputs (:mod:`.triton_ssd`)
SSD_KERNEL_ENV = "CAPTUM_MAMBALRP_SSD_KERNEL"
#: The longest chunk :mod:`.triton_ssd` takes (its ``[T, T]`` decay matrix lives in registers:
#: 128 ran slower than 64 on the H200, 256 does not fit its shared memory)
MAX_KERNEL_CHUNK = 64


def _pad_time(t: Tensor, pad: int) -> Tensor:
    """Zero steps appended along axis 1 (a zero step neither decays nor adds)."""
    if pad == 0:
        return t
    return F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad))


def decay_scan_(u: Tensor, decay: Tensor) -> Tensor:
    """In place along axis 1: ``u_t <- decay_t * u_{t-1} + u_t`` (``u [b, t, ...]``, ``decay``
    broadcastable to it). Two levels of about ``sqrt(t)`` sequential steps each: within
    blocks (all blocks at once), then across block ends, then one correction. A float32 ``u``
    on CUDA is solved by one Triton kernel instead (:mod:`.triton_decay`: one read and one write
    of ``u``), unless ``CAPTUM_MAMBALRP_DECAY_KERNEL=0``.

    >>> u = torch.ones(1, 4)
    >>> decay_scan_(u, torch.full((1, 4), 0.5))
    tensor([[1.0000, 1.5000, 1.7500, 1.8750]])
    """
    if _decay_kernel_applies(u, decay):
        from .triton_decay import decay_scan_ as kernel

        return kernel(u, decay)
    t = u.shape[1]
    block = max(1, math.isqrt(t))
    blocks = t // block
    done = 1
    if blocks > 1 and block > 1:
        ub = u[:, : blocks * block].unflatten(1, (blocks, block))
        db = decay[:, : blocks * block].unflatten(1, (blocks, block))
        for i in range(1, block):
            ub[:, :, i].addcmul_(db[:, :, i], ub[:, :, i - 1])
        carried = db.cumprod(dim=2)  # decay from a block's start to each of its steps
        for k in range(1, blocks):
            ub[:, k, -1].addcmul_(carried[:, k, -1], ub[:, k - 1, -1])
        ub[:, 1:, :-1].addcmul_(carried[:, 1:, :-1], ub[:, :-1, -1:])
        done = blocks * block
    for s in range(done, t):
        u[:, s].addcmul_(decay[:, s], u[:, s - 1])
    return u


def _decay_kernel_applies(u: Tensor, decay: Tensor) -> bool:
    """May :mod:`.triton_decay` solve ``decay_scan_(u, decay)``? Not turned off
    (``CAPTUM_MAMBALRP_DECAY_KERNEL=0``), no gradient to record (the package calls it inside its
    adjoint scan's own backward), float32, at most 6 axes, more than one step, where the fused
    kernels run (CUDA, or Triton's interpreter). On by default: docs/usage.md says why."""
    return (
        os.environ.get(DECAY_KERNEL_ENV, "1") != "0"
        # its in-place writes are not recorded by autograd: the torch form where a gradient may flow
        and not (torch.is_grad_enabled() and (u.requires_grad or decay.requires_grad))
        and u.dtype == decay.dtype == torch.float32
        and 2 <= u.dim() <= 6
        and u.shape[1] > 1
        and fused_kernels_enabled(u, decay)
    )


def _ssd_kernel_applies(
    x: Tensor,
    dt: Tensor,
    B: Tensor,
    C: Tensor,
    cd: torch.dtype,
    differentiable: bool,
    chunk: int = CHUNK,
    constants: Tuple[Optional[Tensor], ...] = (),
) -> bool:
    """May :mod:`.triton_ssd` compute :func:`ssd_chunked`? Not turned off
    (``CAPTUM_MAMBALRP_SSD_KERNEL=0``), the forward-only form with no gradient to record (in x, dt,
    B, C or ``constants``, i.e. A and D), a float32 computation, chunks of at most
    :data:`MAX_KERNEL_CHUNK` steps (a chunk's decay matrix is held in registers), a non-empty
    input, where the fused kernels run (CUDA, or Triton's interpreter)."""
    operands = (x, dt, B, C) + tuple(t for t in constants if t is not None)
    return (
        os.environ.get(SSD_KERNEL_ENV, "1") != "0"
        and not differentiable
        and not (torch.is_grad_enabled() and any(t.requires_grad for t in operands))
        and cd == torch.float32
        and chunk <= MAX_KERNEL_CHUNK
        and x.numel() > 0
        and fused_kernels_enabled(x, dt, B, C)
    )


def decay_scan(u: Tensor, decay: Tensor) -> Tensor:
    """:func:`decay_scan_` out of place, step by step along axis 1 (for autograd; the chunk ends
    of :func:`ssd_chunked` are few: one per ``CHUNK`` steps)."""
    out = [u[:, 0]]
    for t in range(1, u.shape[1]):
        out.append(torch.addcmul(u[:, t], decay[:, t], out[-1]))
    return torch.stack(out, 1)


def ssd_chunked(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Optional[Tensor] = None,
    chunk: int = CHUNK,
    differentiable: bool = False,
) -> Tensor:
    """The SSD scan, ``x [b, l, h, p]``, ``dt [b, l, h]`` (final), ``A [h]``,
    ``B, C [b, l, g, n]``, ``D [h]`` or ``[h, p]`` -> ``y [b, l, h, p]`` in float32 (float64 for
    float64 inputs). ``differentiable``: no in-place steps, so that autograd can differentiate
    it in x, dt, A, B, C and D (the relevance pass runs it forward-only, in place)."""
    b, length, heads, p = x.shape
    groups, n = B.shape[2], B.shape[3]
    hg = heads // groups  # heads per group share B and C
    cd = compute_dtype(torch.promote_types(x.dtype, dt.dtype))
    pad = (-length) % chunk
    nc = (length + pad) // chunk
    if _ssd_kernel_applies(x, dt, B, C, cd, differentiable, chunk, (A, D)):
        return _ssd_triton(x, dt, A, B, C, D, chunk)
    x32, dt32 = x.to(cd), dt.to(cd)
    xdt = _pad_time(x32 * dt32[..., None], pad).view(b, nc, chunk, groups, hg, p)
    a = _pad_time(dt32 * A.to(cd), pad).view(b, nc, chunk, groups, hg)
    s = a.permute(0, 1, 3, 4, 2).cumsum(-1)  # [b, c, g, h, T]
    Bc = _pad_time(B.to(cd), pad).view(b, nc, chunk, groups, n)
    Cc = _pad_time(C.to(cd), pad).view(b, nc, chunk, groups, n)
    # within each chunk: y_i = sum_j <C_i, B_j> exp(s_i - s_j) dt_j x_j
    causal = torch.ones(chunk, chunk, dtype=torch.bool, device=x.device).tril()
    gaps = (s[..., :, None] - s[..., None, :]).masked_fill_(~causal, float("-inf"))
    cb = torch.einsum("bcign,bcjgn->bcgij", Cc, Bc)[:, :, :, None]
    weights = gaps.exp() * cb if differentiable else gaps.exp_().mul_(cb)
    y = torch.einsum("bcghij,bcjghp->bcghip", weights, xdt)
    del weights, gaps
    # what each chunk adds to the state at its end, then the state at each chunk's end
    to_end = torch.exp(s[..., -1:] - s).permute(0, 1, 4, 2, 3)[..., None]  # [b, c, j, g, h, 1]
    states = torch.einsum("bcjgn,bcjghp->bcgnhp", Bc, xdt * to_end)
    chunk_decay = torch.exp(s[..., -1])[:, :, :, None, :, None]
    states = decay_scan(states, chunk_decay) if differentiable else decay_scan_(states, chunk_decay)
    # the state entering chunk c is the end state of chunk c - 1 (chunk 0 starts from zero)
    if nc > 1:
        entering = torch.einsum("bcign,bcgnhp->bcghip", Cc[:, 1:], states[:, :-1])
        y[:, 1:].addcmul_(torch.exp(s[:, 1:])[..., None], entering)
    # back to [b, l, h, p], with D x added in the same pass
    if differentiable:
        y = y.permute(0, 1, 4, 2, 3, 5)
        if D is not None:
            y = y + D.to(cd).reshape(groups, hg, -1) * _pad_time(x32, pad).view(b, nc, chunk, groups, hg, p)
        return y.reshape(b, nc * chunk, heads, p)[:, :length]
    out = torch.empty(b, nc * chunk, heads, p, dtype=cd, device=x.device)
    blocked = out.view(b, nc, chunk, groups, hg, p)
    y = y.permute(0, 1, 4, 2, 3, 5)
    if D is None:
        blocked.copy_(y)
    else:
        Dx = D.to(cd).reshape(groups, hg, -1)  # per head ([h]) or per channel ([h, p])
        torch.addcmul(y, Dx, _pad_time(x32, pad).view(b, nc, chunk, groups, hg, p), out=blocked)
    return out[:, :length]


def _ssd_triton(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor], chunk: int) -> Tensor:
    """:func:`ssd_chunked`'s forward-only form with its outputs by one Triton kernel
    (:mod:`.triton_ssd`); the prefix sums, the chunk products ``<C_i, B_j>``, the chunks' own
    states and the chunk-end recurrence as in the torch form."""
    from .triton_ssd import chunk_outputs

    b, length, heads, p = x.shape
    groups, n = B.shape[2], B.shape[3]
    hg = heads // groups
    pad = (-length) % chunk
    nc = (length + pad) // chunk
    dt32 = _pad_time(dt.float(), pad).view(b, nc, chunk, heads)
    s = (dt32 * A.float()).transpose(2, 3).cumsum(-1).contiguous()  # [b, c, h, T]
    Bc = _pad_time(B.float(), pad).view(b, nc, chunk, groups, n)
    Cc = _pad_time(C.float(), pad).view(b, nc, chunk, groups, n)
    cb = torch.einsum("bcign,bcjgn->bcgij", Cc, Bc).contiguous()
    # what each chunk adds to the state at its end: sum_j B_j (exp(s_T - s_j) dt_j x_j)
    to_end = dt32 * torch.exp(s[..., -1:] - s).transpose(2, 3)  # [b, c, T, h]
    xw = (_pad_time(x.float(), pad).view(b, nc, chunk, heads, p) * to_end[..., None]).view(b, nc, chunk, groups, hg, p)
    states = torch.einsum("bcjgn,bcjghp->bcgnhp", Bc, xw).contiguous()
    del xw
    decay_scan_(states, torch.exp(s[..., -1]).view(b, nc, groups, 1, hg, 1))
    return chunk_outputs(x, dt, C, s, cb, states, D, chunk)
