"""RMSNorm under MambaLRP's norm rule (its factor a constant) as one Triton kernel each way.

For rows of ``x [..., groups * size]`` and each group of ``size`` consecutive channels (plain
RMSNorm: one group), with ``x``'s dtype ``X``, the weight's ``W`` and ``O = promote(W, X)``,
this computes what ``adapters/norms.rms_norm`` (and ``grouped_rms_norm``) computes in torch::

    s   = rsqrt(mean(x^2) + eps)           # float32, one per row and group; constant
    t   = X(x * s)                         # rounded to x's dtype
    out = O(w * t)                         # then stored in the caller's out_dtype
    dx  = X(X(grad * w) * s)               # the backward pass: s constant, w frozen

(``X(.)``: rounded to ``X``.) Only ``s`` is kept for the backward pass besides the weight, one
float32 per row and group. Rows may be strided; each row's channels must be contiguous (else
``x`` is copied). Imported on first use.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import jit


def _rms_forward_kernel(
    x_ptr, w_ptr, out_ptr, s_ptr, groups, sx, so, eps,
    SIZE: tl.constexpr, HAS_W: tl.constexpr, ROUND_TO_X: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    grp = tl.program_id(1)
    base = grp.to(tl.int64) * SIZE
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, SIZE, BLOCK):
        c = start + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + row * sx + base + c, mask=c < SIZE, other=0.0).to(tl.float32)
        acc += x * x
    s = 1.0 / tl.sqrt_rn(tl.sum(acc, axis=0) / SIZE + eps)
    tl.store(s_ptr + row * groups + grp, s)
    for start in range(0, SIZE, BLOCK):
        c = start + tl.arange(0, BLOCK)
        mask = c < SIZE
        t = (tl.load(x_ptr + row * sx + base + c, mask=mask, other=0.0).to(tl.float32) * s).to(x_ptr.dtype.element_ty)
        out = t.to(tl.float32)
        if HAS_W:
            out = tl.load(w_ptr + base + c, mask=mask, other=0.0).to(tl.float32) * out
            if ROUND_TO_X:  # the product's dtype is x's
                out = out.to(x_ptr.dtype.element_ty).to(tl.float32)
        tl.store(out_ptr + row * so + base + c, out.to(out_ptr.dtype.element_ty), mask=mask)


def _rms_backward_kernel(
    g_ptr, w_ptr, s_ptr, dx_ptr, groups, sg, sd,
    SIZE: tl.constexpr, HAS_W: tl.constexpr, ROUND_TO_X: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    grp = tl.program_id(1)
    base = grp.to(tl.int64) * SIZE
    s = tl.load(s_ptr + row * groups + grp)
    for start in range(0, SIZE, BLOCK):
        c = start + tl.arange(0, BLOCK)
        mask = c < SIZE
        g = tl.load(g_ptr + row * sg + base + c, mask=mask, other=0.0).to(tl.float32)
        if ROUND_TO_X:  # the gradient of the product arrives in its dtype, x's
            g = g.to(dx_ptr.dtype.element_ty).to(tl.float32)
        if HAS_W:
            g = g * tl.load(w_ptr + base + c, mask=mask, other=0.0).to(tl.float32)
        g = g.to(dx_ptr.dtype.element_ty).to(tl.float32)  # the gradient of t, in t's dtype
        tl.store(dx_ptr + row * sd + base + c, (g * s).to(dx_ptr.dtype.element_ty), mask=mask)


def _rows(t: Tensor, channels: int) -> Tensor:
    """``t`` as ``[rows, channels]`` with contiguous channels (a view where one exists)."""
    t2 = t.reshape(-1, channels)
    return t2 if t2.stride(1) == 1 else t2.contiguous()


def _launch(size: int) -> dict:
    block = min(triton.next_power_of_2(size), 2048)
    return dict(SIZE=size, BLOCK=block, num_warps=8 if block >= 1024 else 4)


class _ConstantRmsNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps, size, out_dtype):  # type: ignore[override]
        channels = x.shape[-1]
        x2 = _rows(x, channels)
        rows, groups = x2.shape[0], channels // size
        product = x.dtype if weight is None else torch.promote_types(weight.dtype, x.dtype)
        out = torch.empty(rows, channels, device=x.device, dtype=out_dtype or product)
        s = torch.empty(rows, groups, device=x.device, dtype=torch.float32)
        has_w, round_to_x = weight is not None, product == x.dtype
        jit(_rms_forward_kernel)[(rows, groups)](
            x2, weight if has_w else x2, out, s, groups, x2.stride(0), out.stride(0), float(eps),
            HAS_W=has_w, ROUND_TO_X=round_to_x, **_launch(size),
        )  # fmt: skip
        ctx.save_for_backward(s, weight)
        ctx.meta = (x.shape, x.dtype, size, has_w, round_to_x)
        return out.reshape(x.shape)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        s, weight = ctx.saved_tensors
        shape, dtype, size, has_w, round_to_x = ctx.meta
        g2 = _rows(grad, shape[-1])
        dx = torch.empty(g2.shape, device=g2.device, dtype=dtype)
        jit(_rms_backward_kernel)[(g2.shape[0], s.shape[1])](
            g2, weight if has_w else g2, s, dx, s.shape[1], g2.stride(0), dx.stride(0),
            HAS_W=has_w, ROUND_TO_X=round_to_x, **_launch(size),
        )  # fmt: skip
        return dx.reshape(shape), None, None, None, None


def constant_rms_norm(
    x: Tensor, weight: Optional[Tensor], eps: float, group_size: int, out_dtype: Optional[torch.dtype] = None
) -> Tensor:
    """The RMSNorm of the module docstring on ``x [..., C]`` (``C`` a multiple of
    ``group_size``), gradient for ``x`` only; ``out_dtype``: the dtype to return (``None``: the
    product's, ``promote(weight, x)``), as ``rms_norm(...).to(out_dtype)`` in one pass."""
    return _ConstantRmsNorm.apply(x, weight, eps, group_size, out_dtype)
