"""Helpers shared by the fused-kernel checks (run in Triton's interpreter in a subprocess, or on CUDA)."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Callable, TypeVar

T = TypeVar("T")


def with_env(name: str, value: str, fn: Callable[[], T]) -> T:
    """``fn()`` with the environment variable ``name`` set to ``value``, restored afterwards."""
    previous = os.environ.get(name)
    os.environ[name] = value
    try:
        return fn()
    finally:
        if previous is None:
            del os.environ[name]
        else:
            os.environ[name] = previous


def unfused(fn: Callable[[], T]) -> T:
    """``fn()`` with the fused kernels turned off (``CAPTUM_MAMBALRP_FUSED=0``): the torch definitions."""
    return with_env("CAPTUM_MAMBALRP_FUSED", "0", fn)


def run_in_interpreter(script: str) -> None:
    """Run ``script`` (Python source that prints ``ok`` last) in a fresh process under Triton's
    interpreter (``TRITON_INTERPRET=1`` must be set before triton is imported), the repository on
    its path; fail with the end of its stderr unless it ends with ``ok``."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root, "TRITON_INTERPRET": "1"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=root, env=env)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]
