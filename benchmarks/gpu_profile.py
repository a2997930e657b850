"""Where the time of one MambaLRP attribution goes on the GPU (torch.profiler).

For each architecture, length and backend: the wall time of ``attribute`` and of the
transformers forward, the summed GPU kernel time of each (the gap to the wall time is
launch and Python overhead), and the kernels that take the most GPU time::

    python3 benchmarks/gpu_profile.py --arch mamba1 --lengths 2048 16384 --backends auto triton
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any, Callable, List

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import torch  # noqa: E402
from common import mamba1_classifier, mamba2_classifier  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402


def wall(fn: Callable[[], Any], repeats: int = 3) -> float:
    fn()
    times: List[float] = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def kernel_table(fn: Callable[[], Any], rows: int) -> str:
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    kernels = [e for e in prof.key_averages() if "CUDA" in str(getattr(e, "device_type", ""))]
    total = sum(e.self_device_time_total for e in kernels) / 1e3
    launches = sum(e.count for e in kernels)
    lines = [f"  GPU kernel time {total:.1f} ms in {launches} launches"]
    for e in sorted(kernels, key=lambda e: -e.self_device_time_total)[:rows]:
        lines.append(f"  {e.self_device_time_total / 1e3:8.2f} ms {e.count:6d}x  {e.key[:110]}")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", nargs="*", default=["mamba1"])
    p.add_argument("--lengths", type=int, nargs="*", default=[2048, 16384])
    p.add_argument("--backends", nargs="*", default=["auto"])
    p.add_argument("--rows", type=int, default=14)
    args = p.parse_args()
    os.environ.setdefault("TRITON_F32_DEFAULT", "ieee")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    from captum_mambalrp import MambaLRP, scan

    dev = torch.device("cuda")
    for arch in args.arch:
        model = (mamba1_classifier() if arch == "mamba1" else mamba2_classifier()).to(dev)
        for length in args.lengths:
            ids = torch.randint(0, 50280, (1, length), device=dev)
            with torch.no_grad():
                t_fwd = wall(lambda model=model, ids=ids: model(ids), repeats=5)
                print(f"\n== {arch} L={length} transformers forward: {t_fwd * 1e3:.1f} ms", flush=True)
                print(kernel_table(lambda model=model, ids=ids: model(ids), args.rows), flush=True)
            for backend in args.backends:
                lrp = MambaLRP(model, backend=backend)
                with scan.record_backends() as used:
                    t = wall(lambda lrp=lrp, ids=ids: lrp.attribute(ids, target=1))
                print(
                    f"\n== {arch} L={length} MambaLRP backend={backend} ({dict(used)}): {t * 1e3:.1f} ms, "
                    f"ratio to forward {t / t_fwd:.2f}",
                    flush=True,
                )
                print(kernel_table(lambda lrp=lrp, ids=ids: lrp.attribute(ids, target=1), args.rows), flush=True)
            del ids
            torch.cuda.empty_cache()
        del model
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
