"""SSD's chunked form: with its Triton kernel (``scan/triton_ssd.py``) and without, one
layer's scan in isolation (CUDA, one process, ratios measured in this run).

For one shape (default: Mamba2-130M's layer, 24 heads x 64, state 128, one group, 16384 tokens)
and each chunk length and warp count asked: the median time of ``ssd_chunked`` (the relevance
pass's forward-only form, no grad) with the kernel and without (``CAPTUM_MAMBALRP_SSD_KERNEL``),
their ratio, and the largest difference of the two results relative to the largest output::

    python3 benchmarks/gpu_ssd_kernel.py --length 16384 --chunks 32 64 --warps 4 8 --no-tf32
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import cuda_time  # noqa: E402

ssd = importlib.import_module("captum_mambalrp.scan.ssd_chunked")  # the package exports a function of that name
triton_ssd = importlib.import_module("captum_mambalrp.scan.triton_ssd")


def median_ms(fn, repeats: int) -> float:
    return cuda_time(fn, repeats) * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--length", type=int, default=16384)
    p.add_argument("--heads", type=int, default=24)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--state", type=int, default=128)
    p.add_argument("--groups", type=int, default=1)
    p.add_argument("--chunks", type=int, nargs="+", default=[ssd.CHUNK])
    p.add_argument("--warps", type=int, nargs="+", default=[triton_ssd.NUM_WARPS])
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--no-tf32", action="store_true", help="float32 products in IEEE (torch's and the kernel's)")
    p.add_argument("--out", default="")
    a = p.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = not a.no_tf32
    g = torch.Generator(device="cuda").manual_seed(0)
    shape = (a.batch, a.length)
    x = torch.randn(*shape, a.heads, a.head_dim, device="cuda", generator=g)
    dt = torch.rand(*shape, a.heads, device="cuda", generator=g) * 0.1
    A = -torch.rand(a.heads, device="cuda", generator=g) * 4
    B = torch.randn(*shape, a.groups, a.state, device="cuda", generator=g)
    C = torch.randn(*shape, a.groups, a.state, device="cuda", generator=g)
    D = torch.randn(a.heads, device="cuda", generator=g)
    for chunk in a.chunks:
        if chunk > ssd.MAX_KERNEL_CHUNK:
            print(f"chunk {chunk}: longer than the kernel takes ({ssd.MAX_KERNEL_CHUNK}); the torch form runs", flush=True)
            continue
        os.environ[ssd.SSD_KERNEL_ENV] = "0"
        with torch.no_grad():
            torch_y = ssd.ssd_chunked(x, dt, A, B, C, D, chunk=chunk)
            torch_ms = median_ms(lambda c=chunk: ssd.ssd_chunked(x, dt, A, B, C, D, chunk=c), a.repeats)
            for warps in a.warps:
                triton_ssd.NUM_WARPS = warps
                os.environ[ssd.SSD_KERNEL_ENV] = "1"
                y = ssd.ssd_chunked(x, dt, A, B, C, D, chunk=chunk)
                kernel_ms = median_ms(lambda c=chunk: ssd.ssd_chunked(x, dt, A, B, C, D, chunk=c), a.repeats)
                row = dict(
                    length=a.length, heads=a.heads, head_dim=a.head_dim, state=a.state, groups=a.groups, chunk=chunk,
                    warps=warps, tf32=not a.no_tf32, torch_ms=torch_ms, kernel_ms=kernel_ms,
                    speedup=torch_ms / kernel_ms,
                    max_diff_rel=float((y - torch_y).abs().max() / torch_y.abs().max()),
                )  # fmt: skip
                print("RESULT", json.dumps(row), flush=True)
                if a.out:
                    with open(a.out, "a") as f:
                        f.write(json.dumps(row) + "\n")
                del y


if __name__ == "__main__":
    main()
