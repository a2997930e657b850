"""Where the time of one MambaLRP attribution goes on the GPU (torch.profiler).

For each architecture, length and backend: the wall time of ``attribute`` and of the
transformers forward, the summed GPU kernel time of each (the gap to the wall time is
launch and Python overhead), and the kernels that take the most GPU time::

    python3 benchmarks/gpu_profile.py --arch mamba1 --lengths 2048 16384 --backends auto triton
    python3 benchmarks/gpu_profile.py --shape falcon7b --dtype bfloat16 --layers 8 --lengths 4096 --tf32
    python3 benchmarks/gpu_profile.py --shape falcon7b --dtype bfloat16 --layers 8 --lengths 32768 --tf32 --conv-kernel both

``--shape`` takes a shape of ``gpu_scale.py`` (the 7B-class ones of issue 14), built on the GPU
with random weights, optionally with fewer ``--layers`` (the per-layer work is the same);
``--conv-kernel both`` times the attribution without and with the depthwise conv kernel
(``CAPTUM_MAMBALRP_CONV_KERNEL``) in one run, ``--conv-output both`` with the mixers' conv output
rounded to the model's dtype and kept in float32 (``CAPTUM_MAMBALRP_CONV_OUTPUT``); ``--device
cpu`` runs a smoke test of the script (CPU kernels only).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any, Callable, Dict, List

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import torch  # noqa: E402
from common import mamba1_classifier, mamba2_classifier  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def wall(fn: Callable[[], Any], repeats: int = 3) -> float:
    fn()
    times: List[float] = []
    for _ in range(repeats):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


#: kernel name patterns, first match wins: what a kernel does, for the summary line
KINDS = (
    ("matmul", ("gemm", "cutlass", "cublas", "nvjet", "sm90_", "sm100_", "xmma")),
    ("scan", ("scan", "ssd", "chunk_state", "state_passing", "bmm_chunk")),
    ("conv", ("conv",)),
    ("copy / cast", ("copy", "cast", "to_copy", "memcpy", "memset", "fill")),
    ("reduction", ("reduce", "norm", "sum")),
    ("elementwise", ("elementwise", "vectorized", "unrolled", "pointwise", "triton_poi")),
)


def kernel_kind(name: str) -> str:
    lower = name.lower()
    return next((kind for kind, keys in KINDS if any(k in lower for k in keys)), "other")


def kernel_table(fn: Callable[[], Any], rows: int, ops: int = 0) -> str:
    """The summed kernel times of one call of ``fn``, by kind and the ``rows`` largest kernels;
    ``ops``: also the ``ops`` torch operators (with their input shapes) whose kernels take the most
    GPU time, which tells which copy or cast of the pass a kernel is."""
    cuda = torch.cuda.is_available()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities, record_shapes=ops > 0) as prof:
        fn()
        sync()
    if not cuda:  # smoke test: the CPU operators instead
        kernels = [e for e in prof.key_averages() if e.key.startswith("aten::")]
        total = sum(e.self_cpu_time_total for e in kernels) / 1e3
        lines = [f"  CPU operator time {total:.1f} ms in {sum(e.count for e in kernels)} calls"]
        for e in sorted(kernels, key=lambda e: -e.self_cpu_time_total)[:rows]:
            lines.append(f"  {e.self_cpu_time_total / 1e3:8.2f} ms {e.count:6d}x  {e.key[:110]}")
        return "\n".join(lines)
    kernels = [e for e in prof.key_averages() if "CUDA" in str(getattr(e, "device_type", ""))]
    total = sum(e.self_device_time_total for e in kernels) / 1e3
    launches = sum(e.count for e in kernels)
    lines = [f"  GPU kernel time {total:.1f} ms in {launches} launches"]
    kinds: Dict[str, List[float]] = {}
    for e in kernels:
        kind = kernel_kind(e.key)
        kinds.setdefault(kind, [0.0, 0])
        kinds[kind][0] += e.self_device_time_total / 1e3
        kinds[kind][1] += e.count
    ranked = sorted(kinds.items(), key=lambda kv: -kv[1][0])
    lines.append("  by kind: " + ", ".join(f"{k} {t:.1f} ms ({n}x)" for k, (t, n) in ranked))
    for e in sorted(kernels, key=lambda e: -e.self_device_time_total)[:rows]:
        lines.append(f"  {e.self_device_time_total / 1e3:8.2f} ms {e.count:6d}x  {e.key[:110]}")
    if ops:
        lines.append("  torch operators by the GPU time of their own kernels (input shapes):")
        averages = prof.key_averages(group_by_input_shape=True)
        named = [e for e in averages if e.key.startswith("aten::") and e.self_device_time_total > 0]
        for e in sorted(named, key=lambda e: -e.self_device_time_total)[:ops]:
            lines.append(f"  {e.self_device_time_total / 1e3:8.2f} ms {e.count:6d}x  {e.key} {str(e.input_shapes)[:100]}")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", nargs="*", default=["mamba1"])
    p.add_argument("--lengths", type=int, nargs="*", default=[2048, 16384])
    p.add_argument("--backends", nargs="*", default=["auto"])
    p.add_argument("--rows", type=int, default=14)
    p.add_argument("--ops", type=int, default=0, help="also the N torch operators of the attribution that take the most GPU time")
    p.add_argument("--shape", default=None, help="a shape of gpu_scale.py (falcon7b, mamba2_2p7b, ...) instead of --arch")
    p.add_argument("--dtype", default="float32", help="with --shape: the model's dtype")
    p.add_argument("--layers", type=int, default=0, help="with --shape: fewer layers (0: the shape's)")
    p.add_argument("--tf32", action="store_true", help="allow TF32 matrix products (off by default)")
    p.add_argument(
        "--conv-kernel",
        choices=["default", "off", "on", "both"],
        default="default",
        help="the depthwise conv through kernels.conv (CAPTUM_MAMBALRP_CONV_KERNEL; default: the package's, on "
        "CUDA on); both: off and on, in one run",
    )
    p.add_argument(
        "--conv-output",
        choices=["default", "model", "compute", "both"],
        default="default",
        help="a bf16 model's mixer conv output (CAPTUM_MAMBALRP_CONV_OUTPUT); both: model and compute, in one run",
    )
    p.add_argument(
        "--recompute",
        nargs="*",
        default=["auto"],
        help="MambaLRP's recompute modes to profile, one after the other (False, True, projection, auto, ...)",
    )
    p.add_argument("--device", default="cuda")
    args = p.parse_args()
    modes = [{"False": False, "True": True}.get(m, m) for m in args.recompute]
    if not args.tf32:
        # float32 dots of Triton kernels (mamba-ssm's SSD) without TF32, as torch's; with --tf32 left
        # as it is: compiled as "ieee", the float32 variants of those kernels took minutes to tune
        # on the H200 (docs/benchmarks.md)
        os.environ.setdefault("TRITON_F32_DEFAULT", "ieee")
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    torch.backends.cudnn.allow_tf32 = args.tf32
    from captum_mambalrp import MambaLRP, scan

    dev = torch.device(args.device)
    if args.shape:
        os.environ["GPU_SCALE_DEVICE"] = args.device
        import gpu_scale

        gpu_scale.DEVICE = args.device
        models: Dict[str, Callable[[], torch.nn.Module]] = {
            args.shape: lambda: gpu_scale.build(args.shape, getattr(torch, args.dtype), args.layers)
        }
    else:
        models = {arch: (mamba1_classifier if arch == "mamba1" else mamba2_classifier) for arch in args.arch}
    for arch, make in models.items():
        model = make().to(dev)
        vocab = int(model.get_input_embeddings().weight.shape[0])
        for length in args.lengths:
            ids = torch.randint(0, vocab, (1, length), device=dev)
            with torch.no_grad():
                t_fwd = wall(lambda model=model, ids=ids: model(ids), repeats=5)
                print(f"\n== {arch} L={length} transformers forward: {t_fwd * 1e3:.1f} ms", flush=True)
                print(kernel_table(lambda model=model, ids=ids: model(ids), args.rows), flush=True)
            conv_settings = {"default": [None], "off": ["0"], "on": ["1"], "both": ["0", "1"]}[args.conv_kernel]
            outputs = {"default": [None], "both": ["model", "compute"]}.get(args.conv_output, [args.conv_output])
            settings = [(b, m, c, o) for b in args.backends for m in modes for c in conv_settings for o in outputs]
            for backend, mode, conv, output in settings:
                if conv is not None:
                    os.environ["CAPTUM_MAMBALRP_CONV_KERNEL"] = conv
                if output is not None:
                    os.environ["CAPTUM_MAMBALRP_CONV_OUTPUT"] = output
                lrp = MambaLRP(model, backend=backend, recompute=mode)
                with scan.record_backends() as used:
                    t = wall(lambda lrp=lrp, ids=ids: lrp.attribute(ids, target=1))
                print(
                    f"\n== {arch} L={length} MambaLRP backend={backend} recompute={mode} "
                    f"conv kernel={conv or 'default'} conv output={output or 'default'} ({dict(used)}): "
                    f"{t * 1e3:.1f} ms, ratio to forward {t / t_fwd:.2f}",
                    flush=True,
                )
                table = kernel_table(lambda lrp=lrp, ids=ids: lrp.attribute(ids, target=1), args.rows, args.ops)
                print(table, flush=True)
            del ids
            torch.cuda.empty_cache()
        del model
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
