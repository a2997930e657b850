"""Fused element-wise rule steps as Triton kernels (imported on first use, CUDA or the
interpreter). Each computes in float32 what its torch definition computes:

- :func:`epsilon_scaled`: ``grad * |z| / (|z| + eps)`` (``rules/linear.py``);
- :func:`half_silu_gate`: ``y * silu(z)`` with the half and identity rules, forward and
  backward (``rules/gate.py``; ``z`` may be bf16 / fp16 beside a float32 ``y``; the result
  rounded once to ``out_dtype``, the next layer's);
- :func:`identity_silu_upcast`: the identity rule on ``silu(x.to(float32))`` of a float32, bf16
  or fp16 ``x``, keeping ``x`` rather than a float32 factor (``rules/activation.py``);
  :func:`identity_silu_upcast_pair` also writes the result's copy in the model's dtype;
- :func:`identity_silu_split`: the same rule on a Mamba2 mixer's conv output, with the slice,
  transpose and split into x and the SSM rule's constants B, C that follow it (``adapters/mamba2.py``);
- :func:`reversed_prepare`, :func:`reversed_finish`: the steps around the reversed adjoint
  scan (``scan/adjoint.py``).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import jit


def _epsilon_scaled_kernel(grad_ptr, z_ptr, out_ptr, n, epsilon, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(grad_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    z = tl.abs(tl.load(z_ptr + offs, mask=mask, other=0.0).to(tl.float32))
    ratio = tl.math.div_rn(z, z + epsilon)  # IEEE division, as torch's
    tl.store(out_ptr + offs, (g * ratio).to(out_ptr.dtype.element_ty), mask=mask)


def _dense(t: Tensor) -> bool:
    """Does ``t`` fill one block of memory, in some order of its dimensions (a permuted
    contiguous tensor)?"""
    dims = sorted((st, n) for st, n in zip(t.stride(), t.shape) if n != 1)
    expected = 1
    for st, n in dims:
        if st != expected:
            return False
        expected *= n
    return True


def epsilon_scaled(grad: Tensor, z: Tensor, epsilon: float) -> Tensor:
    """``grad * |z| / (|z| + epsilon)`` in one pass, returned in ``grad``'s dtype."""
    if not (grad.stride() == z.stride() and grad.shape == z.shape and _dense(grad)):
        grad, z = grad.contiguous(), z.contiguous()
    out = torch.empty_like(grad)  # grad's strides: one flat pass over the memory of all three
    n, block = grad.numel(), 2048
    jit(_epsilon_scaled_kernel)[(triton.cdiv(n, block),)](grad, z, out, n, float(epsilon), BLOCK=block, num_warps=8)
    return out


# ---------------------------------------------------------------- gate: [b, r, c] tiles, any strides


def _gate_forward_kernel(
    y_ptr, z_ptr, out_ptr, rows, cols, sy0, sy1, sy2, sz0, sz1, sz2, so0, so1, so2, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr
):
    b = tl.program_id(2).to(tl.int64)
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (r[:, None] < rows) & (c[None, :] < cols)
    r, c = r.to(tl.int64)[:, None], c.to(tl.int64)[None, :]
    y = tl.load(y_ptr + b * sy0 + r * sy1 + c * sy2, mask=mask, other=0.0).to(tl.float32)
    z = tl.load(z_ptr + b * sz0 + r * sz1 + c * sz2, mask=mask, other=0.0).to(tl.float32)
    out = y * (z * tl.sigmoid(z))
    tl.store(out_ptr + b * so0 + r * so1 + c * so2, out.to(out_ptr.dtype.element_ty), mask=mask)


def _gate_backward_kernel(
    g_ptr,
    y_ptr,
    z_ptr,
    dy_ptr,
    dz_ptr,
    rows,
    cols,
    sg0,
    sg1,
    sg2,
    sy0,
    sy1,
    sy2,
    sz0,
    sz1,
    sz2,
    sdy0,
    sdy1,
    sdy2,
    sdz0,
    sdz1,
    sdz2,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    b = tl.program_id(2).to(tl.int64)
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (r[:, None] < rows) & (c[None, :] < cols)
    r, c = r.to(tl.int64)[:, None], c.to(tl.int64)[None, :]
    half = 0.5 * tl.load(g_ptr + b * sg0 + r * sg1 + c * sg2, mask=mask, other=0.0).to(tl.float32)
    y = tl.load(y_ptr + b * sy0 + r * sy1 + c * sy2, mask=mask, other=0.0).to(tl.float32)
    z = tl.load(z_ptr + b * sz0 + r * sz1 + c * sz2, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(z)
    tl.store(dy_ptr + b * sdy0 + r * sdy1 + c * sdy2, (half * (z * sig)).to(dy_ptr.dtype.element_ty), mask=mask)
    tl.store(dz_ptr + b * sdz0 + r * sdz1 + c * sdz2, (half * y * sig).to(dz_ptr.dtype.element_ty), mask=mask)


_GATE_BLOCK = (32, 64)


def _gate_grid(shape: torch.Size) -> Tuple[int, int, int]:
    return (triton.cdiv(shape[1], _GATE_BLOCK[0]), triton.cdiv(shape[2], _GATE_BLOCK[1]), shape[0])


class _HalfSiluGate(torch.autograd.Function):
    """Forward ``y * z * sigmoid(z)`` (computed in float32, stored in ``out_dtype``); backward
    ``dy = g/2 * z * sigmoid(z)``, ``dz = g/2 * y * sigmoid(z)`` (half rule on the product,
    identity rule on the SiLU; ``g`` read in its dtype and computed in float32)."""

    @staticmethod
    def forward(ctx, y: Tensor, z: Tensor, transposed_out: bool, out_dtype: torch.dtype) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(y, z)
        b, r, c = y.shape
        out = (
            torch.empty(b, c, r, device=y.device, dtype=out_dtype).transpose(1, 2)
            if transposed_out
            else torch.empty(b, r, c, device=y.device, dtype=out_dtype)
        )
        jit(_gate_forward_kernel)[_gate_grid(y.shape)](
            y, z, out, r, c, *y.stride(), *z.stride(), *out.stride(), BLOCK_R=_GATE_BLOCK[0], BLOCK_C=_GATE_BLOCK[1], num_warps=4
        )
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        y, z = ctx.saved_tensors
        dy, dz = torch.empty_like(y), torch.empty_like(z)
        b, r, c = y.shape
        jit(_gate_backward_kernel)[_gate_grid(y.shape)](
            grad,
            y,
            z,
            dy,
            dz,
            r,
            c,
            *grad.stride(),
            *y.stride(),
            *z.stride(),
            *dy.stride(),
            *dz.stride(),
            BLOCK_R=_GATE_BLOCK[0],
            BLOCK_C=_GATE_BLOCK[1],
            num_warps=4,
        )
        return dy, dz, None, None


def half_silu_gate(y: Tensor, z: Tensor, transposed_out: bool = False, out_dtype: Optional[torch.dtype] = None) -> Tensor:
    """The default gate on ``[b, r, c]`` tensors of one dtype, any strides; ``transposed_out``
    stores the result ``[b, c, r]``-contiguous (the layout the next linear layer reads);
    ``out_dtype`` (default ``y``'s): the result rounded once to it, as a cast after it would (a
    bf16 model's ``out_proj`` input, without the float32 result and its cast each way)."""
    return _HalfSiluGate.apply(y, z, transposed_out, out_dtype or y.dtype)


# ---------------------------------------------------------------- SiLU of a low-precision input


def _silu_up_forward_kernel(
    x_ptr, out_ptr, low_ptr, rows, cols, sx0, sx1, sx2, so0, so1, so2, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
    HAS_LOW: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(2).to(tl.int64)
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (r[:, None] < rows) & (c[None, :] < cols)
    r, c = r.to(tl.int64)[:, None], c.to(tl.int64)[None, :]
    x = tl.load(x_ptr + b * sx0 + r * sx1 + c * sx2, mask=mask, other=0.0).to(tl.float32)
    out = (x * tl.sigmoid(x)).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + b * so0 + r * so1 + c * so2, out, mask=mask)
    if HAS_LOW:  # the same value rounded on to the model's dtype (out's strides)
        tl.store(low_ptr + b * so0 + r * so1 + c * so2, out.to(low_ptr.dtype.element_ty), mask=mask)


def _silu_up_backward_kernel(
    g_ptr, x_ptr, dx_ptr, rows, cols, sg0, sg1, sg2, sx0, sx1, sx2, sd0, sd1, sd2, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr
):
    b = tl.program_id(2).to(tl.int64)
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (r[:, None] < rows) & (c[None, :] < cols)
    r, c = r.to(tl.int64)[:, None], c.to(tl.int64)[None, :]
    g = tl.load(g_ptr + b * sg0 + r * sg1 + c * sg2, mask=mask, other=0.0).to(tl.float32)
    x = tl.load(x_ptr + b * sx0 + r * sx1 + c * sx2, mask=mask, other=0.0).to(tl.float32)
    tl.store(dx_ptr + b * sd0 + r * sd1 + c * sd2, (g * tl.sigmoid(x)).to(dx_ptr.dtype.element_ty), mask=mask)


class _IdentitySiluUpcast(torch.autograd.Function):
    """Forward ``x * sigmoid(x)`` computed and returned in ``dtype`` from ``x`` as it is (and, with
    ``low``, the same values rounded on to ``low``: a second output, the copy a bf16 model's next
    layer reads); backward ``g * sigmoid(x)`` rounded to ``x``'s dtype (the identity rule on SiLU
    after an upcast of x; ``g`` the sum of both outputs' gradients). Keeps ``x`` itself for the
    backward pass, not a factor in ``dtype``."""

    @staticmethod
    def forward(ctx, x: Tensor, dtype: torch.dtype, low: Optional[torch.dtype]):  # type: ignore[override]
        ctx.save_for_backward(x)
        ctx.set_materialize_grads(False)
        ctx.dtype = dtype
        b, r, c = x.shape
        out = torch.empty(b, r, c, device=x.device, dtype=dtype)
        out_low = None if low is None else torch.empty(b, r, c, device=x.device, dtype=low)
        jit(_silu_up_forward_kernel)[_gate_grid(x.shape)](
            x, out, out if out_low is None else out_low, r, c, *x.stride(), *out.stride(),
            BLOCK_R=_GATE_BLOCK[0], BLOCK_C=_GATE_BLOCK[1], HAS_LOW=out_low is not None, num_warps=4,
        )  # fmt: skip
        return out if out_low is None else (out, out_low)

    @staticmethod
    def backward(ctx, grad: Optional[Tensor], grad_low: Optional[Tensor] = None):  # type: ignore[override]
        (x,) = ctx.saved_tensors
        if grad_low is not None:  # the model-dtype copy was read by a layer that passes gradient (rare)
            grad = grad_low.to(ctx.dtype) if grad is None else grad + grad_low
        if grad is None:
            return None, None, None
        b, r, c = x.shape
        dx = torch.empty(b, r, c, device=x.device, dtype=x.dtype)
        jit(_silu_up_backward_kernel)[_gate_grid(x.shape)](
            grad, x, dx, r, c, *grad.stride(), *x.stride(), *dx.stride(),
            BLOCK_R=_GATE_BLOCK[0], BLOCK_C=_GATE_BLOCK[1], num_warps=4,
        )  # fmt: skip
        return dx, None, None


def identity_silu_upcast(x: Tensor, dtype: torch.dtype) -> Tensor:
    """The identity rule on ``silu(x.to(dtype))`` for a ``[b, r, c]`` tensor of ``dtype`` or a lower
    precision (any strides), in one pass each way; the result is ``[b, r, c]``-contiguous in
    ``dtype``."""
    return _IdentitySiluUpcast.apply(x, dtype, None)


def identity_silu_upcast_pair(x: Tensor, dtype: torch.dtype, low: torch.dtype) -> Tuple[Tensor, Tensor]:
    """:func:`identity_silu_upcast` and its result rounded to ``low``, written by the same pass
    (no read of the ``dtype`` result for a cast); both ``[b, r, c]``-contiguous, both differentiable."""
    out, out_low = _IdentitySiluUpcast.apply(x, dtype, low)
    return out, out_low


# ---------------------------------------------------------------- SiLU of a conv output, transposed and split


def _silu_split_forward_kernel(
    c_ptr, m_ptr, x_ptr, rest_ptr, start, length, d_x, channels, sc0, sc1, sc2, sm0, sm1,
    HAS_MASK: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(2).to(tl.int64)
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    t_ok = t < length
    t, c = t.to(tl.int64)[:, None], c.to(tl.int64)[None, :]
    v = tl.load(c_ptr + b * sc0 + c * sc1 + (t + start) * sc2, mask=t_ok[:, None] & (c < channels), other=0.0)
    v = v.to(tl.float32)
    out = v * tl.sigmoid(v)
    if HAS_MASK:  # padded positions zeroed after the activation, as the mixers do
        out = out * tl.load(m_ptr + b * sm0 + t * sm1, mask=t_ok[:, None], other=0.0)
    is_x = c < d_x
    tl.store(x_ptr + (b * length + t) * d_x + c, out.to(x_ptr.dtype.element_ty), mask=t_ok[:, None] & is_x)
    rest = channels - d_x
    is_rest = (c >= d_x) & (c < channels)
    tl.store(rest_ptr + (b * length + t) * rest + (c - d_x), out.to(rest_ptr.dtype.element_ty), mask=t_ok[:, None] & is_rest)


def _silu_split_backward_kernel(
    g_ptr, c_ptr, m_ptr, d_ptr, start, length, d_x, channels, full, sg0, sg1, sg2, sc0, sc1, sc2, sm0, sm1,
    HAS_MASK: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(2).to(tl.int64)
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)  # along the conv's whole output
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    s = t - start  # the step of x it made, where 0 <= s < length
    live = ((s >= 0) & (s < length))[:, None] & (c < d_x)[None, :]
    t, c, s = t.to(tl.int64)[:, None], c.to(tl.int64)[None, :], s.to(tl.int64)[:, None]
    g = tl.load(g_ptr + b * sg0 + s * sg1 + c * sg2, mask=live, other=0.0).to(tl.float32)
    v = tl.load(c_ptr + b * sc0 + c * sc1 + t * sc2, mask=live, other=0.0).to(tl.float32)
    if HAS_MASK:
        g = g * tl.load(m_ptr + b * sm0 + s * sm1, mask=(s >= 0) & (s < length), other=0.0)
    # every element of the conv's gradient is written: zero past the x channels and outside the steps
    tl.store(d_ptr + (b * channels + c) * full + t, g * tl.sigmoid(v), mask=(t < full) & (c < channels))


_SPLIT_BLOCK = (64, 32)


class _SiluSplit(torch.autograd.Function):
    """Forward: ``silu`` of ``conv[:, :, start:start + length]`` in ``dtype``, transposed to ``[b,
    length, channels]``, times the padding mask, and split at ``d_x``: ``x`` (differentiable) and the
    rest (B and C: constants of the SSM rule, not differentiable). Backward: the identity rule,
    ``g * mask * sigmoid(conv)`` for ``x``'s channels, written into the gradient of the whole conv
    output (zero elsewhere)."""

    @staticmethod
    def forward(ctx, conv: Tensor, mask: Optional[Tensor], start: int, length: int, d_x: int, dtype: torch.dtype):  # type: ignore[override]
        ctx.save_for_backward(conv, mask)
        ctx.start, ctx.length, ctx.d_x = start, length, d_x
        b, channels, _ = conv.shape
        x = torch.empty(b, length, d_x, device=conv.device, dtype=dtype)
        rest = torch.empty(b, length, channels - d_x, device=conv.device, dtype=dtype)
        grid = (triton.cdiv(length, _SPLIT_BLOCK[0]), triton.cdiv(channels, _SPLIT_BLOCK[1]), b)
        m, m_strides = (conv, (0, 0)) if mask is None else (mask, mask.stride())
        jit(_silu_split_forward_kernel)[grid](
            conv, m, x, rest, start, length, d_x, channels, *conv.stride(), *m_strides,
            HAS_MASK=mask is not None, BLOCK_T=_SPLIT_BLOCK[0], BLOCK_C=_SPLIT_BLOCK[1], num_warps=4,
        )  # fmt: skip
        ctx.mark_non_differentiable(rest)
        return x, rest

    @staticmethod
    def backward(ctx, grad_x: Tensor, grad_rest: Optional[Tensor]):  # type: ignore[override]
        conv, mask = ctx.saved_tensors
        b, channels, full = conv.shape
        dconv = torch.empty(b, channels, full, device=conv.device, dtype=conv.dtype)
        grid = (triton.cdiv(full, _SPLIT_BLOCK[0]), triton.cdiv(channels, _SPLIT_BLOCK[1]), b)
        m, m_strides = (conv, (0, 0)) if mask is None else (mask, mask.stride())
        jit(_silu_split_backward_kernel)[grid](
            grad_x, conv, m, dconv, ctx.start, ctx.length, ctx.d_x, channels, full, *grad_x.stride(), *conv.stride(),
            *m_strides, HAS_MASK=mask is not None, BLOCK_T=_SPLIT_BLOCK[0], BLOCK_C=_SPLIT_BLOCK[1], num_warps=4,
        )  # fmt: skip
        return dconv, None, None, None, None, None


def identity_silu_split(
    conv: Tensor, start: int, length: int, d_x: int, dtype: torch.dtype, mask: Optional[Tensor] = None
) -> Tuple[Tensor, Tensor]:
    """The identity rule on ``silu`` of the steps ``start .. start + length`` of a conv output
    ``[b, channels, steps]`` (any strides, any float dtype), computed in ``dtype``, zeroed where the
    padding mask ``[b, length]`` is 0, and returned as ``x [b, length, d_x]`` (differentiable) and the
    other channels ``[b, length, channels - d_x]`` (not: the SSM rule's constants), both contiguous;
    the backward pass writes the conv output's whole gradient in one pass (no slice, transpose or
    concatenation of gradients).

    Raises:
        ValueError: the mask is not ``[b, length]``."""
    if mask is not None and tuple(mask.shape) != (conv.shape[0], length):
        raise ValueError(f"identity_silu_split: a padding mask of shape {tuple(mask.shape)} for {conv.shape[0]} x {length} steps")
    return _SiluSplit.apply(conv, None if mask is None else mask.to(torch.float32), start, length, d_x, dtype)


# ---------------------------------------------------------------- around the reversed adjoint scan
# Tensors are addressed as [batch, channel, time]; channel c belongs to head c // P (its dt).
# Layouts: "mamba1" (x, dt [b, d, l]) and "ssd" (x [b, l, h, p], dt [b, l, h]).


def x_strides(t: Tensor, layout: str) -> Optional[Tuple[int, int, int]]:
    """(batch, channel, time) strides of an x-shaped tensor (SSD: head and p flattened,
    which needs ``stride(h) == p * stride(p)``; None otherwise)."""
    if layout == "mamba1":
        return t.stride(0), t.stride(1), t.stride(2)
    if t.stride(2) != t.shape[3] * t.stride(3):
        return None
    return t.stride(0), t.stride(3), t.stride(1)


def _x_strides(t: Tensor, layout: str) -> Tuple[int, int, int]:
    """:func:`x_strides` of a tensor the callers checked (``scan.adjoint._fusable``)."""
    strides = x_strides(t, layout)
    if strides is None:
        raise ValueError(f"tensor of shape {tuple(t.shape)} and strides {t.stride()} is not addressable as {layout} x")
    return strides


def _dt_strides(t: Tensor, layout: str) -> Tuple[int, int, int]:
    return (t.stride(0), t.stride(1), t.stride(2)) if layout == "mamba1" else (t.stride(0), t.stride(2), t.stride(1))


def _dims(g: Tensor, layout: str) -> Tuple[int, int, int, int]:
    """batch, channels, length, channels per head."""
    if layout == "mamba1":
        return g.shape[0], g.shape[1], g.shape[2], 1
    return g.shape[0], g.shape[2] * g.shape[3], g.shape[1], g.shape[3]


@triton.jit
def _softplus_of(dt, bias_ptr, head, mask, HAS_BIAS: tl.constexpr):
    """``softplus(dt + bias)`` per head (mamba-ssm's ``delta_softplus``: identity above 20),
    written as ``max(v, 0) + log1p(exp(-|v|))`` with ``log1p(e) = log(u) e / (u - 1)``, ``u = 1 + e``
    (exact to a few ulp; ``e`` where ``u`` rounds to 1); ``dt`` itself without a bias."""
    if HAS_BIAS:
        v = dt + tl.load(bias_ptr + head, mask=mask, other=0.0).to(tl.float32)
        e = tl.exp(-tl.abs(v))
        u = 1.0 + e
        lp = tl.where(u == 1.0, e, tl.log(u) * (e / tl.where(u == 1.0, 1.0, u - 1.0)))
        return tl.where(v <= 20.0, tl.maximum(v, 0.0) + lp, v)
    return dt


def _prepare_kernel(
    g_ptr,
    dt_ptr,
    bias_ptr,
    x_ptr,
    dtr_ptr,
    channels,
    length,
    per_head,
    floor,
    sg0,
    sg1,
    sg2,
    sd0,
    sd1,
    sd2,
    sx0,
    sx1,
    sx2,
    sr0,
    sr1,
    sr2,
    HAS_BIAS: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    s = tl.program_id(2) * BLOCK_T + tl.arange(0, BLOCK_T)
    mask = (c[:, None] < channels) & (s[None, :] < length)
    head = (c // per_head).to(tl.int64)[:, None]
    c, s = c.to(tl.int64)[:, None], s.to(tl.int64)[None, :]
    t = length - 1 - s  # the original step read at reversed step s
    nxt = tl.load(dt_ptr + b * sd0 + head * sd1 + (t + 1) * sd2, mask=mask & (s > 0), other=0.0).to(tl.float32)
    nxt = tl.where(s > 0, _softplus_of(nxt, bias_ptr, head, mask, HAS_BIAS), 1.0)
    step = tl.maximum(nxt, floor)
    g = tl.load(g_ptr + b * sg0 + c * sg1 + t * sg2, mask=mask, other=0.0).to(tl.float32)
    tl.store(x_ptr + b * sx0 + c * sx1 + s * sx2, tl.math.div_rn(g, step), mask=mask)
    tl.store(dtr_ptr + b * sr0 + head * sr1 + s * sr2, step, mask=mask & (c % per_head == 0))


def _finish_kernel(
    y_ptr,
    g_ptr,
    dt_ptr,
    bias_ptr,
    d_ptr,
    out_ptr,
    channels,
    length,
    per_head,
    sy0,
    sy1,
    sy2,
    sg0,
    sg1,
    sg2,
    sd0,
    sd1,
    sd2,
    so0,
    so1,
    so2,
    HAS_D: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    t = tl.program_id(2) * BLOCK_T + tl.arange(0, BLOCK_T)
    mask = (c[:, None] < channels) & (t[None, :] < length)
    head = (c // per_head).to(tl.int64)[:, None]
    cc, t = c.to(tl.int64)[:, None], t.to(tl.int64)[None, :]
    y = tl.load(y_ptr + b * sy0 + cc * sy1 + (length - 1 - t) * sy2, mask=mask, other=0.0).to(tl.float32)
    dt = tl.load(dt_ptr + b * sd0 + head * sd1 + t * sd2, mask=mask, other=0.0).to(tl.float32)
    out = y * _softplus_of(dt, bias_ptr, head, mask, HAS_BIAS)
    if HAS_D:
        g = tl.load(g_ptr + b * sg0 + cc * sg1 + t * sg2, mask=mask, other=0.0).to(tl.float32)
        dd = tl.load(d_ptr + c, mask=c < channels, other=0.0).to(tl.float32)
        out += dd[:, None] * g
    tl.store(out_ptr + b * so0 + cc * so1 + t * so2, out, mask=mask)


_BLOCK = (32, 64)


def _grid(batch: int, channels: int, length: int) -> Tuple[int, int, int]:
    return (batch, triton.cdiv(channels, _BLOCK[0]), triton.cdiv(length, _BLOCK[1]))


def reversed_prepare(g: Tensor, dt: Tensor, layout: str, floor: float, dt_bias: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """``(x', dt')`` of the reversed problem in one pass (float32; ``g`` addressable by
    :func:`x_strides`). With ``dt_bias`` (float32, per head) ``dt`` is the raw step (any float
    dtype) and the step is ``softplus(dt + dt_bias)``."""
    batch, channels, length, per_head = _dims(g, layout)
    x_rev = torch.empty_like(g, memory_format=torch.contiguous_format)
    dt_rev = torch.empty_like(dt, dtype=torch.float32, memory_format=torch.contiguous_format)
    jit(_prepare_kernel)[_grid(batch, channels, length)](
        g,
        dt,
        dt if dt_bias is None else dt_bias,
        x_rev,
        dt_rev,
        channels,
        length,
        per_head,
        floor,
        *_x_strides(g, layout),
        *_dt_strides(dt, layout),
        *_x_strides(x_rev, layout),
        *_dt_strides(dt_rev, layout),
        HAS_BIAS=dt_bias is not None,
        BLOCK_C=_BLOCK[0],
        BLOCK_T=_BLOCK[1],
        num_warps=4,
    )
    return x_rev, dt_rev


def reversed_finish(
    y_rev: Tensor, g: Tensor, dt: Tensor, D: Optional[Tensor], layout: str, dt_bias: Optional[Tensor] = None
) -> Tensor:
    """``dx = dt * reverse(y') + D g`` in one pass (float32; ``D`` per channel or None; with
    ``dt_bias``, ``dt`` raw as in :func:`reversed_prepare`)."""
    batch, channels, length, per_head = _dims(g, layout)
    out = torch.empty_like(g, memory_format=torch.contiguous_format)
    jit(_finish_kernel)[_grid(batch, channels, length)](
        y_rev,
        g,
        dt,
        dt if dt_bias is None else dt_bias,
        dt if D is None else D,
        out,
        channels,
        length,
        per_head,
        *_x_strides(y_rev, layout),
        *_x_strides(g, layout),
        *_dt_strides(dt, layout),
        *_x_strides(out, layout),
        HAS_D=D is not None,
        HAS_BIAS=dt_bias is not None,
        BLOCK_C=_BLOCK[0],
        BLOCK_T=_BLOCK[1],
        num_warps=4,
    )
    return out
