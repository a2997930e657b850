"""SSD's chunk outputs as one Triton kernel (CUDA; also runs under ``TRITON_INTERPRET=1``).

The last and largest step of :func:`captum_mambalrp.scan.ssd_chunked.ssd_chunked`'s forward-only
form: with the prefix sums ``s`` of ``dt A`` per chunk of ``T`` steps, the chunk products
``CB_ij = <C_i, B_j>`` and the states ``H_c`` at the chunks' ends (all made by torch), per (chunk,
head) ::

    y_i = sum_{j <= i} CB_ij exp(s_i - s_j) dt_j x_j  +  exp(s_i) <C_i, H_{c-1}>  +  D x_i

(Dao and Gu, 2024, Sec. 6), the decay matrix made in registers and ``y`` written once. The torch
form writes the ``[b, c, h, T, T]`` decay matrices and ``dt x`` to memory and rereads them in some
ten launches. float32 accumulation; the products run in TF32 exactly where torch's float32 matmuls
may (``torch.backends.cuda.matmul.allow_tf32``). The chunks' own states stay a torch batched
matrix product: cuBLAS takes their ``[n, T] x [T, h p]`` products faster than a kernel per
(chunk, head) (docs/scaling.md).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..kernels import jit

#: Channels (``p``) per program, at most.
MAX_BLOCK = 64
#: Warps per program (8: with 4, IEEE float32 products spill registers; H200 run 10).
NUM_WARPS = 8


def _block(size: int, cap: int = MAX_BLOCK) -> int:
    """A power of two >= ``size`` (and >= 16, the smallest ``tl.dot`` operand), at most ``cap``."""
    return max(16, min(cap, triton.next_power_of_2(size)))


def _block_t(chunk: int) -> int:
    """The steps' tile: the chunk, rounded up to a power of two >= 16."""
    return max(16, triton.next_power_of_2(chunk))


def _chunk_outputs_kernel(
    x_ptr,
    dt_ptr,
    C_ptr,
    s_ptr,
    cb_ptr,
    st_ptr,
    D_ptr,
    y_ptr,
    length,
    chunks,
    heads,
    hg,
    n,
    p,
    s_xb,
    s_xl,
    s_xh,
    s_xp,
    s_db,
    s_dl,
    s_dh,
    s_Cb,
    s_Cl,
    s_Cg,
    s_Cn,
    T: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_P: tl.constexpr,
    HAS_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    bc = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    pb = tl.program_id(2)
    b = bc // chunks
    c = bc % chunks
    groups = heads // hg
    g = h // hg
    hh = h % hg
    i = tl.arange(0, BLOCK_T)
    t = c * T + i
    in_t = (i < T) & (t < length)
    pp = pb * BLOCK_P + tl.arange(0, BLOCK_P)
    in_p = pp < p
    s_row = s_ptr + (bc * heads + h) * T
    s = tl.load(s_row + i, mask=i < T, other=0.0)
    dt = tl.load(dt_ptr + b * s_db + t * s_dl + h * s_dh, mask=in_t, other=0.0).to(tl.float32)
    xv = tl.load(
        x_ptr + b * s_xb + t[:, None] * s_xl + h * s_xh + pp[None, :] * s_xp,
        mask=in_t[:, None] & in_p[None, :],
        other=0.0,
    ).to(tl.float32)
    # within the chunk: W_ij = CB_ij exp(s_i - s_j) for j <= i (cb: [b, c, g, T, T] contiguous)
    cb = tl.load(
        cb_ptr + ((bc * groups + g) * T + i[:, None]) * T + i[None, :],
        mask=(i < T)[:, None] & (i < T)[None, :],
        other=0.0,
    )
    causal = (i[None, :] <= i[:, None]) & (i < T)[None, :] & (i < T)[:, None]  # rows past T: 0, not inf
    weights = tl.where(causal, tl.exp(tl.where(causal, s[:, None] - s[None, :], 0.0)), 0.0) * cb
    acc = tl.dot(weights, xv * dt[:, None], input_precision=PRECISION)  # [T, p]
    # the state entering the chunk: H_{c-1} (st: [b, c, g, n, hg, p] contiguous), zero for chunk 0
    if c > 0:
        into = tl.zeros([BLOCK_T, BLOCK_P], dtype=tl.float32)
        for n0 in range(0, n, BLOCK_N):
            nn = n0 + tl.arange(0, BLOCK_N)
            Cv = tl.load(
                C_ptr + b * s_Cb + t[:, None] * s_Cl + g * s_Cg + nn[None, :] * s_Cn,
                mask=in_t[:, None] & (nn < n)[None, :],
                other=0.0,
            ).to(tl.float32)
            row = (((bc - 1) * groups + g) * n + nn) * hg + hh
            H = tl.load(st_ptr + row[:, None] * p + pp[None, :], mask=(nn < n)[:, None] & in_p[None, :], other=0.0)
            into += tl.dot(Cv, H, input_precision=PRECISION)
        acc += tl.exp(s)[:, None] * into
    if HAS_D:
        acc += tl.load(D_ptr + h * p + pp, mask=in_p, other=0.0)[None, :] * xv
    # y: [b, l, h, p] contiguous
    tl.store(
        y_ptr + ((b * length + t[:, None]) * heads + h) * p + pp[None, :],
        acc,
        mask=in_t[:, None] & in_p[None, :],
    )


def _precision() -> str:
    """``tl.dot``'s float32 mode: TF32 where torch's float32 matmuls may use it, else IEEE."""
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"


def chunk_outputs(
    x: Tensor, dt: Tensor, C: Tensor, s: Tensor, cb: Tensor, states: Tensor, D: Optional[Tensor], chunk: int
) -> Tensor:
    """The scan's output ``y [b, l, h, p]`` (float32) from ``x [b, l, h, p]``, ``dt [b, l, h]``, ``C
    [b, l, g, n]`` (any float dtype, any strides), ``s [b, c, h, T]`` (the prefix sums of ``dt A``
    within each chunk, ``T = chunk``, zero steps past ``l``), the chunk products ``cb [b, c, g, T,
    T]`` and the states at the chunks' ends ``states [b, c, g, n, h / g, p]`` (float32
    contiguous); ``D [h]`` or ``[h, p]``."""
    b, length, heads, p = x.shape
    groups, n = C.shape[2], C.shape[3]
    chunks = s.shape[1]
    y = torch.empty(b, length, heads, p, dtype=torch.float32, device=x.device)
    D_ch = None if D is None else D.float().reshape(heads, -1).expand(heads, p).contiguous()
    block_p = _block(p)
    grid = (b * chunks, heads, triton.cdiv(p, block_p))
    jit(_chunk_outputs_kernel)[grid](
        x,
        dt,
        C,
        s,
        cb,
        states,
        y if D_ch is None else D_ch,
        y,
        length,
        chunks,
        heads,
        heads // groups,
        n,
        p,
        *x.stride(),
        *dt.stride(),
        *C.stride(),
        T=chunk,
        BLOCK_T=_block_t(chunk),
        BLOCK_N=_block(n, cap=32),
        BLOCK_P=block_p,
        HAS_D=D_ch is not None,
        PRECISION=_precision(),
        num_warps=NUM_WARPS,
    )
    return y
