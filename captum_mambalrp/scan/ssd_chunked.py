"""Mamba2's SSD scan in its chunked matrix form (torch; the ``torch`` backend's SSD kernel).

With a scalar decay per head, ``a_t = dt_t A`` (Mamba2's SSD), the scan

    h_t = exp(a_t) h_{t-1} + dt_t x_t B_t,      y_t = <C_t, h_t> + D x_t

is a matrix product in chunks of ``T`` steps (Dao and Gu, 2024). With ``S(i, j) =
a_{j+1} + ... + a_i`` (``-inf`` for ``j > i``), inside a chunk

    y_i = sum_{j <= i} <C_i, B_j> exp(S(i, j)) dt_j x_j  +  exp(a_1 + ... + a_i) <C_i, H_in>

where ``H_in`` is the state entering the chunk. The states at chunk ends follow the
first-order recurrence ``H_c = exp(sum of a over chunk c) H_{c-1} + (what chunk c adds)``,
solved by :func:`decay_scan` the same way (blocks in matrix form, block ends recursively).
Everything is a batched matrix product (``torch.einsum``), so it runs on the GPU's matrix
pipelines instead of step by step; the segment sums are formed by masked cumulative sums
(no difference of two large prefix sums), and float32 throughout.

Used forward-only: its gradient for x is the same function on the reversed problem
(:mod:`.adjoint`), so nothing is kept for the backward pass but dt, A, B, C, D.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

#: Steps per chunk of the SSD matrix form, and per block of :func:`decay_scan`.
CHUNK = 64


def segment_sums(a: Tensor) -> Tensor:
    """``S[..., i, j] = a[..., j+1] + ... + a[..., i]`` for ``j <= i``, ``-inf`` above the diagonal."""
    T = a.shape[-1]
    rows = a[..., :, None].expand(*a.shape, T)  # rows[..., k, j] = a_k
    below = torch.tril(torch.ones(T, T, dtype=torch.bool, device=a.device), diagonal=-1)
    sums = rows.masked_fill(~below, 0.0).cumsum(dim=-2)  # sum over j < k <= i
    return sums.masked_fill(~torch.tril(torch.ones_like(below), diagonal=0), float("-inf"))


def _pad_time(t: Tensor, pad: int) -> Tensor:
    """Zero steps appended along axis 1 (a zero step neither decays nor adds)."""
    if pad == 0:
        return t
    return F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad))


def decay_scan(u: Tensor, a: Tensor, block: int = CHUNK) -> Tensor:
    """``s_t = exp(a_t) s_{t-1} + u_t`` along axis 1 (``s_{-1} = 0``): ``u [b, t, h, f]``,
    ``a [b, t, h]`` -> ``s [b, t, h, f]``, in blocks of ``block`` steps."""
    b, t, h, f = u.shape
    pad = (-t) % block
    nb = (t + pad) // block
    ub = _pad_time(u, pad).view(b, nb, block, h, f)
    ab = _pad_time(a, pad).view(b, nb, block, h).permute(0, 1, 3, 2)  # [b, nb, h, block]
    weights = torch.exp(segment_sums(ab))  # [b, nb, h, i, j]
    local = torch.einsum("bkhij,bkjhf->bkihf", weights, ub)
    if nb > 1:  # the state entering each block: the same recurrence over block ends
        ends = decay_scan(local[:, :, -1], ab.sum(-1), block)
        entering = torch.cat([torch.zeros_like(ends[:, :1]), ends[:, :-1]], dim=1)
        local = local + torch.exp(ab.cumsum(-1)).permute(0, 1, 3, 2)[..., None] * entering[:, :, None]
    return local.reshape(b, nb * block, h, f)[:, :t]


def ssd_chunked(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor] = None,
                chunk: int = CHUNK) -> Tensor:
    """The SSD scan, ``x [b, l, h, p]``, ``dt [b, l, h]`` (final), ``A [h]``,
    ``B, C [b, l, g, n]``, ``D [h]`` or ``[h, p]`` -> float32 ``y [b, l, h, p]``
    (``chunk`` steps per chunk and per block of the chunk-end recurrence)."""
    b, length, heads, p = x.shape
    groups, n = B.shape[2], B.shape[3]
    hg = heads // groups  # heads per group share B and C
    x32, dt32 = x.float(), dt.float()
    pad = (-length) % chunk
    nc = (length + pad) // chunk
    xdt = _pad_time(x32 * dt32[..., None], pad).view(b, nc, chunk, groups, hg, p)
    a = _pad_time(dt32 * A.float(), pad).view(b, nc, chunk, groups, hg).permute(0, 1, 3, 4, 2)  # [b, c, g, h, T]
    Bc = _pad_time(B.float(), pad).view(b, nc, chunk, groups, n)
    Cc = _pad_time(C.float(), pad).view(b, nc, chunk, groups, n)
    decay = torch.exp(segment_sums(a))  # [b, c, g, h, i, j]
    CB = torch.einsum("bcign,bcjgn->bcgij", Cc, Bc)
    y = torch.einsum("bcghij,bcjghp->bcighp", CB[:, :, :, None] * decay, xdt)
    # what each chunk adds to the state at its end, then the state entering each chunk
    to_end = decay[..., -1, :].permute(0, 1, 4, 2, 3)[..., None]  # exp(S(T-1, j)) [b, c, j, g, h, 1]
    added = torch.einsum("bcjgn,bcjghp->bcghpn", Bc, xdt * to_end)
    ends = decay_scan(added.reshape(b, nc, heads, p * n), a.sum(-1).reshape(b, nc, heads), chunk)
    entering = torch.cat([torch.zeros_like(ends[:, :1]), ends[:, :-1]], dim=1).view(b, nc, groups, hg, p, n)
    from_before = torch.einsum("bcign,bcghpn->bcighp", Cc, entering)
    y = y + torch.exp(a.cumsum(-1)).permute(0, 1, 4, 2, 3)[..., None] * from_before
    y = y.reshape(b, nc * chunk, heads, p)[:, :length]
    if D is not None:
        y = y + (D.float()[:, None] if D.dim() == 1 else D.float()) * x32
    return y
