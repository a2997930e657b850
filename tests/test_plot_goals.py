"""``benchmarks/plot_goals.py``: which rows the goal figure shows (the latest per shape, batch,
length, dtype and CUDA-graph flag; none without a ratio), from both result formats."""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

from plot_goals import latest, plot  # noqa: E402


def test_latest_rows_from_both_formats_and_the_figure(tmp_path):
    scale = tmp_path / "gpu_scale.jsonl"  # gpu_scale.py: one JSON object per line
    rows = [
        {"shape": "falcon7b", "dtype": "bfloat16", "batch": 1, "length": 4096, "cuda_graph": False, "ratio": 2.4},
        {"shape": "falcon7b", "dtype": "bfloat16", "batch": 1, "length": 131072, "cuda_graph": False, "error": "out of memory"},
        {"shape": "no_such_shape", "dtype": "bfloat16", "batch": 1, "length": 4096, "ratio": 9.0},
        {"shape": "mamba2_2p7b", "dtype": "bfloat16", "batch": 1, "length": 4096, "cuda_graph": True, "ratio": 2.01},
        {"shape": "mamba2_2p7b", "dtype": "bfloat16", "batch": 1, "length": 4096, "cuda_graph": False, "ratio": 4.76},
        # --decay-kernel compare: eager rows count with the kernel (the default), graph rows without
        {
            "shape": "mamba2_130m",
            "dtype": "float32",
            "length": 16384,
            "cuda_graph": False,
            "ratio": 2.29,
            "ratio_decay_kernel": 2.21,
        },
        {
            "shape": "mamba2_130m",
            "dtype": "float32",
            "length": 16384,
            "cuda_graph": True,
            "ratio": 2.16,
            "ratio_decay_kernel": 2.16,
        },
    ]
    scale.write_text("".join(json.dumps(r) + "\n" for r in rows))
    later = tmp_path / "gpu_scale_2.jsonl"
    later.write_text(json.dumps({**rows[0], "ratio": 2.11}) + "\n")
    hybrids = tmp_path / "nemotron.json"  # gpu_hybrids.py: {"rows": [...]} with L
    hybrids.write_text(json.dumps({"rows": [{"shape": "nemotron_h_8b", "L": 4096, "batch": 16, "ratio": 2.66}]}))
    got = latest([str(scale), str(later), str(hybrids)])
    assert {k: round(r["ratio"], 2) for k, r in got.items()} == {
        ("falcon7b", 1, 4096, "bfloat16", False): 2.11,  # the later file's row
        ("mamba2_2p7b", 1, 4096, "bfloat16", True): 2.01,
        ("mamba2_2p7b", 1, 4096, "bfloat16", False): 4.76,
        ("nemotron_h_8b", 16, 4096, "bfloat16", False): 2.66,
        ("mamba2_130m", 1, 16384, "float32", False): 2.21,
        ("mamba2_130m", 1, 16384, "float32", True): 2.16,
    }
    # --ssd-kernel compare (a fresh graph recorded for the second pass): both rows count with the kernel
    ssd = tmp_path / "gpu_scale_ssd.jsonl"
    base = {"shape": "mamba2_130m", "dtype": "float32", "length": 16384}
    ssd.write_text(
        json.dumps({**base, "cuda_graph": False, "ratio": 2.18, "ratio_ssd_kernel": 2.10})
        + "\n"
        + json.dumps({**base, "cuda_graph": True, "ratio": 2.07, "ratio_ssd_kernel": 2.006})
        + "\n"
    )
    with_ssd = latest([str(scale), str(ssd)])
    assert round(with_ssd[("mamba2_130m", 1, 16384, "float32", False)]["ratio"], 3) == 2.10
    assert round(with_ssd[("mamba2_130m", 1, 16384, "float32", True)]["ratio"], 3) == 2.006
    # --split-kernel compare: the same, with the SiLU-split kernel's ratio
    split = tmp_path / "gpu_scale_split.jsonl"
    split.write_text(json.dumps({**base, "cuda_graph": True, "ratio": 1.88, "ratio_split_kernel": 1.71}) + "\n")
    with_split = latest([str(ssd), str(split)])
    assert round(with_split[("mamba2_130m", 1, 16384, "float32", True)]["ratio"], 3) == 1.71
    assert round(with_split[("mamba2_130m", 1, 16384, "float32", False)]["ratio"], 3) == 2.10
    # --conv-output compare (run 12 on): the float32 conv output is the default, its ratio counts
    conv = tmp_path / "gpu_scale_conv.jsonl"
    falcon = {"shape": "falcon7b", "dtype": "bfloat16", "length": 32768, "cuda_graph": False}
    conv.write_text(json.dumps({**falcon, "ratio": 2.36, "ratio_conv_compute": 2.42}) + "\n")
    assert round(latest([str(scale), str(conv)])[("falcon7b", 1, 32768, "bfloat16", False)]["ratio"], 3) == 2.42
    out = tmp_path / "goals.png"
    plot(got, str(out))
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
