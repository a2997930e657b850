"""The relevance scan through mamba-ssm's CUDA / Triton kernels.

MambaLRP's SSM rule makes the scan linear in x, which these kernels compute as they
are, provided that

- Mamba2's dt is passed *final* (after dt_bias, softplus and clamp): ``dt_bias=None,
  dt_softplus=False``; Mamba1's delta raw (``dt_proj``'s product) with its bias and
  ``delta_softplus=True``, as the model's own kernel takes it (no float32 step tensor is made;
  the steps around the reversed kernel compute the step where they read it), or final;
- delta, A, B, C, D are constants: the backward pass is the forward kernel run once more
  on the reversed problem (:mod:`.adjoint`), which computes dx and nothing else (the
  kernels' own backward would compute the gradients of delta, A, B, C, D as well);
- the gate is *not* fused (``z=None``): ``y * silu(z)`` and its SiLU stay outside, where
  the half rule and the identity rule apply.

Inputs are cast to float32 first, so accumulation and the returned relevance are float32
whatever the model's dtype.

mamba-ssm's kernels compute some memory offsets in 32-bit integers (mamba-ssm 2.3; state-spaces/
mamba#1015 for the SSD Triton kernels, #884 for the selective-scan CUDA kernel's chunk buffer): a
tensor they address past 2^31 elements gives a crash or, worse, plausible wrong numbers.
:func:`offsets_fit` bounds what a call addresses, and the scan's dispatch takes another backend
where it does not fit (our kernels address in 64 bits).
"""

from __future__ import annotations

import importlib.util
import math
from typing import Optional

import torch
from torch import Tensor

from .adjoint import relevance_scan_from

#: Chunk length of mamba-ssm's chunked SSD scan (the value its Mamba2 layer uses).
SSD_CHUNK = 256
#: Steps per chunk of mamba-ssm's selective-scan CUDA kernel (its carried-state buffer has one
#: entry per chunk: ``[b, d, chunks, 2 n]``).
SELECTIVE_SCAN_CHUNK = 2048
#: Elements a 32-bit signed offset reaches (offsets 0 to 2^31 - 1).
INT32_OFFSETS = 2**31


def _span(t: Tensor) -> int:
    """Elements from a tensor's first to its last addressed element, plus one (its ``numel`` when
    contiguous; more for a view into a wider tensor)."""
    if t.numel() == 0:
        return 0
    return 1 + sum((size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride()))


def offsets_fit(layout: str, x: Tensor, dt: Tensor, B: Tensor, C: Tensor) -> bool:
    """Do the offsets a mamba-ssm scan of these inputs computes fit 32 bits? The inputs' spans
    (views of a wide ``in_proj`` output count their parent's rows) and the kernels' own buffers:
    Mamba1's per-chunk state buffer ``[b, d, chunks, 2 n]``; SSD's chunk states ``[b, chunks, h, p,
    n]`` and chunk products ``[b, chunks, g, 256, 256]``. The reversed call has the same shapes.

    >>> x = torch.empty(1, 8, 4, 2)  # [b, l, h, p]
    >>> offsets_fit("ssd", x, torch.empty(1, 8, 4), torch.empty(1, 8, 1, 16), torch.empty(1, 8, 1, 16))
    True
    >>> x = torch.empty(1, 4, 2**30, device="meta")  # [b, d, l]: 2^32 elements (no memory on "meta")
    >>> offsets_fit("mamba1", x, x, torch.empty(1, 16, 2**30, device="meta"), torch.empty(1, 16, 2**30, device="meta"))
    False
    """
    spans = [_span(t) for t in (x, dt, B, C)]
    if layout == "mamba1":  # x [b, d, l], B [b, n, l]
        b, d, length = x.shape
        spans.append(b * d * math.ceil(length / SELECTIVE_SCAN_CHUNK) * 2 * B.shape[1])
    else:  # x [b, l, h, p], B [b, l, g, n]
        b, length, h, p = x.shape
        groups, n = B.shape[2], B.shape[3]
        chunks = math.ceil(length / SSD_CHUNK)
        spans += [b * chunks * h * p * n, b * chunks * groups * SSD_CHUNK * SSD_CHUNK]
    return max(spans) <= INT32_OFFSETS


def available() -> bool:
    """Is mamba-ssm installed (its kernels run on CUDA only)?"""
    try:
        return importlib.util.find_spec("mamba_ssm") is not None
    except (ImportError, ValueError):
        return False


def _selective_scan_forward(
    x: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor], dt_bias: Optional[Tensor] = None
) -> Tensor:
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn

    return selective_scan_fn(x, delta, A, B, C, D, z=None, delta_bias=dt_bias, delta_softplus=dt_bias is not None)


def _ssd_forward(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor]) -> Tensor:
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined

    return mamba_chunk_scan_combined(x, dt, A, B, C, SSD_CHUNK, D=D, z=None, dt_bias=None, dt_softplus=False)


def selective_scan(
    x: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Optional[Tensor],
    kernel_dtype: Optional[torch.dtype] = None,
    dt_bias: Optional[Tensor] = None,
    x_kernel: Optional[Tensor] = None,
) -> Tensor:
    """Mamba1 layout: ``x, delta [b, d, l]``, ``A [d, n]``, ``B, C [b, n, l]`` -> float32 ``[b, d, l]``;
    ``kernel_dtype``, ``dt_bias`` (``delta`` raw, the kernel's ``delta_bias`` and
    ``delta_softplus``), ``x_kernel``: see :func:`.adjoint.relevance_scan_from`."""
    return relevance_scan_from(_selective_scan_forward, "mamba1", x, delta, A, B, C, D, kernel_dtype, dt_bias, x_kernel)


def ssd_scan(
    x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor], kernel_dtype: Optional[torch.dtype] = None
) -> Tensor:
    """Mamba2 layout: ``x [b, l, h, p]``, ``dt [b, l, h]``, ``A [h]``, ``B, C [b, l, g, n]`` -> float32."""
    return relevance_scan_from(_ssd_forward, "ssd", x, dt, A, B, C, D, kernel_dtype)
