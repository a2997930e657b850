"""Means with standard errors, paired differences, and markdown tables."""

from __future__ import annotations

import math
from typing import Sequence, Tuple, Union

import numpy as np


def mean_se(values: Union[Sequence[float], np.ndarray]) -> Tuple[float, float]:
    """Mean and standard error ``std(ddof=1) / sqrt(n)`` (``nan`` SE for fewer than two values)."""
    x = np.asarray(values, dtype=np.float64)
    x = x[~np.isnan(x)]
    if len(x) == 0:
        return math.nan, math.nan
    se = float(x.std(ddof=1) / math.sqrt(len(x))) if len(x) > 1 else math.nan
    return float(x.mean()), se


def paired_difference(a: Sequence[float], b: Sequence[float]) -> Tuple[float, float]:
    """Mean and standard error of ``a_i - b_i`` over the same examples."""
    return mean_se(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64))


def fmt(mean: float, se: float, digits: int = 3) -> str:
    """``"1.234 ± 0.056"`` (or just the mean when there is no SE)."""
    if math.isnan(mean):
        return "n/a"
    return f"{mean:.{digits}f}" if math.isnan(se) else f"{mean:.{digits}f} ± {se:.{digits}f}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]], align: str = "") -> str:
    """A GitHub markdown table; ``align`` gives one of ``l``/``r`` per column (default: first left, rest right)."""
    align = align or "l" + "r" * (len(header) - 1)
    rule = ["---:" if a == "r" else ":---" for a in align]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(rule) + " |"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
