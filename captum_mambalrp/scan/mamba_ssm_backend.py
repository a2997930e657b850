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
"""

from __future__ import annotations

import importlib.util
from typing import Optional

import torch
from torch import Tensor

from .adjoint import relevance_scan_from

#: Chunk length of mamba-ssm's chunked SSD scan (the value its Mamba2 layer uses).
SSD_CHUNK = 256


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
