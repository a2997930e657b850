"""Issue 14's speed goals at a glance: attribution / forward per shape and length, and the batch
throughput share, from the rows of ``gpu_scale.py`` (``.jsonl``) and ``gpu_hybrids.py`` (``.json``).

A later file's row replaces an earlier one's for the same shape, batch, length, dtype and
``cuda_graph`` (pass the files oldest first). Rows without a ratio (out of memory, a forward that
failed) are left out. Goal lines: 2.5x for the 7B-class shapes in bf16, 2.0x for the 130M shapes in
fp32, 40 % of the forward's tokens per second for a batch of 16 x 4096. A ``--decay-kernel
compare`` row (eager) and an ``--ssd-kernel compare`` or ``--split-kernel compare`` row (eager or
graph) count with the kernel, on by default; a ``--conv-output compare`` row with the float32 conv
output, the default since run 12.

    R=docs/results/2026-12-02
    python3 benchmarks/plot_goals.py $R/h200_run7/gpu_scale_call{1,2,3,4,6}.jsonl \\
        $R/h200_run8/gpu_scale_call1.jsonl $R/h200_run8/nemotron_1x4096_call3.json \\
        $R/h200_run8/nemotron_1x32768_call4.json $R/h200_run8/nemotron_16x4096_call4.json \\
        $R/h200_run9/gpu_scale_call2.jsonl $R/h200_run9/nemotron_16x4096_call2.json \\
        $R/h200_run9/nemotron_131072_call3.json docs/results/2026-12-03/h200_run10/gpu_scale_call3.jsonl \\
        docs/results/2026-12-03/h200_run11/gpu_scale_call2.jsonl \\
        docs/results/2026-12-03/h200_run12/gpu_scale_call{2,7}.jsonl \\
        docs/results/2026-12-03/h200_run13/gpu_scale_call{3,4,6,7}.jsonl \\
        docs/results/2026-12-03/h200_run13/nemotron_{16x4096_call6,1x32768_call6,1x4096_call7}.json \\
        --out docs/img/issue14_goals.png
"""

from __future__ import annotations

import argparse
import json
from typing import Any, Dict, Iterable, List, Tuple

#: the label of each shape
SHAPES = {
    "falcon7b": "Falcon-Mamba-7B, bf16",
    "mamba2_2p7b": "Mamba2-2.7B, bf16",
    "nemotron_h_8b": "Nemotron-H-8B, bf16",
    "mamba1_130m": "Mamba-130M, fp32",
    "mamba2_130m": "Mamba2-130M, fp32",
}
#: goal 1 (attribution / forward) and the shapes it is for
GOALS = {2.5: "7B class", 2.0: "130M fp32"}
#: goal 4: the attribution's tokens per second over the forward's, for 16 x 4096 tokens
THROUGHPUT_GOAL = 0.40

Key = Tuple[str, int, int, str, bool]


def rows_of(path: str) -> Iterable[Dict[str, Any]]:
    """The result rows of one file: ``gpu_scale.py``'s JSON lines, or ``gpu_hybrids.py``'s JSON
    (its ``rows``, with ``L`` as ``length``)."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if path.endswith(".jsonl"):
        for line in text.splitlines():
            if line.strip():
                yield json.loads(line)
        return
    data = json.loads(text)
    for row in data.get("rows", []) if isinstance(data, dict) else []:
        yield {**row, "length": row.get("length", row.get("L")), "dtype": row.get("dtype", "bfloat16")}


def latest(paths: List[str]) -> Dict[Key, Dict[str, Any]]:
    """The last row with a ratio per (shape, batch, length, dtype, cuda_graph), in the order given."""
    out: Dict[Key, Dict[str, Any]] = {}
    for path in paths:
        for row in rows_of(path):
            if row.get("ratio") is None or row.get("shape") not in SHAPES or not row.get("length"):
                continue
            key = (
                row["shape"],
                int(row.get("batch") or 1),
                int(row["length"]),
                str(row.get("dtype")),
                bool(row.get("cuda_graph")),
            )
            shipped = ("ratio_ssd_kernel", "ratio_split_kernel", "ratio_conv_compute")
            compared = [k for k in shipped if row.get(k) is not None]
            if compared:
                # ``--ssd-kernel compare`` (run 10 on), ``--split-kernel compare`` (run 11 on) or
                # ``--conv-output compare`` (run 12 on): the compared side is the default; a fresh
                # graph is recorded for each half
                row = {**row, "ratio": row[compared[0]]}
            elif row.get("ratio_decay_kernel") is not None and not row.get("cuda_graph"):
                # ``--decay-kernel compare``: the kernel is the default since run 9 (run 9's graph
                # comparison replayed the graph recorded without it)
                row = {**row, "ratio": row["ratio_decay_kernel"]}
            out[key] = row
    return out


def plot(rows: Dict[Key, Dict[str, Any]], out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11.5, 4.8), gridspec_kw={"width_ratios": [2.3, 1]})
    colors = dict(zip(SHAPES, ["#c0392b", "#2471a3", "#7d3c98", "#b9770e", "#148f77"]))
    top = 3.4  # a ratio above it is drawn at the edge, with its value
    for shape, label in SHAPES.items():
        for graph in (False, True):
            points = sorted((k[2], r["ratio"]) for k, r in rows.items() if k[0] == shape and k[1] == 1 and k[4] == graph)
            if not points:
                continue
            xs, ys = zip(*points)
            shown = [min(y, top) for y in ys]
            name = label + (", CUDA graph" if graph else "")
            left.plot(xs, shown, "--" if graph else "-", marker="s" if graph else "o", color=colors[shape], label=name)
            for x, y in points:
                text = f"{y:.2f}" if y <= top else f"{y:.2f} (off the scale)"
                left.annotate(
                    text,
                    (x, min(y, top)),
                    textcoords="offset points",
                    xytext=(5, -10 if y > top else 4),
                    fontsize=7,
                    color=colors[shape],
                )
    left.set_xscale("log", base=2)
    left.set_ylim(1.7, top + 0.05)
    right_edge = max((k[2] for k in rows), default=2**17) * 1.15
    left.set_xlim(right=right_edge)
    for goal, which in GOALS.items():
        left.axhline(goal, color="grey", linestyle=":", linewidth=1)
        left.text(right_edge, goal, f" {goal}x: {which}", fontsize=7, color="grey", va="center")
    left.set_xlabel("tokens (batch 1)")
    left.set_ylabel("attribution time / forward time")
    left.set_title("Goal 1: one attribution in forward passes (H200)")
    left.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=3, frameon=False)
    bars = [(SHAPES[k[0]], 1 / r["ratio"]) for k, r in sorted(rows.items()) if k[1] == 16 and k[2] == 4096 and not k[4]]
    if bars:
        names, shares = zip(*bars)
        right.bar(
            range(len(bars)),
            [100 * s for s in shares],
            color=[colors[k[0]] for k in sorted(rows) if k[1] == 16 and k[2] == 4096 and not k[4]],
        )
        for i, s in enumerate(shares):
            right.text(i, 100 * s + 0.6, f"{100 * s:.1f} %", ha="center", fontsize=8)
        right.set_xticks(range(len(bars)))
        right.set_xticklabels([n.replace(", ", "\n") for n in names], fontsize=8)
    right.axhline(100 * THROUGHPUT_GOAL, color="grey", linestyle=":", linewidth=1)
    right.set_ylim(0, 60)
    right.set_ylabel("attribution tokens/s, % of the forward's")
    right.set_title("Goal 4: 16 x 4096 tokens")
    fig.tight_layout()
    fig.savefig(out, dpi=130)
    print(f"wrote {out} ({len(rows)} rows)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("files", nargs="+", help="gpu_scale.py .jsonl and gpu_hybrids.py .json results, oldest first")
    p.add_argument("--out", default="issue14_goals.png")
    a = p.parse_args()
    rows = latest(a.files)
    for key, row in sorted(rows.items()):
        print(f"{key[0]:>14} batch {key[1]:>2} L {key[2]:>7} {key[3]:>8} graph={key[4]!s:5} ratio {row['ratio']:.2f}")
    plot(rows, a.out)


if __name__ == "__main__":
    main()
