"""SSD's chunk-end recurrence as one Triton kernel (CUDA; also runs under ``TRITON_INTERPRET=1``).

:func:`captum_mambalrp.scan.ssd_chunked.decay_scan_` in place, ``u_t <- decay_t u_{t-1} + u_t``
along axis 1 of ``u [b, t, ...]``: one program per (batch, block of the other elements) walks
the steps in tiles of ``BLOCK_T``, each tile one coalesced load of ``u`` and ``decay``, solved by
``tl.associative_scan`` on the pairs ``(decay, u)`` under the composition of two first-order
steps, ``(a1, b1) . (a2, b2) = (a1 a2, a2 b1 + b2)`` (Blelloch, 1990, Sec. 1.4), then joined to
the carry of the tiles before. ``u`` is read and written once; the torch form reads it about
three times in some 2 sqrt(t) launches. float32 only (the torch form serves other dtypes).
"""

from typing import Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..kernels import jit

#: Steps per tile (one load of ``[BLOCK_T, BLOCK_R]``, scanned in registers).
BLOCK_T = 16
#: Elements of the other axes per program.
BLOCK_R = 256
#: The most axes after the first two (the decay's broadcast is addressed per axis).
MAX_REST_DIMS = 4


@triton.jit
def _compose(a1, b1, a2, b2):  # type: ignore[no-untyped-def]
    """Two first-order steps ``h -> a1 h + b1`` then ``h -> a2 h + b2`` as one."""
    return a1 * a2, b1 * a2 + b2


def _decay_kernel(
    u_ptr,
    d_ptr,
    n_steps,
    rest,
    s_ub,
    s_ut,
    s_db,
    s_dt,
    size1,
    size2,
    size3,
    s_d0,
    s_d1,
    s_d2,
    s_d3,
    BLOCK_T: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    pid_b = tl.program_id(0).to(tl.int64)
    r = tl.program_id(1).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_r = r < rest
    # the flat index of the other axes, taken apart for the decay's strides (0 where it broadcasts)
    i3 = r % size3
    q = r // size3
    i2 = q % size2
    q = q // size2
    i1 = q % size1
    i0 = q // size1
    u_base = u_ptr + pid_b * s_ub + r
    d_base = d_ptr + pid_b * s_db + i0 * s_d0 + i1 * s_d1 + i2 * s_d2 + i3 * s_d3
    steps = tl.arange(0, BLOCK_T)
    carry = tl.zeros([BLOCK_R], dtype=tl.float32)
    for t0 in range(0, n_steps, BLOCK_T):
        t = t0 + steps.to(tl.int64)
        mask = (t < n_steps)[:, None] & mask_r[None, :]
        u = tl.load(u_base[None, :] + t[:, None] * s_ut, mask=mask, other=0.0)
        d = tl.load(d_base[None, :] + t[:, None] * s_dt, mask=mask, other=1.0)
        a, b = tl.associative_scan((d, u), 0, _compose)
        out = b + a * carry[None, :]
        tl.store(u_base[None, :] + t[:, None] * s_ut, out, mask=mask)
        # steps past the end load (1, 0): the tile's last row is the carry either way
        carry = tl.sum(tl.where((steps == BLOCK_T - 1)[:, None], out, 0.0), axis=0)


def _rest_view(u: Tensor) -> Tuple[Tensor, bool]:
    """``u`` as ``[b, t, rest]`` with the rest at stride 1: a view where its layout allows
    (``True``), else a contiguous copy (``False``)."""
    b, t = u.shape[:2]
    try:
        flat = u.view(b, t, -1)
        if flat.shape[2] <= 1 or flat.stride(2) == 1:
            return flat, True
    except RuntimeError:
        pass
    return u.contiguous().view(b, t, -1), False


def decay_scan_(u: Tensor, decay: Tensor) -> Tensor:
    """In place along axis 1: ``u_t <- decay_t u_{t-1} + u_t`` for float32 ``u [b, t, ...]`` (at
    most :data:`MAX_REST_DIMS` axes after the first two) and ``decay`` broadcastable to it;
    returns ``u``.

    Raises:
        ValueError: ``u`` is not float32, has too many axes, or ``decay`` does not broadcast to it.
    """
    rest_shape = tuple(u.shape[2:])
    if u.dtype != torch.float32 or decay.dtype != torch.float32:
        raise ValueError(f"decay_scan_ kernel: float32 tensors only, got {u.dtype} and {decay.dtype}")
    if u.dim() < 2 or len(rest_shape) > MAX_REST_DIMS:
        raise ValueError(f"decay_scan_ kernel: u needs 2 to {MAX_REST_DIMS + 2} axes, got shape {tuple(u.shape)}")
    b, t = u.shape[:2]
    try:
        d = decay.expand(u.shape)
    except RuntimeError:
        shapes = f"decay of shape {tuple(decay.shape)}, u of shape {tuple(u.shape)}"
        raise ValueError(f"decay_scan_ kernel: {shapes}: the decay does not broadcast to u") from None
    flat, in_place = _rest_view(u)
    pad = MAX_REST_DIMS - len(rest_shape)
    sizes = (1,) * pad + rest_shape
    d_strides = (0,) * pad + tuple(d.stride()[2:])
    rest = flat.shape[2]
    if rest and t:
        grid = (b, triton.cdiv(rest, BLOCK_R))
        jit(_decay_kernel)[grid](
            flat,
            d,
            t,
            rest,
            flat.stride(0),
            flat.stride(1),
            d.stride(0),
            d.stride(1),
            *sizes[1:],
            *d_strides,
            BLOCK_T=BLOCK_T,
            BLOCK_R=BLOCK_R,
            num_warps=4,
        )
    if not in_place:
        u.copy_(flat.view(u.shape))
    return u
