"""Selective scans: one recurrence, a relevance scan (constants) and a differentiable one."""

from __future__ import annotations

from typing import Optional

from torch import Tensor

from .recurrence import linear_recurrence
from .selective import relevance_scan, scan_forward, scan_input_gradient

BACKENDS = ("auto", "torch")


def selective_scan(
    x: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor] = None,
    *, linear: bool = True, backend: str = "auto",
) -> Tensor:
    """Mamba1 scan, float32 ``[b, d, l]``. ``linear=True``: delta, A, B, C are constants
    and only ``x`` gets a gradient (MambaLRP); ``False``: differentiable in everything."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown scan backend {backend!r}; choose one of {BACKENDS}")
    if not linear:
        return scan_forward(x, delta, A, B, C, D)
    return relevance_scan(x, delta, A, B, C, D)


__all__ = ["BACKENDS", "linear_recurrence", "relevance_scan", "scan_forward", "scan_input_gradient", "selective_scan"]
