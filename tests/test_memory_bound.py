"""``benchmarks/memory_bound.py``: the best case of ``recompute="auto"``'s design by memory, from the
plan's own estimates on a ``meta`` model (no weights)."""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

memory_bound = pytest.importorskip("memory_bound")


def test_floor_rises_with_length_and_falls_with_the_best_cases():
    lengths = [1024, 16384, 65536, 262144]
    rows = memory_bound.bound("mamba2_130m", lengths, device_gib=24.0)
    assert rows[0]["auto_keeps_everything"] and rows[0]["kept_share"] == 1.0 and rows[0]["floor"] == pytest.approx(2.0)
    fs = [r["f"] for r in rows]
    assert fs == sorted(fs) and fs[-1] > 0.3  # more tokens, less kept, more recomputed
    assert all(0.0 <= r["kept_share"] <= 1.0 and r["floor"] == pytest.approx(2.0 + r["f"]) for r in rows)
    best = memory_bound.bound("mamba2_130m", lengths, device_gib=24.0, inputs_on_host=True, no_working_set=True)
    assert all(b["f"] <= r["f"] for b, r in zip(best, rows)) and best[-1]["f"] < rows[-1]["f"]
    assert all(b["recompute_needs_gib"] == pytest.approx(0.0, abs=1e-9) for b in best)  # a pure Mamba2 stack
    assert rows[-1]["fits"] is False and best[-1]["fits"] is True


def test_recomputed_share_follows_the_room():
    """The more memory, the more products kept and the fewer multiply-adds recomputed; out_proj's
    outputs go first (twice the multiply-adds per byte of in_proj's), so the share kept falls
    slower than the share recomputed rises."""
    rows = [memory_bound.bound("mamba2_130m", [131072], device_gib=g)[0] for g in (16.0, 20.0, 24.0)]
    kept, f = [r["kept_share"] for r in rows], [r["f"] for r in rows]
    assert 0.0 < kept[0] < kept[1] < kept[2] < 1.0 and f[0] > f[1] > f[2] > 0.0
    assert all(1.0 - r["f"] > r["kept_share"] for r in rows)  # spared share above kept share
