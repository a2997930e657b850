"""Helpers shared by the fused-kernel checks (run in Triton's interpreter in a subprocess, or on CUDA)."""

from __future__ import annotations

import os
from typing import Callable, TypeVar

T = TypeVar("T")


def unfused(fn: Callable[[], T]) -> T:
    """``fn()`` with the fused kernels turned off (``CAPTUM_MAMBALRP_FUSED=0``): the torch definitions."""
    previous = os.environ.get("CAPTUM_MAMBALRP_FUSED")
    os.environ["CAPTUM_MAMBALRP_FUSED"] = "0"
    try:
        return fn()
    finally:
        if previous is None:
            del os.environ["CAPTUM_MAMBALRP_FUSED"]
        else:
            os.environ["CAPTUM_MAMBALRP_FUSED"] = previous
