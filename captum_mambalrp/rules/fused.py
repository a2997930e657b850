"""Element-wise parts of rule backward passes, fused into one kernel on CUDA.

The rules are defined by their torch expressions here; on a CUDA tensor with Triton
installed the same expression runs as one Triton kernel (one read of each input, one
write), instead of one kernel and one full pass over memory per torch operation. At long
sequences these passes are a large part of the backward pass (the outputs of ``in_proj``
alone hold ``2 * d_inner`` floats per token and layer).

- :func:`epsilon_scaled`: ``grad * |z| / (|z| + epsilon)``, LRP-epsilon's factor
  ``z / (z + epsilon * sign(z))`` (``sign(0) := 1``) written without the sign.
"""

from __future__ import annotations

import os
from typing import Any, Dict

import torch
from torch import Tensor

try:  # Triton ships with CUDA builds of torch
    import triton
    import triton.language as tl
except Exception:  # pragma: no cover - absent, or broken on this install
    triton = None
    tl = None


def epsilon_scaled_torch(grad: Tensor, z: Tensor, epsilon: float) -> Tensor:
    """``grad * (|z| / (|z| + epsilon))`` with torch operations (any device; the definition)."""
    magnitude = z.abs()
    ratio = magnitude / (magnitude + epsilon)
    return grad * ratio


if triton is not None:

    def _epsilon_scaled_kernel(grad_ptr, z_ptr, out_ptr, n, epsilon, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        g = tl.load(grad_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        z = tl.abs(tl.load(z_ptr + offs, mask=mask, other=0.0).to(tl.float32))
        ratio = tl.math.div_rn(z, z + epsilon)  # IEEE division, as torch's
        tl.store(out_ptr + offs, (g * ratio).to(out_ptr.dtype.element_ty), mask=mask)


_JITTED: Dict[bool, Any] = {}


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _kernel() -> Any:
    """The jitted kernel, made on first use (so that ``TRITON_INTERPRET=1``, set before,
    runs it in Triton's interpreter on the CPU, as the tests do)."""
    key = _interpreting()
    if key not in _JITTED:
        _JITTED[key] = triton.jit(_epsilon_scaled_kernel)
    return _JITTED[key]


def _use_kernel(grad: Tensor, z: Tensor) -> bool:
    return (
        triton is not None
        and (grad.is_cuda or _interpreting())
        and os.environ.get("CAPTUM_MAMBALRP_FUSED", "1") != "0"
        and grad.shape == z.shape
        and grad.dtype == z.dtype
        and grad.dtype in (torch.float32, torch.bfloat16, torch.float16)
    )


def epsilon_scaled(grad: Tensor, z: Tensor, epsilon: float) -> Tensor:
    """``grad * |z| / (|z| + epsilon)``: one Triton kernel on CUDA (computed in float32,
    returned in ``grad``'s dtype; ``CAPTUM_MAMBALRP_FUSED=0`` turns it off), torch
    operations otherwise."""
    if not _use_kernel(grad, z):
        return epsilon_scaled_torch(grad, z, epsilon)
    grad, z = grad.contiguous(), z.contiguous()
    out = torch.empty_like(grad)
    n = grad.numel()
    block = 2048
    _kernel()[(triton.cdiv(n, block),)](grad, z, out, n, float(epsilon), BLOCK=block, num_warps=8)
    return out
