"""Chunk size of the torch scan, by measurement: one Mamba-130M layer's relevance scan
(d_inner 1536, state 16) forward + adjoint at L=512 for several chunk sizes.

    python benchmarks/cpu_scan_chunks.py [--threads 1] [--length 512] [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from captum_mambalrp.scan.linear_scan import relevance_scan  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--length", type=int, default=512)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--chunks", type=int, nargs="*", default=[4, 8, 16, 32, 64, 128])
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    b, d, n, length = 1, 1536, 16, args.length
    g = torch.Generator().manual_seed(0)
    x = torch.randn(b, length, d, generator=g).transpose(1, 2).requires_grad_(True)  # the mixer's layout
    delta = torch.nn.functional.softplus(torch.randn(b, d, length, generator=g) - 3)
    A = -torch.arange(1, n + 1.0).repeat(d, 1)[:, None, :]
    B = torch.randn(b, 1, length, n, generator=g)
    C = torch.randn(b, 1, length, n, generator=g)
    D = torch.randn(d, 1, generator=g)
    gy = torch.randn(b, d, length, generator=g)
    times = {c: [] for c in args.chunks}
    for _ in range(args.repeats):  # interleaved, so that load changes hit every size alike
        for chunk in args.chunks:
            t = time.perf_counter()
            relevance_scan(x, delta, A, B, C, D, chunk).backward(gy)
            times[chunk].append(time.perf_counter() - t)
    print(f"# one layer's scan, forward + adjoint, L={length}, {args.threads} thread(s); seconds")
    for chunk, ts in times.items():
        ts.sort()
        print(f"chunk {chunk:4d}: best {ts[0]:.4f}  median {ts[len(ts) // 2]:.4f}")


if __name__ == "__main__":
    main()
