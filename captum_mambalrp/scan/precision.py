"""The dtype relevance is computed in: ``max(model dtype, float32)``.

float64 models stay float64 (relevance conserved to float64 rounding); float32 stays
float32; bfloat16 and float16 models compute the scan, its constants (dt, exp(A)) and the
rules' factors in float32, as mamba-ssm's own kernels accumulate.
"""

from __future__ import annotations

from typing import Union

import torch
from torch import Tensor


def compute_dtype(t: Union[Tensor, torch.dtype]) -> torch.dtype:
    """The dtype to compute in for a tensor (or dtype) ``t``: ``float64`` for float64, else ``float32``.

    Returns:
        ``torch.promote_types(dtype, torch.float32)`` (integer and bool inputs give float32).

    >>> compute_dtype(torch.bfloat16), compute_dtype(torch.float64)
    (torch.float32, torch.float64)
    """
    dtype = t.dtype if isinstance(t, Tensor) else t
    if not dtype.is_floating_point:
        return torch.float32
    return torch.promote_types(dtype, torch.float32)
