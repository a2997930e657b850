"""GPU benchmark driver (one device call): correctness first, then timings, then long L.

Parts (``--parts``, default all, run in this order, each under the overall ``--budget``):

- ``check``: every scan backend (torch, triton, mamba_ssm) against the torch backend at a
  few Mamba1 and Mamba2 (SSD) shapes, fp32 and bf16 inputs: output and dx relative error,
  and that only x receives a gradient; then MambaLRP on a Mamba-130M-shaped classifier
  with every backend (relevance vs the torch backend) and conservation with biases zeroed.
- ``time``: transformers forward (no grad; mamba-ssm / causal-conv1d kernels when
  installed) vs MambaLRP attribute per backend at L = 2048 and 16384, eager and with
  ``cuda_graph=True`` (replays; the first call's cost is recorded as ``first_call_s``),
  the forward itself replayed as a CUDA graph for comparison, and Captum's
  LayerIntegratedGradients (n_steps=50) on the embeddings at 2048; Mamba1 and Mamba2.
- ``long``: peak GPU memory per token and the largest L reached, fp32 and bf16, for
  MambaLRP keeping every mixer's tensors (``recompute=False``) and recomputing each mixer
  in the backward pass (``mambalrp+recompute``: ``MambaLRP(..., recompute=True)``; the
  default ``"auto"`` does that above 16384 tokens).

Results go to ``$OUT/gpu_results.json`` (and ``.csv``) or ``--out``; the ratio rows are
printed last. Example::

    python3 benchmarks/gpu_all.py --budget 500
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
import traceback
from typing import Any, Callable, Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import torch  # noqa: E402
from common import mamba1_classifier, mamba2_classifier, perturbed_weights, print_ratios, versions, write_results  # noqa: E402

START = time.perf_counter()
SAVE: List[Callable[[], None]] = []  # writes the results so far (set by main), called after each row
DEV = torch.device("cuda")
MiB = 2**20


def left(budget: float) -> float:
    return budget - (time.perf_counter() - START)


def log(*a: Any) -> None:
    print(f"[{time.perf_counter() - START:7.1f}s]", *a, flush=True)
    for save in SAVE:
        save()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def cuda_time(fn: Callable[[], Any], repeats: int = 3, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(repeats):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return best


def free() -> None:
    gc.collect()
    torch.cuda.empty_cache()


def zero_biases(model: torch.nn.Module) -> torch.nn.Module:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") and "dt_proj" not in name and "dt_bias" not in name:
                p.zero_()
    return model


def logits_of(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    out = model(ids)
    return (out.logits if hasattr(out, "logits") else out).float()


# ------------------------------------------------------------------------ check


def scan_cases() -> List[Dict[str, Any]]:
    g = torch.Generator(device="cpu").manual_seed(0)

    def r(*s: int) -> torch.Tensor:
        return torch.randn(*s, generator=g).to(DEV)

    cases = []
    for b, d, n, l in [(2, 64, 16, 333), (1, 1536, 16, 2048)]:
        cases.append(
            dict(
                layout="mamba1",
                shape=f"b{b} d{d} n{n} L{l}",
                args=(
                    r(b, d, l),
                    torch.nn.functional.softplus(r(b, d, l) - 3),
                    -torch.exp(r(d, n) * 0.5),
                    r(b, n, l),
                    r(b, n, l),
                    r(d),
                ),
            )
        )
    for b, l, h, p, n, gr in [(2, 300, 4, 16, 32, 2), (1, 2048, 24, 64, 128, 1)]:
        cases.append(
            dict(
                layout="ssd",
                shape=f"b{b} L{l} h{h} p{p} n{n} g{gr}",
                args=(
                    r(b, l, h, p),
                    torch.nn.functional.softplus(r(b, l, h) - 3),
                    -torch.exp(r(h) * 0.5),
                    r(b, l, gr, n),
                    r(b, l, gr, n),
                    r(h),
                ),
            )
        )
    return cases


def check_scans(rows: List[Dict[str, Any]]) -> None:
    from captum_mambalrp import scan

    backends = scan.available_backends("cuda")
    log("scan backends available:", backends)
    for case in scan_cases():
        fn = scan.selective_scan if case["layout"] == "mamba1" else scan.ssd_scan
        x0, *params = case["args"]
        gy = torch.randn(x0.shape, device=DEV, generator=torch.Generator(device=DEV).manual_seed(1))
        ref = {}
        for dtype in (torch.float32, torch.bfloat16):
            for backend in ["torch"] + [b for b in backends if b != "torch"]:
                if case["layout"] == "ssd" and backend == "mamba_ssm" and os.environ.get("GPU_ALL_SSD_MAMBA_SSM") != "1":
                    continue  # minutes of autotuning on first use; checked once (docs/results), opt in
                row: Dict[str, Any] = {
                    "part": "check_scan",
                    "layout": case["layout"],
                    "shape": case["shape"],
                    "dtype": str(dtype).replace("torch.", ""),
                    "backend": backend,
                }
                try:
                    x = x0.to(dtype).clone().requires_grad_(True)
                    ps = [p.clone().requires_grad_(True) for p in params]
                    with scan.record_backends() as used:
                        y = fn(x, *ps, backend=backend)
                    y.backward(gy)
                    key = (case["shape"], row["dtype"])
                    if backend == "torch":
                        ref[key] = (y.detach(), x.grad.float())
                    y0, g0 = ref[key]
                    row.update(
                        ran=dict(used),
                        out_dtype=str(y.dtype).replace("torch.", ""),
                        rel_err_y=rel(y, y0),
                        rel_err_dx=rel(x.grad.float(), g0),
                        only_x_grad=all(p.grad is None for p in ps),
                    )
                    row["ok"] = (
                        row["rel_err_y"] <= 1e-4
                        and row["only_x_grad"]
                        and y.dtype == torch.float32
                        and (row["rel_err_dx"] <= 1e-4 if dtype == torch.float32 else row["rel_err_dx"] <= 1e-2)
                    )
                except Exception as e:  # noqa: BLE001 - recorded, the run goes on
                    row.update(error=f"{type(e).__name__}: {e}"[:300], ok=False)
                rows.append(row)
                log(json.dumps(row))
                free()


def check_models(rows: List[Dict[str, Any]], budget: float) -> None:
    """MambaLRP with every backend vs the torch backend, and conservation (biases zeroed).

    Deep random models amplify float32 rounding: the ``floor`` is how far the torch
    backend's relevance moves when every weight changes by about one part in 10^7; the
    backends must agree to ``max(1e-4, 3 x floor)``, and to 1e-4 on the 4-layer model.
    """
    from captum_mambalrp import MambaLRP, scan

    backends = ["torch"] + [b for b in scan.available_backends("cuda") if b != "torch"]
    for arch, build in (("mamba1", mamba1_classifier), ("mamba2", mamba2_classifier)):
        for layers in (4, 24):
            if left(budget) < 60:
                return
            model = zero_biases(build(layers=layers)).to(DEV)
            ids = torch.randint(0, 50280, (1, 1024), device=DEV, generator=torch.Generator(device=DEV).manual_seed(0))
            with torch.no_grad():
                logit = float(logits_of(model, ids)[0, -1, 1])
            ref, floor = None, None
            for backend in backends:
                row: Dict[str, Any] = {"part": "check_model", "arch": arch, "layers": layers, "L": 1024, "backend": backend}
                try:
                    with scan.record_backends() as used:
                        r, delta = MambaLRP(model, backend=backend).attribute(ids, target=1, return_convergence_delta=True)
                    if backend == "torch":
                        ref = r
                        with perturbed_weights(model):
                            floor = rel(MambaLRP(model, backend="torch").attribute(ids, target=1), ref)
                    goal = 1e-4 if layers <= 4 else max(1e-4, 3 * floor)
                    row.update(
                        ran=dict(used),
                        logit=logit,
                        relevance_sum=float(r.sum()),
                        conservation_rel=abs(float(r.sum()) - logit) / abs(logit),
                        rel_err_vs_torch=rel(r, ref),
                        rounding_floor=floor,
                        goal=goal,
                    )
                    row["ok"] = row["conservation_rel"] <= goal and row["rel_err_vs_torch"] <= goal
                except Exception as e:  # noqa: BLE001
                    row.update(error=f"{type(e).__name__}: {e}"[:300], ok=False)
                rows.append(row)
                log(json.dumps(row))
            del model
            free()


# ------------------------------------------------------------------------ time


def kernels_in_use() -> Dict[str, bool]:
    return {m: m in sys.modules for m in ("mamba_ssm", "causal_conv1d")}


def time_graphed_forward(model: torch.nn.Module, ids: torch.Tensor, arch: str, t_fwd: float) -> Dict[str, Any]:
    """The transformers forward recorded as a CUDA graph and replayed: the forward's own
    floor without launch overhead (for an honest comparison with ``cuda_graph=True``)."""
    row: Dict[str, Any] = {"part": "time", "arch": arch, "L": ids.shape[1], "method": "transformers_forward_cuda_graph"}
    try:
        with torch.no_grad():
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                model(ids)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                model(ids)
        t = cuda_time(graph.replay, repeats=5, warmup=1)
        row.update(time_s=t, eager_over_graph=t_fwd / t)
        del graph
    except Exception as e:  # noqa: BLE001
        row.update(error=f"{type(e).__name__}: {e}"[:300])
    free()
    return row


def time_arch(
    rows: List[Dict[str, Any]],
    arch: str,
    lengths: List[int],
    lig_steps: int,
    budget: float,
    only: Optional[List[str]] = None,
    graphs: bool = True,
) -> None:
    from captum_mambalrp import MambaLRP, scan

    build = mamba1_classifier if arch == "mamba1" else mamba2_classifier
    model = build().to(DEV)
    backends = ["auto"] + [b for b in scan.available_backends("cuda")]
    if only:
        backends = [b for b in backends if b in only]
    if arch == "mamba2" and os.environ.get("GPU_ALL_SSD_MAMBA_SSM") != "1":
        backends = [b for b in backends if b != "mamba_ssm"]  # minutes of autotuning; opt in
    for length in lengths:
        ids = torch.randint(0, 50280, (1, length), device=DEV, generator=torch.Generator(device=DEV).manual_seed(length))
        if left(budget) < 45:
            log("time budget: skipping", arch, length)
            break
        with torch.no_grad():
            t_fwd = cuda_time(lambda model=model, ids=ids: model(ids), repeats=5, warmup=2)
        fwd = {
            "part": "time",
            "arch": arch,
            "L": length,
            "method": "transformers_forward",
            "time_s": t_fwd,
            "kernels": kernels_in_use(),
        }
        rows.append(fwd)
        log(json.dumps(fwd))
        if graphs:
            rows.append(time_graphed_forward(model, ids, arch, t_fwd))
            log(json.dumps(rows[-1]))
        runs = [(b, False) for b in backends] + [
            (b, True) for b in backends if graphs and not (b == "torch" and arch == "mamba1")
        ]
        for backend, graph in runs:
            if backend == "torch" and arch == "mamba1" and length > 4096:
                continue  # Mamba1's torch scan on CUDA launches kernels per step: minutes at long L
            if left(budget) < 40:
                break
            row: Dict[str, Any] = {
                "part": "time",
                "arch": arch,
                "L": length,
                "method": "mambalrp_cuda_graph" if graph else "mambalrp",
                "backend": backend,
            }
            try:
                lrp = MambaLRP(model, backend=backend, cuda_graph=graph)
                with scan.record_backends() as used:
                    lrp.attribute(ids[:, :256], target=1)
                free()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                if graph:  # the first call of a shape: eager pass + recording
                    torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    lrp.attribute(ids, target=1)
                    torch.cuda.synchronize()
                    row["first_call_s"] = time.perf_counter() - t0
                t = cuda_time(lambda lrp=lrp, ids=ids: lrp.attribute(ids, target=1), repeats=3, warmup=0 if graph else 1)
                row.update(
                    ran=sorted(used),
                    time_s=t,
                    ratio_to_forward=t / t_fwd,
                    peak_mib_per_token=(torch.cuda.max_memory_allocated() - base) / MiB / length,
                )
                if graph:
                    row["replays"] = lrp.cuda_graphs.replays
                del lrp
            except Exception as e:  # noqa: BLE001
                row.update(error=f"{type(e).__name__}: {e}"[:300])
            rows.append(row)
            log(json.dumps(row))
            free()
        if arch == "mamba1" and length == 2048 and lig_steps > 0 and left(budget) > 60:
            rows.append(time_lig(model, ids, lig_steps, arch))
            log(json.dumps(rows[-1]))
            free()
    del model
    free()


def time_lig(model: torch.nn.Module, ids: torch.Tensor, steps: int, arch: str) -> Dict[str, Any]:
    row: Dict[str, Any] = {
        "part": "time",
        "arch": arch,
        "internal_batch_size": 10,
        "L": ids.shape[1],
        "method": f"captum_lig_{steps}_steps",
    }
    try:
        from captum.attr import LayerIntegratedGradients

        lig = LayerIntegratedGradients(lambda i: logits_of(model, i)[:, -1, :], model.get_input_embeddings())
        lig.attribute(ids, target=1, n_steps=2)
        free()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        # internal_batch_size: Captum's way to fit 50 steps of a 2048-token input in memory
        t = cuda_time(lambda: lig.attribute(ids, target=1, n_steps=steps, internal_batch_size=10), repeats=1, warmup=0)
        row.update(time_s=t, peak_mib_per_token=(torch.cuda.max_memory_allocated() - base) / MiB / ids.shape[1])
    except Exception as e:  # noqa: BLE001
        row.update(error=f"{type(e).__name__}: {e}"[:300])
    return row


# ------------------------------------------------------------------------ long


def long_runs(
    rows: List[Dict[str, Any]],
    arch: str,
    budget: float,
    max_log2: Dict[str, int],
    min_log2: int = 14,
    dtypes: str = "float32,bfloat16",
    modes: str = "mambalrp,mambalrp+recompute",
) -> None:
    from captum_mambalrp import MambaLRP

    build = mamba1_classifier if arch == "mamba1" else mamba2_classifier
    for name in dtypes.split(","):
        dtype = getattr(torch, name)
        model = build().to(DEV, dtype)
        for mode in modes.split(","):
            recompute = mode.endswith("recompute")  # the library's MambaLRP(..., recompute=True)
            last_t = None
            for k in range(min_log2, max_log2[name] + 1):
                length = 2**k
                if last_t is not None and left(budget) < 2.5 * last_t + 20:
                    log("time guard: stop", arch, name, mode, "before L =", length)
                    rows.append(
                        {"part": "long", "arch": arch, "dtype": name, "method": mode, "L": length, "skipped": "time guard"}
                    )
                    break
                row: Dict[str, Any] = {"part": "long", "arch": arch, "dtype": name, "method": mode, "L": length}
                try:
                    ids = torch.randint(0, 50280, (1, length), device=DEV)
                    free()
                    torch.cuda.reset_peak_memory_stats()
                    base = torch.cuda.memory_allocated()
                    torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    r = MambaLRP(model, recompute=recompute).attribute(ids, target=1)
                    torch.cuda.synchronize()
                    last_t = time.perf_counter() - t0
                    peak = torch.cuda.max_memory_allocated() - base
                    row.update(
                        time_s=last_t,
                        peak_gib=peak / 2**30,
                        peak_mib_per_token=peak / MiB / length,
                        finite=bool(torch.isfinite(r).all()),
                    )
                    del r, ids
                except torch.cuda.OutOfMemoryError:
                    row.update(error="OOM")
                except Exception as e:  # noqa: BLE001
                    row.update(error=f"{type(e).__name__}: {e}"[:300])
                rows.append(row)
                log(json.dumps(row))
                free()
                if "error" in row:
                    break
        del model
        free()


# ------------------------------------------------------------------------ summary


def summarize(rows: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    out: List[Dict[str, Any]] = []

    def add(name: str, value: Any, goal: str, ok: Optional[bool]) -> None:
        out.append({"name": name, "value": value, "goal": goal, "ok": ok})

    checks = [r for r in rows if r["part"].startswith("check")]
    if checks:
        bad = [r for r in checks if not r.get("ok") and not (r.get("arch") == "mamba2" and "Unsupported" in str(r.get("error")))]
        worst = max((r.get("rel_err_y", 0) or 0 for r in checks if r.get("dtype") == "float32"), default=None)
        add("correctness checks passed", f"{len(checks) - len(bad)}/{len(checks)}", "all", not bad)
        add("max rel. error of a backend vs torch (fp32 scan output)", worst, "<= 1e-4", worst is not None and worst <= 1e-4)
        for r in checks:
            if r["part"] == "check_model" and "rel_err_vs_torch" in r:
                add(
                    f"{r['arch']} {r['layers']} layers L=1024 {r['backend']}: relevance rel. error vs torch / "
                    f"conservation (fp32 rounding floor {r['rounding_floor']:.1e})",
                    f"{r['rel_err_vs_torch']:.2e} / {r['conservation_rel']:.2e}",
                    f"<= {r['goal']:.1e}",
                    r["ok"],
                )
    for arch in ("mamba1", "mamba2"):
        for length in (2048, 16384):
            t = [r for r in rows if r["part"] == "time" and r["arch"] == arch and r["L"] == length]
            auto = next((r for r in t if r.get("backend") == "auto" and r["method"] == "mambalrp" and "time_s" in r), None)
            graph = next(
                (r for r in t if r.get("backend") == "auto" and r["method"] == "mambalrp_cuda_graph" and "time_s" in r), None
            )
            fwd_graph = next((r for r in t if r["method"] == "transformers_forward_cuda_graph" and "time_s" in r), None)
            for row, how in ((auto, ""), (graph, " cuda_graph=True")):
                if row:
                    add(
                        f"{arch} attribute{how} / forward at L={length} (auto = {','.join(row['ran'])})",
                        row["ratio_to_forward"],
                        "<= 2.5",
                        row["ratio_to_forward"] <= 2.5,
                    )
            if graph and fwd_graph:
                add(
                    f"{arch} attribute cuda_graph=True / forward as a CUDA graph at L={length} (both replayed)",
                    graph["time_s"] / fwd_graph["time_s"],
                    "(for comparison)",
                    None,
                )
            if length == 2048:
                lig = next((r for r in t if r["method"].startswith("captum_lig") and "time_s" in r), None)
                for row, how in ((auto, ""), (graph, " cuda_graph=True")):
                    if row and lig:
                        add(
                            f"{arch} speed-up{how} vs Captum LIG n_steps=50 at L=2048",
                            lig["time_s"] / row["time_s"],
                            ">= 25",
                            lig["time_s"] / row["time_s"] >= 25,
                        )
        for dtype, goal in (("float32", 19), ("bfloat16", 20)):
            for mode in ("mambalrp", "mambalrp+recompute"):
                done = [
                    r
                    for r in rows
                    if r["part"] == "long" and r["arch"] == arch and r["dtype"] == dtype and r["method"] == mode and "time_s" in r
                ]
                if not done:
                    continue
                top = max(done, key=lambda r: r["L"])
                per_tok = max(r["peak_mib_per_token"] for r in done)
                add(
                    f"{arch} {mode} {dtype}: largest L reached (log2)",
                    top["L"].bit_length() - 1,
                    f">= {goal}",
                    top["L"] >= 2**goal,
                )
                add(f"{arch} {mode} {dtype}: peak GPU MiB per token (max over L)", per_tok, "<= 0.22", per_tok <= 0.22)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", default="check,time,long", help="comma-separated: check,time,long")
    p.add_argument("--arch", default="mamba1,mamba2")
    p.add_argument("--lengths", type=int, nargs="*", default=[2048, 16384])
    p.add_argument("--lig-steps", type=int, default=50, help="Captum LIG steps at L=2048 (0: skip)")
    p.add_argument("--time-backends", default="auto,torch,triton,mamba_ssm", help="backends the time part runs")
    p.add_argument(
        "--no-graphs",
        action="store_true",
        help="time part: skip MambaLRP(cuda_graph=True) and the forward replayed as a CUDA graph",
    )
    p.add_argument("--max-log2-fp32", type=int, default=19)
    p.add_argument("--max-log2-bf16", type=int, default=20)
    p.add_argument("--min-log2", type=int, default=14, help="long runs start at L = 2^min_log2")
    p.add_argument("--long-dtypes", default="float32,bfloat16")
    p.add_argument("--long-modes", default="mambalrp,mambalrp+recompute")
    p.add_argument("--budget", type=float, default=510, help="seconds for the whole run (stops starting new work)")
    p.add_argument("--out", default=None, help="JSON path (default $OUT/gpu_results.json if $OUT is set)")
    p.add_argument(
        "--tf32",
        action="store_true",
        help="let Triton kernels (mamba-ssm's SSD) use TF32 dots for fp32 (default: IEEE fp32, "
        "TRITON_F32_DEFAULT=ieee, as the torch reference runs with TF32 off)",
    )
    args = p.parse_args()
    if not args.tf32:
        os.environ.setdefault("TRITON_F32_DEFAULT", "ieee")
    out_path = args.out or (os.path.join(os.environ["OUT"], "gpu_results.json") if os.environ.get("OUT") else None)
    if not torch.cuda.is_available():
        sys.exit("gpu_all.py needs a CUDA device")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    parts, archs = args.parts.split(","), args.arch.split(",")
    rows: List[Dict[str, Any]] = []
    info = versions()
    info["gpu_memory_gib"] = torch.cuda.get_device_properties(0).total_memory / 2**30
    info["TRITON_F32_DEFAULT"] = os.environ.get("TRITON_F32_DEFAULT", "")
    log(json.dumps(info))
    SAVE.append(lambda: write_results(out_path, {"machine": info, "args": vars(args), "rows": rows}, quiet=True))
    steps: List[tuple] = []
    if "check" in parts:
        steps += [("check_scans", lambda: check_scans(rows)), ("check_models", lambda: check_models(rows, args.budget))]
    if "time" in parts:
        steps += [
            (
                f"time_{a}",
                lambda a=a: time_arch(
                    rows, a, args.lengths, args.lig_steps, args.budget, args.time_backends.split(","), not args.no_graphs
                ),
            )
            for a in archs
        ]
    if "long" in parts:
        limits = {"float32": args.max_log2_fp32, "bfloat16": args.max_log2_bf16}
        steps += [
            (f"long_{a}", lambda a=a: long_runs(rows, a, args.budget, limits, args.min_log2, args.long_dtypes, args.long_modes))
            for a in archs
        ]
    for name, step in steps:
        if left(args.budget) < 30:
            log("budget spent: skipping", name)
            rows.append({"part": name, "skipped": "budget"})
            continue
        log("==", name)
        try:
            step()
        except Exception:  # noqa: BLE001 - keep going, keep the traceback
            tb = traceback.format_exc()
            log(tb)
            rows.append({"part": name, "error": tb[-1500:]})
        free()
        write_results(out_path, {"machine": info, "args": vars(args), "rows": rows, "ratios": summarize(rows)})
    ratios = summarize(rows)
    write_results(
        out_path, {"machine": info, "args": vars(args), "rows": rows, "ratios": ratios, "wall_s": time.perf_counter() - START}
    )
    print_ratios(ratios)


if __name__ == "__main__":
    main()
