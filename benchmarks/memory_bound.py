"""How close to two forward passes a relevance pass can come on one device, by memory alone.

A relevance pass runs the forward once and, in its backward pass, one input-gradient product per
linear layer (as many multiply-adds as the forward's), so it costs at least two forwards. Where
the tensors of the backward pass do not fit, ``recompute`` runs mixers again: every linear layer
of a mixer whose output is not kept costs its multiply-adds once more. This script takes
``recompute="auto"``'s own estimates for a shape (built on the ``meta`` device, bf16, CUDA
kernels; no GPU, no weights) and, per length, fills the memory left after recomputation's needs
(the layer inputs and one recomputed mixer's working set) with the kept products that spare the
most multiply-adds per byte, fractionally (a best case for this design), then prints

- ``room``: bytes left for kept products; ``products``: all of them (``out_proj``'s and
  ``in_proj``'s outputs of every mixer); ``kept``: the share of them that fits;
- ``f``: the multiply-adds recomputed, as a share of the forward's;
- ``floor = 2 + f``: the pass's cost in forwards if its linear layers were all of the work (the
  scans, convolutions and element-wise work left out: an estimate, not a strict bound; the
  measured ratios on the H200 lie from 0.05 below it to 0.44 above it, docs/benchmarks.md).

Two best cases of modes the package does not have: ``--inputs-on-host`` moves the layer inputs
that recomputation starts from off the device (as ``"offload"`` parks them, which keeps no
products), ``--no-working-set`` leaves out the recomputed mixer's working set (as if a mixer were
recomputed in pieces of the sequence with its products kept).

    python benchmarks/memory_bound.py --shape falcon7b --lengths 32768 65536 131072
    python benchmarks/memory_bound.py --shape mamba2_2p7b --lengths 131072 --inputs-on-host --no-working-set
"""

from __future__ import annotations

import argparse
import os
import sys
from types import SimpleNamespace
from typing import Dict, List, Tuple

import torch
from torch import nn

os.environ.setdefault("GPU_SCALE_DEVICE", "meta")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from gpu_scale import SHAPES, build  # noqa: E402

from captum_mambalrp.adapters import recompute as rc  # noqa: E402
from captum_mambalrp.adapters.install import install_rules  # noqa: E402
from captum_mambalrp.kernels import fused_kernels_on  # noqa: E402
from captum_mambalrp.rules.composites import composite  # noqa: E402

GIB = 2**30


def _macs(module: nn.Module) -> int:
    """Multiply-adds per token of the module's linear layers."""
    return sum(m.in_features * m.out_features for m in module.modules() if isinstance(m, nn.Linear))


def bound(
    shape: str, lengths: List[int], device_gib: float, inputs_on_host: bool = False, no_working_set: bool = False
) -> List[Dict[str, float]]:
    """One row per length (see the module docstring)."""
    model = build(shape, torch.bfloat16)
    inst = install_rules(model, composite("mambalrp"), recompute="auto")
    try:
        mixers = [model.get_submodule(n) for n in inst.mixers]
        weights = sum(p.numel() * p.element_size() for p in model.parameters())
        budget = rc.AUTO_MEMORY_FRACTION * (device_gib * GIB - weights)
        per = [rc.mixer_bytes_per_token(m, torch.bfloat16, "cuda") for m in mixers]
        items: List[Tuple[float, float]] = []  # (multiply-adds spared, bytes) per token, for each product
        for mixer, p in zip(mixers, per):
            in_bytes, out_bytes = rc._product_bytes(p)
            items.append((float(_macs(mixer.out_proj)), out_bytes))
            items.append((float(_macs(mixer.in_proj)), in_bytes))
        items.sort(key=lambda item: item[0] / item[1], reverse=True)
        forward_macs = float(sum(_macs(m) for m in mixers))
        rows = []
        for length in lengths:
            plan = rc.plan_for(model, inst.mixers, budget=budget)
            hidden = SimpleNamespace(
                shape=(1, length, model.config.hidden_size), dtype=torch.bfloat16, device=torch.device("cuda")
            )
            plan._decide(hidden)  # type: ignore[arg-type]
            needed = dict(plan.needed)
            inputs = sum(p["input"] for p in per) * length
            working = rc.RECOMPUTE_WORKING * max(p["kept"] for p in per) * length
            needs = max(0.0, needed["recompute"] - (inputs if inputs_on_host else 0.0) - (working if no_working_set else 0.0))
            room = budget - needs
            products = sum(b for _, b in items) * length
            left, spared = max(room, 0.0), 0.0
            for macs, per_token in items:
                take = min(1.0, left / (per_token * length))
                spared += take * macs
                left -= take * per_token * length
                if left <= 0:
                    break
            keeps_everything = needed["keep"] <= budget
            f = 0.0 if keeps_everything else 1.0 - spared / forward_macs  # (x_proj and dt_proj: recomputed)
            rows.append(
                {
                    "length": length,
                    "budget_gib": budget / GIB,
                    "recompute_needs_gib": needs / GIB,
                    "room_gib": room / GIB,
                    "products_gib": products / GIB,
                    "kept_share": min(1.0, max(room, 0.0) / products),
                    "f": f,
                    "floor": 2.0 + f,
                    "auto_keeps_everything": keeps_everything,
                    "fits": room >= 0,  # else recomputation alone does not fit: auto offloads or goes by pieces
                }
            )
    finally:
        inst.patcher.restore()
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), required=True)
    p.add_argument("--lengths", type=int, nargs="+", default=[4096, 32768, 65536, 131072])
    p.add_argument("--device-gib", type=float, default=139.8, help="device memory (the H200's 139.8 GiB)")
    p.add_argument("--inputs-on-host", action="store_true", help="the layer inputs off the device (a best case)")
    p.add_argument("--no-working-set", action="store_true", help="no recomputed mixer's working set (a best case)")
    a = p.parse_args()
    rows = bound(a.shape, a.lengths, a.device_gib, a.inputs_on_host, a.no_working_set)
    cases = [c for c, on in (("layer inputs on the host", a.inputs_on_host), ("no working set", a.no_working_set)) if on]
    print(f"{a.shape}, bf16, one device of {a.device_gib} GiB" + "".join(", " + c for c in cases))
    if not fused_kernels_on("cuda"):
        print("(Triton is not installed here: the estimates use the unfused kernels' constants, not CUDA's)")
    print(f"{'L':>7} {'budget':>7} {'needs':>7} {'room':>7} {'products':>9} {'kept':>6} {'f':>6} {'floor':>6}")
    for r in rows:
        print(
            f"{r['length']:>7} {r['budget_gib']:>7.1f} {r['recompute_needs_gib']:>7.1f} {r['room_gib']:>7.1f} "
            f"{r['products_gib']:>9.1f} {100 * r['kept_share']:>5.0f}% {r['f']:>6.2f} {r['floor']:>6.2f}"
            + ("  (everything kept)" if r["auto_keeps_everything"] else "")
            + ("" if r["fits"] else "  (recomputation does not fit: auto offloads or runs in pieces)")
        )
    print("GiB; needs: the layer inputs and a recomputed mixer's working set; f: recomputed multiply-adds / the forward's")
    print("floor = 2 + f: the pass in forwards if the linear layers were all of the work")


if __name__ == "__main__":
    main()
