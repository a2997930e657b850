"""Is a short attribution bound by the host's kernel launches? (one process, CUDA)

For each shape of ``gpu_scale.py`` (bf16, ``--layers`` of its layers, ``--length`` tokens): the
median time of ``attribute`` with the default options, with ``recompute=False``, without the norm
kernel (``kernels.dispatch.NORM_KERNELS`` emptied) and without any fused kernel
(``CAPTUM_MAMBALRP_FUSED=0``); the host time of one call before its final synchronisation (when it
is close to the synchronised time, the pass waits on the host, not the GPU); the calls that
synchronise with the host (``torch.cuda.set_sync_debug_mode``); and the Python functions with the
most own time over three calls (cProfile: Triton's launcher shows there)::

    python3 benchmarks/gpu_launch_overhead.py --shapes mamba2_2p7b falcon7b --layers 8 --length 4096
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import statistics
import sys
import time
import warnings
from typing import Any, Callable

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import torch  # noqa: E402


def median_ms(fn: Callable[[], Any], repeats: int = 5) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def synchronising_calls(fn: Callable[[], Any]) -> dict:
    """Where ``fn`` synchronises with the host: ``{"message @ file:line": count}``."""
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fn()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    seen: dict = {}
    for w in caught:
        if "synchronizing" in str(w.message):
            key = f"{w.filename}:{w.lineno}"
            seen[key] = seen.get(key, 0) + 1
    return seen


def report(shape: str, layers: int, length: int, rows: int) -> None:
    import gpu_scale

    from captum_mambalrp import MambaLRP
    from captum_mambalrp.kernels import dispatch

    model = gpu_scale.build(shape, torch.bfloat16, layers)
    ids = torch.randint(0, 1000, (1, length), device="cuda")
    lrp, keep = MambaLRP(model), MambaLRP(model, recompute=False)

    def call() -> Any:
        return lrp.attribute(ids, target=1)

    print(f"== {shape}, {layers} layers, L={length}")
    print(f"attribute, default options: {median_ms(call):.2f} ms")
    print(f"attribute, recompute=False: {median_ms(lambda: keep.attribute(ids, target=1)):.2f} ms")
    norms = dict(dispatch.NORM_KERNELS)
    dispatch.NORM_KERNELS.clear()
    try:
        print(f"attribute, no norm kernel: {median_ms(call):.2f} ms")
    finally:
        dispatch.NORM_KERNELS.update(norms)
    os.environ["CAPTUM_MAMBALRP_FUSED"] = "0"
    try:
        print(f"attribute, no fused kernel: {median_ms(call):.2f} ms")
    finally:
        del os.environ["CAPTUM_MAMBALRP_FUSED"]
    torch.cuda.synchronize()
    start = time.perf_counter()
    call()
    host = time.perf_counter() - start
    torch.cuda.synchronize()
    print(f"host time of one call: {host * 1e3:.2f} ms, synchronised: {(time.perf_counter() - start) * 1e3:.2f} ms")
    seen = synchronising_calls(call)
    print(f"calls that synchronise with the host: {sum(seen.values())}")
    for where, n in sorted(seen.items(), key=lambda kv: -kv[1]):
        print(f"  {n} at {where}")
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(3):
        call()
    torch.cuda.synchronize()
    profiler.disable()
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(rows)
    print(out.getvalue())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=["mamba2_2p7b", "falcon7b"])
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--length", type=int, default=4096)
    p.add_argument("--rows", type=int, default=28, help="Python functions listed (cProfile, by own time)")
    args = p.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True
    for shape in args.shapes:
        report(shape, args.layers, args.length, args.rows)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
