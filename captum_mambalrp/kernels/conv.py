"""The depthwise causal conv of Mamba mixers as Triton kernels (imported on first use, CUDA or
the interpreter): the forward and the gradient for the input, nothing else.

``nn.Conv1d(d, d, K, groups=d, padding=K - 1)`` computes, for ``x [b, d, l]`` and
``t < l + K - 1``::

    out[b, c, t] = bias[c] + sum_j w[c, j] * x[b, c, t + j - (K - 1)]      (x = 0 outside [0, l))

and its input gradient is the correlation with the same taps the other way::

    dx[b, c, s] = sum_j w[c, j] * g[b, c, s + (K - 1) - j]

torch runs this module through a generic depthwise kernel (on the H200, Falcon-Mamba-7B shape
at 32768 tokens: 2.8 ms forward and 2.5 ms input gradient per layer, where causal-conv1d's
forward takes 0.33 ms; docs/benchmarks.md). These kernels read ``x`` with its strides (the
mixers pass a transposed view of ``in_proj``'s output: no copy first), accumulate in float32
and round once to the output's dtype: ``x``'s, as the module does, or float32 for a bf16 input
(``kernels.dispatch.conv_output_dtype``, as causal-conv1d's kernel keeps it for its SiLU). LRP's
rule for the conv stays where it is (the module's forward hook); weights and bias are constants
here (MambaLRP freezes them): ``kernels.dispatch.conv_forward`` says when this path replaces the
module's own forward.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor, nn

from . import jit

BLOCK_C = 32
BLOCK_T = 64


def _forward_kernel(
    x_ptr, w_ptr, b_ptr, out_ptr, channels, length, out_len, sx0, sx1, sx2, so0, so1, so2,
    K: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_T: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(2).to(tl.int64)
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    c_ok = c < channels
    c64 = c.to(tl.int64)
    acc = tl.zeros((BLOCK_C, BLOCK_T), dtype=tl.float32)
    for j in tl.static_range(K):
        s = t + (j - (K - 1))
        m = c_ok[:, None] & ((s >= 0) & (s < length))[None, :]
        xv = tl.load(x_ptr + b * sx0 + c64[:, None] * sx1 + s.to(tl.int64)[None, :] * sx2, mask=m, other=0.0)
        wv = tl.load(w_ptr + c64 * K + j, mask=c_ok, other=0.0)
        acc += xv.to(tl.float32) * wv.to(tl.float32)[:, None]
    if HAS_BIAS:
        acc += tl.load(b_ptr + c64, mask=c_ok, other=0.0).to(tl.float32)[:, None]
    m = c_ok[:, None] & (t < out_len)[None, :]
    tl.store(out_ptr + b * so0 + c64[:, None] * so1 + t.to(tl.int64)[None, :] * so2, acc.to(out_ptr.dtype.element_ty), mask=m)


def _input_grad_kernel(
    g_ptr, w_ptr, dx_ptr, channels, length, sg0, sg1, sg2, sd0, sd1, sd2,
    K: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_T: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(2).to(tl.int64)
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    s = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    c_ok = c < channels
    c64 = c.to(tl.int64)
    m = c_ok[:, None] & (s < length)[None, :]
    acc = tl.zeros((BLOCK_C, BLOCK_T), dtype=tl.float32)
    for j in tl.static_range(K):
        t = s + (K - 1 - j)  # always inside the output's l + K - 1 steps where s < l
        gv = tl.load(g_ptr + b * sg0 + c64[:, None] * sg1 + t.to(tl.int64)[None, :] * sg2, mask=m, other=0.0)
        wv = tl.load(w_ptr + c64 * K + j, mask=c_ok, other=0.0)
        acc += gv.to(tl.float32) * wv.to(tl.float32)[:, None]
    tl.store(dx_ptr + b * sd0 + c64[:, None] * sd1 + s.to(tl.int64)[None, :] * sd2, acc.to(dx_ptr.dtype.element_ty), mask=m)


def _grid(batch: int, channels: int, steps: int):
    return (triton.cdiv(channels, BLOCK_C), triton.cdiv(steps, BLOCK_T), batch)


def conv_forward(x: Tensor, weight: Tensor, bias: Optional[Tensor], out_dtype: Optional[torch.dtype] = None) -> Tensor:
    """``nn.Conv1d(d, d, K, groups=d, padding=K - 1)`` on ``x [b, d, l]`` (any strides):
    ``[b, d, l + K - 1]`` in ``out_dtype`` (default ``x``'s), rounded once from the float32 sum;
    ``weight [d, K]`` contiguous."""
    batch, channels, length = x.shape
    k = weight.shape[1]
    out = torch.empty(batch, channels, length + k - 1, device=x.device, dtype=out_dtype or x.dtype)
    jit(_forward_kernel)[_grid(batch, channels, out.shape[2])](
        x, weight, weight if bias is None else bias, out, channels, length, out.shape[2], *x.stride(), *out.stride(),
        K=k, HAS_BIAS=bias is not None, BLOCK_C=BLOCK_C, BLOCK_T=BLOCK_T, num_warps=4,
    )  # fmt: skip
    return out


def conv_input_grad(grad: Tensor, weight: Tensor, length: int, dtype: torch.dtype, channels_last: bool) -> Tensor:
    """The gradient for the input ``[b, d, length]`` of :func:`conv_forward` given the output's
    gradient ``grad [b, d, length + K - 1]``, in ``dtype``; ``channels_last``: stored as a
    transposed ``[b, length, d]``-contiguous tensor (the layout the mixers' input has), else
    ``[b, d, length]``-contiguous."""
    batch, channels = grad.shape[:2]
    if channels_last:
        dx = torch.empty(batch, length, channels, device=grad.device, dtype=dtype).transpose(1, 2)
    else:
        dx = torch.empty(batch, channels, length, device=grad.device, dtype=dtype)
    jit(_input_grad_kernel)[_grid(batch, channels, length)](
        grad, weight, dx, channels, length, *grad.stride(), *dx.stride(),
        K=weight.shape[1], BLOCK_C=BLOCK_C, BLOCK_T=BLOCK_T, num_warps=4,
    )  # fmt: skip
    return dx


class DepthwiseCausalConv(torch.autograd.Function):
    """:func:`conv_forward` with :func:`conv_input_grad` as its backward (weights constant)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Optional[Tensor], out_dtype: Optional[torch.dtype]) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(weight)
        ctx.length, ctx.dtype = x.shape[2], x.dtype
        ctx.channels_last = x.stride(1) == 1 and x.shape[1] > 1
        return conv_forward(x, weight, bias, out_dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        (weight,) = ctx.saved_tensors
        return conv_input_grad(grad, weight, ctx.length, ctx.dtype, ctx.channels_last), None, None, None


def depthwise_causal_conv(module: nn.Conv1d, x: Tensor, out_dtype: Optional[torch.dtype] = None) -> Tensor:
    """``module(x)``'s value (``[b, d, l + K - 1]``, in ``out_dtype``, default ``x``'s) by these kernels."""
    weight = module.weight.reshape(module.out_channels, module.kernel_size[0]).contiguous()
    return DepthwiseCausalConv.apply(x, weight, module.bias, out_dtype)
