"""Element-wise parts of rule backward passes, fused into one kernel on CUDA.

The rules are defined by their torch expressions here; on a CUDA tensor with Triton
installed the same expression runs as one Triton kernel (one read of each input, one
write), instead of one kernel and one full pass over memory per torch operation. At long
sequences these passes are a large part of the backward pass (the outputs of ``in_proj``
alone hold ``2 * d_inner`` floats per token and layer).

- :func:`epsilon_scaled`: ``grad * |z| / (|z| + epsilon)``, LRP-epsilon's factor
  ``z / (z + epsilon * sign(z))`` (``sign(0) := 1``) written without the sign.
- :func:`half_silu_gate`: MambaLRP's default gate ``y * silu(z)`` (half rule on the
  product, identity rule on the SiLU): forward ``y * z * sigmoid(z)``, backward
  ``dy = g/2 * z * sigmoid(z)``, ``dz = g/2 * y * sigmoid(z)``; one kernel each way.
"""

from __future__ import annotations

import os
from typing import Any, Dict, Tuple

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


    def _gate_forward_kernel(y_ptr, z_ptr, out_ptr, rows, cols, sy0, sy1, sy2, sz0, sz1, sz2, so0, so1, so2,
                             BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        b = tl.program_id(2).to(tl.int64)
        r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        mask = (r[:, None] < rows) & (c[None, :] < cols)
        r, c = r.to(tl.int64)[:, None], c.to(tl.int64)[None, :]
        y = tl.load(y_ptr + b * sy0 + r * sy1 + c * sy2, mask=mask, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + b * sz0 + r * sz1 + c * sz2, mask=mask, other=0.0).to(tl.float32)
        out = y * (z * tl.sigmoid(z))
        tl.store(out_ptr + b * so0 + r * so1 + c * so2, out.to(out_ptr.dtype.element_ty), mask=mask)

    def _gate_backward_kernel(g_ptr, y_ptr, z_ptr, dy_ptr, dz_ptr, rows, cols, sg0, sg1, sg2, sy0, sy1, sy2,
                              sz0, sz1, sz2, sdy0, sdy1, sdy2, sdz0, sdz1, sdz2,
                              BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
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


_JITTED: Dict[Any, Any] = {}


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _kernel(fn: Any) -> Any:
    """``fn`` jitted, on first use (so that ``TRITON_INTERPRET=1``, set before, runs it in
    Triton's interpreter on the CPU, as the tests do)."""
    key = (fn.__name__, _interpreting())
    if key not in _JITTED:
        _JITTED[key] = triton.jit(fn)
    return _JITTED[key]


def fused_kernels_enabled(*tensors: Tensor) -> bool:
    """May the fused kernels run on these tensors? (CUDA or the interpreter, Triton
    installed, float dtypes, and not turned off by ``CAPTUM_MAMBALRP_FUSED=0``.)"""
    return (
        triton is not None
        and all(t.is_cuda or _interpreting() for t in tensors)
        and os.environ.get("CAPTUM_MAMBALRP_FUSED", "1") != "0"
        and all(t.dtype in (torch.float32, torch.bfloat16, torch.float16) for t in tensors)
    )


def _use_kernel(grad: Tensor, z: Tensor) -> bool:
    return fused_kernels_enabled(grad, z) and grad.shape == z.shape and grad.dtype == z.dtype


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
    _kernel(_epsilon_scaled_kernel)[(triton.cdiv(n, block),)](grad, z, out, n, float(epsilon), BLOCK=block, num_warps=8)
    return out


def half_silu_gate_torch(y: Tensor, z: Tensor) -> Tensor:
    """The default gate as the rules compose it: ``HalfGateRule`` on
    ``y * IdentityActivationRule(silu)(z)`` (the definition the fused kernel follows)."""
    act = z * torch.sigmoid(z).detach()
    half = (y * act) * 0.5
    return half + half.detach()


_GATE_BLOCK = (32, 64)


def _gate_grid(shape: torch.Size) -> Tuple[int, int, int]:
    return (triton.cdiv(shape[1], _GATE_BLOCK[0]), triton.cdiv(shape[2], _GATE_BLOCK[1]), shape[0])


class _HalfSiluGate(torch.autograd.Function):
    """``y * silu(z)`` with the half and identity rules, one Triton kernel each way; 3-D
    ``[b, r, c]`` views of any strides, output laid out as ``out_layout`` gives."""

    @staticmethod
    def forward(ctx, y: Tensor, z: Tensor, transposed_out: bool) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(y, z)
        b, r, c = y.shape
        out = torch.empty(b, c, r, device=y.device, dtype=y.dtype).transpose(1, 2) if transposed_out else \
            torch.empty(b, r, c, device=y.device, dtype=y.dtype)
        _kernel(_gate_forward_kernel)[_gate_grid(y.shape)](
            y, z, out, r, c, *y.stride(), *z.stride(), *out.stride(),
            BLOCK_R=_GATE_BLOCK[0], BLOCK_C=_GATE_BLOCK[1], num_warps=4)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        y, z = ctx.saved_tensors
        dy, dz = torch.empty_like(y), torch.empty_like(z)
        b, r, c = y.shape
        _kernel(_gate_backward_kernel)[_gate_grid(y.shape)](
            grad, y, z, dy, dz, r, c, *grad.stride(), *y.stride(), *z.stride(), *dy.stride(), *dz.stride(),
            BLOCK_R=_GATE_BLOCK[0], BLOCK_C=_GATE_BLOCK[1], num_warps=4)
        return dy, dz, None


def half_silu_gate(y: Tensor, z: Tensor, transposed_out: bool = False) -> Tensor:
    """MambaLRP's default gate ``y * silu(z)`` on ``[b, r, c]`` tensors: one Triton kernel each
    way on CUDA (``transposed_out``: the result is stored ``[b, c, r]``-contiguous, the
    layout the next linear layer reads), :func:`half_silu_gate_torch` otherwise."""
    if y.dim() == 3 and y.shape == z.shape and y.dtype == z.dtype and fused_kernels_enabled(y, z):
        return _HalfSiluGate.apply(y, z, transposed_out)
    return half_silu_gate_torch(y, z)
