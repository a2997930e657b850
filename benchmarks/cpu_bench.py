"""CPU benchmark: MambaLRP vs the plain sequential baseline at Mamba-130M shape.

Each measurement runs in a fresh subprocess (so peak RSS is its own): build the
classifier (24 layers, d_model 768, state 16, 2 classes, random weights), attribute
class 1 at the last token of random ids of length L, report wall time and the peak
RSS increase over the process's RSS before the call. Ratios come from this one run and
are printed last.

    python benchmarks/cpu_bench.py --out docs/results/cpu.json
    python benchmarks/cpu_bench.py --lengths 128 --baseline-lengths 128 --long 0   # quick
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from typing import Any, Dict, List

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)


def one(method: str, length: int, repeats: int, threads: int, layers: int) -> Dict[str, Any]:
    """One measurement in this process: time and peak-RSS increase of ``method`` at ``length``."""
    import gc

    import torch
    from common import mamba1_classifier, rss_now_mib, rss_peak_mib, rss_peak_reset, timed

    torch.set_num_threads(threads)
    model = mamba1_classifier(layers=layers)
    ids = torch.randint(0, model.config.vocab_size, (1, length), generator=torch.Generator().manual_seed(length))
    if method.startswith("mambalrp"):
        from captum_mambalrp import MambaLRP

        # "mambalrp": every mixer's tensors kept; "+recompute": the library's recompute=True
        lrp = MambaLRP(model, recompute=method.endswith("+recompute"))
        lrp.attribute(ids[:, :32], target=1)  # warm-up (allocator, lazy imports)

        def run():
            return lrp.attribute(ids, target=1)
    else:
        from sequential_baseline import baseline_relevance

        baseline_relevance(model, ids[:, :8], 1)
        run = lambda: baseline_relevance(model, ids, 1)  # noqa: E731
    out: Dict[str, Any] = {}
    gc.collect()
    rss_peak_reset()
    base = rss_now_mib()
    result = {}

    def call():
        result["r"] = run()

    out.update(timed(call, torch.device("cpu"), repeats=repeats))
    peak = rss_peak_mib()
    out["peak_extra_mib"] = None if peak is None or base is None else peak - base
    out["relevance_sum"] = float(result["r"].sum())
    if method == "mambalrp" and os.environ.get("BENCH_FLOOR"):
        # the fp32 rounding floor of this model: how far relevance moves when every
        # weight changes by about one part in 10^7
        from common import perturbed_weights

        first = result["r"]
        with perturbed_weights(model):
            call()
        out["rounding_floor_rel"] = float((result["r"] - first).norm() / first.norm())
        result["r"] = first
    if os.environ.get("BENCH_RELEVANCE_FILE"):
        torch.save(result["r"], os.environ["BENCH_RELEVANCE_FILE"])
    return out


def available_mib() -> float:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def spawn(method: str, length: int, repeats: int, threads: int, layers: int, save: str = "") -> Dict[str, Any]:
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--one",
        method,
        str(length),
        "--repeats",
        str(repeats),
        "--threads",
        str(threads),
        "--layers",
        str(layers),
    ]
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    if save:
        env["BENCH_RELEVANCE_FILE"] = save
        env["BENCH_FLOOR"] = "1"
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        return {
            "error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}",
            "exit_code": proc.returncode,
        }
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: List[str] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="*", default=[512], help="L for MambaLRP (and the baseline)")
    p.add_argument("--baseline-lengths", type=int, nargs="*", default=[512], help="L for the sequential baseline")
    p.add_argument(
        "--long",
        type=int,
        nargs="*",
        default=[2048, 8192],
        help="long L for MambaLRP only, as the library runs it and with mixers recomputed (0: none)",
    )
    p.add_argument(
        "--long-modes",
        default="mambalrp,mambalrp+recompute",
        help="modes run at the long L: mambalrp (as the library runs), mambalrp+recompute",
    )
    p.add_argument("--repeats", type=int, default=2, help="timed calls of MambaLRP per L (best is reported)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--out", default=None, help="write JSON (and CSV of the rows) here")
    p.add_argument("--one", nargs=2, metavar=("METHOD", "L"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one:
        print(json.dumps(one(args.one[0], int(args.one[1]), args.repeats, args.threads, args.layers)))
        return

    from common import print_ratios, versions, write_results

    rows: List[Dict[str, Any]] = []
    tmp = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"mambalrp_bench_{os.getpid()}")
    for length in sorted(set(args.lengths) | set(args.baseline_lengths)):
        for method in ("mambalrp", "sequential"):
            wanted = args.lengths if method == "mambalrp" else args.baseline_lengths
            if length not in wanted:
                continue
            reps = args.repeats if method == "mambalrp" else 1
            r = spawn(method, length, reps, args.threads, args.layers, save=f"{tmp}_{method}_{length}.pt")
            rows.append({"device": "cpu", "method": method, "L": length, **r})
            print(json.dumps(rows[-1]), flush=True)
    modes = args.long_modes.split(",")
    for length in [n for n in args.long if n > 0]:
        for method in modes:
            # memory guard: project from the largest L measured so far, skip what cannot fit
            done = [r for r in rows if r["method"] == method and r.get("peak_extra_mib")]
            avail = available_mib()
            if done and avail is not None:
                ref = max(done, key=lambda r: r["L"])
                projected = ref["peak_extra_mib"] * length / ref["L"]
                if projected > 0.85 * avail:
                    rows.append(
                        {
                            "device": "cpu",
                            "method": method,
                            "L": length,
                            "skipped": f"projected {projected / 1024:.1f} GiB > 85% of the {avail / 1024:.1f} GiB available now",
                        }
                    )
                    print(json.dumps(rows[-1]), flush=True)
                    continue
            r = spawn(method, length, 1, args.threads, args.layers)
            rows.append({"device": "cpu", "method": method, "L": length, **r})
            print(json.dumps(rows[-1]), flush=True)

    import torch

    ratios: List[Dict[str, Any]] = []
    for length in args.baseline_lengths:
        ours = next((r for r in rows if r["method"] == "mambalrp" and r["L"] == length and "best_s" in r), None)
        base = next((r for r in rows if r["method"] == "sequential" and r["L"] == length and "best_s" in r), None)
        if ours and base:
            a, b = torch.load(f"{tmp}_mambalrp_{length}.pt"), torch.load(f"{tmp}_sequential_{length}.pt")
            rel = float((a - b).norm() / b.norm())
            ratios.append(
                {
                    "name": f"speed-up vs sequential baseline, L={length}",
                    "value": base["best_s"] / ours["best_s"],
                    "goal": ">= 10",
                    "ok": base["best_s"] / ours["best_s"] >= 10,
                }
            )
            floor = ours.get("rounding_floor_rel")
            goal = 1e-4 if floor is None else max(1e-4, 3 * floor)
            ratios.append(
                {
                    "name": f"relevance agreement with the baseline (rel. L2 error), L={length}"
                    + ("" if floor is None else f"; fp32 rounding floor of this model {floor:.2g}"),
                    "value": rel,
                    "goal": f"<= {goal:.2g} (1e-4 or 3x the floor)",
                    "ok": rel <= goal,
                }
            )
            if base.get("peak_extra_mib") and ours.get("peak_extra_mib"):
                ratios.append(
                    {
                        "name": f"peak RSS baseline / MambaLRP, L={length}",
                        "value": base["peak_extra_mib"] / max(ours["peak_extra_mib"], 1e-9),
                        "goal": "",
                        "ok": None,
                    }
                )
    for length in [n for n in args.long if n > 0]:
        for method in modes:
            r = next((r for r in rows if r["method"] == method and r["L"] == length), {})
            if "peak_extra_mib" in r:
                gib = r["peak_extra_mib"] / 1024
                ratios.append(
                    {
                        "name": f"{method} at L={length}: time {r['best_s']:.1f} s, peak extra RSS (GiB)",
                        "value": gib,
                        "goal": "<= 24",
                        "ok": gib <= 24,
                    }
                )
            else:
                ratios.append(
                    {"name": f"{method} at L={length}", "value": r.get("error", r.get("skipped")), "goal": "runs", "ok": False}
                )
    for f in os.listdir(os.path.dirname(tmp)):
        if f.startswith(os.path.basename(tmp)):
            os.remove(os.path.join(os.path.dirname(tmp), f))
    write_results(args.out, {"machine": versions(), "args": vars(args), "rows": rows, "ratios": ratios})
    print_ratios(ratios)


if __name__ == "__main__":
    main()
