"""Hybrid models on the GPU: MambaLRP's attribution time against the transformers forward.

Shapes (random weights, built on the GPU in bf16, batch 1, the next-token logit at the last
position explained):

- ``nemotron_h_8b``: Nemotron-H-8B-like (transformers ``NemotronH``): hidden 4096, 52 layers
  (24 Mamba2 with 128 heads x 64, 8 groups, state 128; 24 squared-ReLU MLPs of 21504; 4 GQA
  attention layers of 32 heads, 8 KV heads).
- ``granite_4h_tiny``: Granite-4.0-H-Tiny-like (transformers ``GraniteMoeHybrid``): hidden 1536,
  40 layers (36 Mamba2 with 48 heads x 64, state 128; 4 attention layers of 12 heads, 4 KV heads;
  a MoE of 64 experts, top 6, expert width 512, shared expert 1024, in every layer).

The forward is the model's own with the fastest kernels it finds (mamba-ssm, causal-conv1d,
sdpa), no grad, computing the logits at the last position only (``logits_to_keep=1``, as the
attribution does since 2026-12-02; before, both computed them at every position); the kernels
found are printed. Each time is the median of ``--repeats`` calls
after one warm-up. The ratio is printed last; ``--profile N`` also prints the N kernels with the
most GPU time in each pass. ``--estimate`` prints, on any machine and without weights (the
model built on the ``meta`` device), what ``recompute="auto"`` estimates the pass needs in each
mode (GiB; ``others``: the attention, MLP and expert layers, kept in every mode).

    python3 benchmarks/gpu_hybrids.py --shape nemotron_h_8b --length 8192 --out nemotron.json
    python3 benchmarks/gpu_hybrids.py --shape granite_4h_tiny --length 8192 --estimate
    CUDA_LAUNCH_BLOCKING=1 python3 benchmarks/gpu_hybrids.py --shape nemotron_h_8b --length 131072 --forward-only
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import os
import sys
import time
from typing import Any, Callable, Dict, List

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import RecomputeSpy, cuda_time, print_ratios, versions, write_results  # noqa: E402

# 52 layers as in Nemotron-H-8B: 24 Mamba2 (M), 24 MLPs (-), 4 attention layers (*) spread through the depth
NEMOTRON_PATTERN_8B = "*".join("M-" * 6 for _ in range(4)) + "*"
assert len(NEMOTRON_PATTERN_8B) == 52


def nemotron_h_8b(layers: int) -> Any:
    from transformers import NemotronHConfig

    pattern = NEMOTRON_PATTERN_8B[:layers] if layers else NEMOTRON_PATTERN_8B
    return NemotronHConfig(
        vocab_size=131072,
        hidden_size=4096,
        hybrid_override_pattern=pattern,
        num_hidden_layers=len(pattern),
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        intermediate_size=21504,
        mlp_hidden_act="relu2",
        mamba_num_heads=128,
        mamba_head_dim=64,
        n_groups=8,
        ssm_state_size=128,
        conv_kernel=4,
        expand=2,
        chunk_size=128,
        use_conv_bias=True,
        mamba_proj_bias=False,
    )


def granite_4h_tiny(layers: int) -> Any:
    from transformers import GraniteMoeHybridConfig

    n = layers or 40
    kinds = ["attention" if i % 10 == 5 else "mamba" for i in range(n)]
    return GraniteMoeHybridConfig(
        vocab_size=100352,
        hidden_size=1536,
        num_hidden_layers=n,
        layer_types=kinds,
        num_attention_heads=12,
        num_key_value_heads=4,
        intermediate_size=512,
        shared_intermediate_size=1024,
        num_local_experts=64,
        num_experts_per_tok=6,
        mamba_n_heads=48,
        mamba_d_head=64,
        mamba_d_state=128,
        mamba_n_groups=1,
        mamba_expand=2,
        mamba_chunk_size=256,
        position_embedding_type="nope",
    )


SHAPES: Dict[str, Callable[[int], Any]] = {"nemotron_h_8b": nemotron_h_8b, "granite_4h_tiny": granite_4h_tiny}


def _count(kept, total: int) -> str:
    """``kept`` of a plan (``None``: all) as "k of n"."""
    return f"{total if kept is None else kept} of {total}"


def print_estimate(shape: str, layers: int, length: int, device_gib: float = 139.8) -> Dict[str, float]:
    """``recompute="auto"``'s estimate of one pass over ``length`` tokens in each mode, in GiB,
    for the shape built on the ``meta`` device (bf16, CUDA), and the mode it would choose on a
    device of ``device_gib`` (the H200's 139.8 by default) holding only the weights."""
    from types import SimpleNamespace

    from transformers import AutoModelForCausalLM

    from captum_mambalrp.adapters import recompute as rc
    from captum_mambalrp.adapters.install import install_rules
    from captum_mambalrp.rules.composites import composite

    config = SHAPES[shape](layers)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    inst = install_rules(model, composite("mambalrp"), recompute="auto")  # its layers recomputed with the mixers
    try:
        weights = sum(p.numel() * p.element_size() for p in model.parameters())
        budget = rc.AUTO_MEMORY_FRACTION * (device_gib * 2**30 - weights)
        plan = rc.plan_for(model, inst.mixers, attention_names=inst.attention, layer_names=inst.recomputed_layers, budget=budget)
        hidden = SimpleNamespace(shape=(1, length, config.hidden_size), dtype=torch.bfloat16, device=torch.device("cuda"))
        mode = plan.choose(hidden)
    finally:
        inst.patcher.restore()
    needed = {k: v / 2**30 for k, v in plan.needed.items()}
    print(
        f"{shape}, {length} tokens, auto's estimate (GiB): "
        + ", ".join(f"{k} {v:.1f}" for k, v in needed.items())
        + f"; on {device_gib} GiB with {weights / 2**30:.1f} GiB of weights auto chooses recompute={mode!r}"
        + (
            f" (kept: out_proj outputs of {_count(plan.output_mixers, len(inst.mixers))} mixers, the products of "
            f"{_count(plan.product_layers, len(plan.layer_products))} layers, in_proj outputs of "
            f"{_count(plan.projection_mixers, len(inst.mixers))} mixers)"
            if mode == "projection"
            else ""
        )
    )
    return needed


def contiguous_dt(model: torch.nn.Module) -> List[str]:
    """Have the model's modeling module pass its SSD chunk-scan function a contiguous ``dt``.

    transformers' Mamba2 mixers hand mamba-ssm's ``mamba_chunk_scan_combined`` ``dt`` as a view of
    ``in_proj``'s output; past 2^31 elements of that output (Nemotron-H-8B at 131072 tokens) its
    ``_chunk_cumsum_fwd`` kernel's 32-bit offsets overflow (state-spaces/mamba#1015). A copy of
    ``dt`` (``[b, l, heads]``) is what such a forward would do to run at all, so the goal-1
    baseline at that length is measured with it. Returns the names wrapped.
    """
    module = sys.modules[type(model).__module__]
    wrapped = []
    for name in dir(module):
        fn = getattr(module, name)
        if "chunk_scan" in name and "split" not in name and callable(fn) and not isinstance(fn, type):

            @functools.wraps(fn)  # (kept as __wrapped__: models.kernel_path still finds the torch definition)
            def call(hidden_states, dt, *rest, _fn=fn, **kwargs):
                return _fn(hidden_states, dt.contiguous(), *rest, **kwargs)

            setattr(module, name, call)
            wrapped.append(name)
    return wrapped


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), required=True)
    parser.add_argument("--length", type=int, default=8192)
    parser.add_argument("--layers", type=int, default=0, help="fewer layers than the shape has (0: all)")
    parser.add_argument("--batch", type=int, default=1, help="sequences per call (issue 14's goal 4: 16 x 4096)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--recompute", default="auto")
    parser.add_argument("--backend", default="auto", help="MambaLRP's scan backend (auto, torch, triton, mamba_ssm)")
    parser.add_argument("--out", default=None)
    parser.add_argument("--profile", type=int, default=0, help="print the N kernels with the most GPU time in each pass")
    parser.add_argument("--forward-only", action="store_true", help="time transformers' forward only (no attribution)")
    parser.add_argument("--estimate", action="store_true", help="print auto's memory estimate per mode (no GPU, no weights)")
    parser.add_argument(
        "--contiguous-dt",
        action="store_true",
        help="the forward's SSD scan gets a contiguous copy of dt (mamba-ssm's 32-bit offsets fail on the view at 131072 tokens)",
    )
    args = parser.parse_args()
    if args.estimate:
        print_estimate(args.shape, args.layers, args.length)
        return

    from transformers import AutoModelForCausalLM

    from captum_mambalrp import MambaLRP

    torch.backends.cuda.matmul.allow_tf32 = True
    config = SHAPES[args.shape](args.layers)
    t0 = time.perf_counter()
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    weights_gib = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30
    print(
        f"{args.shape}: {type(model).__name__}, {weights_gib:.1f} GiB of weights, built in {time.perf_counter() - t0:.0f} s",
        flush=True,
    )
    kernels = {k: importlib.util.find_spec(k) is not None for k in ("mamba_ssm", "causal_conv1d", "flash_attn")}
    print(f"kernels installed: {kernels}; attn_implementation={model.config._attn_implementation}", flush=True)

    if args.contiguous_dt:
        print(f"forward: dt made contiguous in {contiguous_dt(model) or 'nothing (no chunk-scan function found)'}", flush=True)
    ids = torch.randint(0, config.vocab_size, (args.batch, args.length), device="cuda")
    with torch.no_grad():
        t_fwd = cuda_time(lambda: model(ids, use_cache=False, logits_to_keep=1), args.repeats)
    print(f"forward: {t_fwd * 1e3:.1f} ms", flush=True)
    if args.forward_only:  # (run it with CUDA_LAUNCH_BLOCKING=1 to see which kernel fails)
        return

    spy = RecomputeSpy()  # what auto decided in the first pass
    lrp = MambaLRP(model, recompute=args.recompute, backend=args.backend)
    target = int(torch.randint(0, config.vocab_size, (1,)))
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    relevance, delta = lrp.attribute(ids, target=target, return_convergence_delta=True, use_cache=False)
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    t_lrp = cuda_time(lambda: lrp.attribute(ids, target=target, use_cache=False), args.repeats)
    tokens = ids.numel()
    print(
        f"MambaLRP: {t_lrp * 1e3:.1f} ms, peak {peak / 1024:.1f} GiB over the weights ({peak / tokens:.3f} MiB per token); "
        f"auto: {spy.summary()}",
        flush=True,
    )
    if args.profile:
        from gpu_profile import kernel_table

        with torch.no_grad():
            table = kernel_table(lambda: model(ids, use_cache=False, logits_to_keep=1), args.profile)
            print("forward kernels:\n" + table, flush=True)
        table = kernel_table(lambda: lrp.attribute(ids, target=target, use_cache=False), args.profile)
        print("attribution kernels:\n" + table, flush=True)
    row = {
        "shape": args.shape,
        "L": args.length,
        "batch": args.batch,
        "layers": config.num_hidden_layers,
        "forward_s": t_fwd,
        "attribute_s": t_lrp,
        "ratio": t_lrp / t_fwd,
        "peak_mib_per_token": peak / tokens,
        "peak_gib": peak / 1024,
        "auto": spy.summary(),
        "throughput_share": t_fwd / t_lrp,  # attribution tokens/s over the forward's (goal 4: >= 0.4)
        "forward_logits": "last position",
        "forward_dt": "contiguous copy" if args.contiguous_dt else "view of in_proj's output",
        "relevance_finite": bool(torch.isfinite(relevance).all()),
        "delta_over_score": float(delta.abs().max()),
        "kernels": kernels,
    }
    write_results(args.out, {"machine": versions(), "args": vars(args), "rows": [row]})
    ratios = [
        {
            "name": f"{args.shape} {args.batch} x {args.length} attribute / forward",
            "value": row["ratio"],
            "goal": "<= 2.5 (issue 14; issue 13: <= 3)",
            "ok": row["ratio"] <= 2.5,
        }
    ]
    if args.batch > 1:
        ratios.append(
            {
                "name": f"{args.shape} {args.batch} x {args.length} attribution tokens/s over the forward's",
                "value": row["throughput_share"],
                "goal": ">= 0.4 (issue 14, goal 4)",
                "ok": row["throughput_share"] >= 0.4,
            }
        )
    print_ratios(ratios)


if __name__ == "__main__":
    main()
