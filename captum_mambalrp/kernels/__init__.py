"""Our Triton kernels, and when they may run. Importing this package never imports Triton.

- :mod:`.elementwise`: rule steps fused into one kernel each (LRP-epsilon's backward
  factor, the default gate, the steps around the reversed adjoint scan); each follows a
  torch definition kept beside its rule (``rules/linear.py``, ``rules/gate.py``,
  ``scan/adjoint.py``) and is tested against it in Triton's interpreter.
- The scan kernel itself is a backend of the scan: ``scan/triton_scan.py``.

Kernels are jitted on first use (:func:`jit`), so that ``TRITON_INTERPRET=1`` set before
runs them in Triton's interpreter on the CPU, as the tests do.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any, Callable, Dict, Tuple

import torch
from torch import Tensor

_JITTED: Dict[Tuple[Callable[..., Any], bool], Any] = {}


def triton_installed() -> bool:
    """Is triton importable here (without importing it)?"""
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):
        return False


def interpreting() -> bool:
    """Does Triton run kernels in its interpreter (``TRITON_INTERPRET=1``, CPU tensors)?"""
    return os.environ.get("TRITON_INTERPRET") == "1"


def jit(fn: Callable[..., Any]) -> Any:
    """``triton.jit(fn)``, made once per interpreter setting."""
    key = (fn, interpreting())
    if key not in _JITTED:
        import triton

        _JITTED[key] = triton.jit(fn)
    return _JITTED[key]


def fused_kernels_on(device_type: str) -> bool:
    """Do the fused kernels run on devices of this type ("cuda", "cpu", ...)? (Triton installed,
    CUDA or the interpreter, not turned off by ``CAPTUM_MAMBALRP_FUSED=0``.)"""
    return (
        os.environ.get("CAPTUM_MAMBALRP_FUSED", "1") != "0" and (device_type == "cuda" or interpreting()) and triton_installed()
    )


def fused_kernels_enabled(*tensors: Tensor) -> bool:
    """May the fused element-wise kernels run on these tensors? (:func:`fused_kernels_on` for
    each one's device, float dtypes.)"""
    return all(t.dtype in (torch.float32, torch.bfloat16, torch.float16) for t in tensors) and all(
        fused_kernels_on(t.device.type) for t in tensors
    )
