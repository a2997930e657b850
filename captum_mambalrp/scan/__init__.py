"""Selective scans for relevance: one recurrence, one canonical scan, two layouts.

- :func:`selective_scan`: Mamba1 (mamba-ssm's kernel layout, as in transformers);
- :func:`ssd_scan`: Mamba2's SSD (transformers' ``mamba2_chunk_scan`` layout).

Both reshape to the canonical layout of :mod:`.linear_scan` and run the same scan.
``linear=True`` treats the parameters as constants (MambaLRP; memory-lean backward),
``linear=False`` is differentiable in everything (the plain-gradient ablation).
"""

from __future__ import annotations

from typing import Optional

from torch import Tensor

from .linear_scan import relevance_scan, scan_forward, scan_input_gradient
from .recurrence import linear_recurrence

BACKENDS = ("auto", "torch")


def _run(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor], linear: bool, backend: str) -> Tensor:
    if backend not in BACKENDS:
        raise ValueError(f"unknown scan backend {backend!r}; choose one of {BACKENDS}")
    if linear:
        return relevance_scan(x, dt, A, B, C, D)
    return scan_forward(x, dt, A, B, C, D)


def selective_scan(
    x: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor] = None,
    *, linear: bool = True, backend: str = "auto",
) -> Tensor:
    """Mamba1: ``x, delta [b, d, l]``, ``A [d, n]``, ``B, C [b, n, l]``, ``D [d]`` -> float32 ``[b, d, l]``."""
    Bc, Cc = B.transpose(1, 2).unsqueeze(1), C.transpose(1, 2).unsqueeze(1)  # [b, 1, l, n]
    Dc = None if D is None else D[:, None]
    return _run(x, delta, A[:, None, :], Bc, Cc, Dc, linear, backend)


def ssd_scan(
    x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor] = None,
    *, linear: bool = True, backend: str = "auto",
) -> Tensor:
    """Mamba2: ``x [b, l, h, p]``, ``dt [b, l, h]`` (final), ``A [h]``, ``B, C [b, l, g, n]``,
    ``D [h]`` or ``[h, p]`` -> float32 ``[b, l, h, p]``."""
    heads, groups = x.shape[2], B.shape[2]
    xc = x.permute(0, 2, 3, 1)  # [b, h, p, l]
    dtc = dt.permute(0, 2, 1).unsqueeze(2)  # [b, h, 1, l]
    Bc = B.repeat_interleave(heads // groups, dim=2).permute(0, 2, 1, 3).unsqueeze(2)  # [b, h, 1, l, n]
    Cc = C.repeat_interleave(heads // groups, dim=2).permute(0, 2, 1, 3).unsqueeze(2)
    Ac = A.reshape(heads, 1, 1, 1)
    Dc = None if D is None else (D.reshape(heads, 1, 1) if D.dim() == 1 else D.reshape(heads, -1, 1))
    y = _run(xc, dtc, Ac, Bc, Cc, Dc, linear, backend)
    return y.permute(0, 3, 1, 2)


__all__ = ["BACKENDS", "linear_recurrence", "relevance_scan", "scan_forward", "scan_input_gradient",
           "selective_scan", "ssd_scan"]
