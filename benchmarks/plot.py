"""Log-log plot of time and peak memory against L, one line per method, from result JSON.

python benchmarks/plot.py docs/results/cpu.json [gpu_results.json ...] --out docs/benchmarks.png
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from typing import Any, Dict, List, Tuple


def series(results: List[Dict[str, Any]]) -> Tuple[Dict[str, List[Tuple[int, float]]], Dict[str, List[Tuple[int, float]]]]:
    """(time, memory) points per label: ``device/arch method[backend] dtype``."""
    times: Dict[str, List[Tuple[int, float]]] = defaultdict(list)
    mems: Dict[str, List[Tuple[int, float]]] = defaultdict(list)
    for res in results:
        threads = (res.get("args") or {}).get("threads")
        for r in res.get("rows", []):
            if "L" not in r or r.get("part", "time") not in ("time", "long") and r.get("device") != "cpu":
                continue
            t = r.get("time_s", r.get("best_s"))
            if t is None:
                continue
            dev = r.get("device", "gpu")
            label = f"{dev} {r.get('arch', 'mamba1')} {r.get('method', '?')}"
            if r.get("backend") and r.get("backend") != "auto":
                label += f"[{r['backend']}]"
            if r.get("dtype"):
                label += f" {r['dtype']}"
            if dev == "cpu" and threads:
                label += f" ({threads} thread{'s' if threads > 1 else ''})"
            times[label].append((r["L"], t))
            if r.get("peak_gib") is not None:
                mems[label].append((r["L"], r["peak_gib"]))
            elif r.get("peak_mib_per_token") is not None:
                mems[label].append((r["L"], r["peak_mib_per_token"] * r["L"] / 1024))
            elif r.get("peak_extra_mib") is not None:
                mems[label].append((r["L"], r["peak_extra_mib"] / 1024))
    return times, mems


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument(
        "results",
        nargs="+",
        help="JSON files written by cpu_bench.py / gpu_all.py; FILE:long (or FILE:time) keeps only that part of a file",
    )
    p.add_argument("--out", default="docs/benchmarks.png")
    args = p.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = []
    for spec in args.results:
        path, _, part = spec.partition(":")
        res = json.load(open(path))
        if part:
            res["rows"] = [r for r in res.get("rows", []) if r.get("part") == part]
        results.append(res)
    times, mems = series(results)
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(15, 6))
    labels = sorted(set(times) | set(mems))
    cmap = plt.get_cmap("tab20")
    style = {
        lab: dict(color=cmap(i % 20), marker="os^Dv<>p"[i % 8], linestyle="--" if lab.startswith("cpu") else "-")
        for i, lab in enumerate(labels)
    }
    for ax, data, ylabel in ((ax_t, times, "time (s)"), (ax_m, mems, "peak memory (GiB)")):
        for label, pts in sorted(data.items()):
            pts = sorted(set(pts))
            ax.plot([p[0] for p in pts], [p[1] for p in pts], label=label, **style[label])
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length L (tokens)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    ax_t.set_title("attribution time vs L (batch 1, Mamba-130M shape)")
    ax_m.set_title("peak memory vs L")
    handles, names = ax_t.get_legend_handles_labels()
    for h, n in zip(*ax_m.get_legend_handles_labels()):
        if n not in names:
            handles.append(h)
            names.append(n)
    fig.legend(handles, names, fontsize=7, loc="center right")
    fig.subplots_adjust(right=0.78)
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
