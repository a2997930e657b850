"""Issue 14 on one GPU: 7B-class shapes in bf16, long sequences, throughput, precision.

Runnable in parts, one shape / length per invocation (each well under 10 minutes):

    python benchmarks/gpu_scale.py time --shape falcon7b --length 4096          # goal 1 (and the issue's table)
    python benchmarks/gpu_scale.py time --shape mamba2_2p7b --length 32768
    python benchmarks/gpu_scale.py time --shape mamba1_130m --dtype float32 --length 16384   # goal 1, <= 2.0x
    python benchmarks/gpu_scale.py time --shape falcon7b --length 524288 --skip-forward-repeats  # goal 2 (auto)
    python benchmarks/gpu_scale.py time --shape falcon7b --length 524288 --recompute sequence      # goal 2, mode forced
    python benchmarks/gpu_scale.py throughput --shape falcon7b --batch 16 --length 4096          # goal 4
    python benchmarks/gpu_scale.py precision --shape mamba2_2p7b --layers 16 --hidden 1024 --length 4096  # goal 3
    python benchmarks/gpu_scale.py check --shape falcon7b --length 10000     # "sequence" == keep, on a reduced shape
    python benchmarks/gpu_scale.py pool --shape falcon7b --dtypes bfloat16 --inputs run12.jsonl run13.jsonl  # goal 3 over runs

Models: random weights made directly on the GPU in the dtype (transformers' initialisation),
a 2-class head at the last token, batch 1 (throughput: the batch given), ids random.
Forward: the transformers model, no grad, eager, with mamba-ssm and causal-conv1d installed
(its fastest kernels). Attribution: ``MambaLRP(model).attribute(ids, target=1)``, default options.
Times: best of ``--repeats`` calls after one warm-up (long runs: one call each). Peak memory:
``torch.cuda.max_memory_allocated`` during one attribution, minus what was allocated before it
(the weights and the ids), per token. TF32 is allowed unless ``--no-tf32`` (the issue's conditions);
``--no-tf32`` also compiles Triton's float32 dots (mamba-ssm's SSD kernels in the forward) as
``ieee`` unless ``TRITON_F32_DEFAULT`` is set: TF32 off in both passes, as in the fp32 tables.
Each part prints one JSON line (``RESULT {...}``) and appends it to ``--out``; ``time`` rows
carry ``mib_per_token`` and ``goal2_share`` (MiB per token over goal 2's 0.24: <= 1 meets it).
``--recompute`` sets MambaLRP's option (default ``auto``; ``sequence`` with ``--chunk``,
``--stride``, ``--slots``, ``--host`` fixes those settings, see
``captum_mambalrp.adapters.recompute.SequenceChunks``). ``--skip-forward-repeats`` times the
forward once without a warm-up (long runs), ``--skip-forward`` not at all; a forward that runs
out of memory is recorded and the attribution measured anyway.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import sys
import time
from typing import Any, Callable, Dict, Optional, Tuple

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import RecomputeSpy  # noqa: E402

#: goal 2 of issue 14: peak memory over the weights per token at 2^19 tokens (Falcon-Mamba-7B, bf16)
GOAL2_MIB_PER_TOKEN = 0.24
#: the Triton kernels a run may turn on / off / compare (--decay-kernel, --ssd-kernel, --split-kernel),
#: and their switches
KERNEL_SWITCHES = {
    "decay": "CAPTUM_MAMBALRP_DECAY_KERNEL",
    "ssd": "CAPTUM_MAMBALRP_SSD_KERNEL",
    "split": "CAPTUM_MAMBALRP_SPLIT_KERNEL",
}
#: what ``compare`` switches, in one run: row label -> (option, variable, baseline value, compared value)
COMPARES = {
    **{f"{name}_kernel": (f"{name}_kernel", env, "0", "1") for name, env in KERNEL_SWITCHES.items()},
    "conv_compute": ("conv_output", "CAPTUM_MAMBALRP_CONV_OUTPUT", "model", "compute"),
}
#: where models live ("cuda"; "cpu" only for a smoke test of the script itself)
DEVICE = os.environ.get("GPU_SCALE_DEVICE", "cuda")

SHAPES: Dict[str, Dict[str, Any]] = {
    # tiiuae/falcon-mamba-7b: 64 layers, d_model 4096, d_inner 8192, state 16, dt rank 256
    "falcon7b": dict(
        kind="falcon",
        vocab_size=65024,
        hidden_size=4096,
        num_hidden_layers=64,
        state_size=16,
        expand=2,
        conv_kernel=4,
        time_step_rank=256,
    ),
    # state-spaces/mamba2-2.7b: 64 layers, d_model 2560, 80 heads x 64, state 128, 1 group
    "mamba2_2p7b": dict(
        kind="mamba2",
        vocab_size=50288,
        hidden_size=2560,
        num_hidden_layers=64,
        state_size=128,
        expand=2,
        head_dim=64,
        num_heads=80,
        n_groups=1,
        conv_kernel=4,
        chunk_size=256,
    ),
    "mamba1_130m": dict(
        kind="mamba", vocab_size=50280, hidden_size=768, num_hidden_layers=24, state_size=16, expand=2, conv_kernel=4
    ),
    "mamba2_130m": dict(
        kind="mamba2",
        vocab_size=50280,
        hidden_size=768,
        num_hidden_layers=24,
        state_size=128,
        expand=2,
        head_dim=64,
        num_heads=24,
        n_groups=1,
        conv_kernel=4,
        chunk_size=256,
    ),
}


class LastToken(nn.Module):
    """A transformers backbone and a 2-class head (read at the last token)."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.lm_head = nn.Linear(backbone.config.hidden_size, 2, bias=False)
        self.config = backbone.config

    def get_input_embeddings(self) -> nn.Module:
        return self.backbone.get_input_embeddings()

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None):
        h = self.backbone(input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask, use_cache=False)
        out = self.lm_head(h.last_hidden_state.to(self.lm_head.weight.dtype))
        return out if out.dtype == torch.float64 else out.float()


def build(shape: str, dtype: torch.dtype, layers: int = 0, hidden: int = 0, seed: int = 0) -> nn.Module:
    """Random weights made on the GPU in ``dtype`` from ``seed`` (``layers`` / ``hidden``: a
    reduced copy of the shape; Mamba2 keeps its head size and sets the number of heads)."""
    import transformers

    cfg = dict(SHAPES[shape])
    kind = cfg.pop("kind")
    if layers:
        cfg["num_hidden_layers"] = layers
    if hidden:
        cfg["hidden_size"] = hidden
        if kind == "mamba2":
            cfg["num_heads"] = cfg["expand"] * hidden // cfg["head_dim"]
    config_cls, model_cls = {
        "falcon": (transformers.FalconMambaConfig, transformers.FalconMambaModel),
        "mamba": (transformers.MambaConfig, transformers.MambaModel),
        "mamba2": (transformers.Mamba2Config, transformers.Mamba2Model),
    }[kind]
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(DEVICE):
            model = LastToken(model_cls(config_cls(**cfg)))
    finally:
        torch.set_default_dtype(previous)
    return model.to(dtype).eval()


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def best(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return min(times)


def recompute_option(a: argparse.Namespace) -> Any:
    """MambaLRP's ``recompute`` from the command line."""
    from captum_mambalrp.adapters.recompute import SequenceChunks

    value = a.recompute
    if value == "sequence" and any(v is not None for v in (a.chunk, a.stride, a.slots, a.host)):
        host = None if a.host is None else a.host == "yes"
        return SequenceChunks(chunk=a.chunk, stride=a.stride, slots=a.slots, host=host)
    return {"true": True, "false": False}.get(value, value)


class Memory:
    """Peak memory of a block of code over what was allocated before it: CUDA, the caching
    allocator's peak; on the CPU (the script's smoke test), the peak of the bytes torch's CPU
    allocator holds, summed from the allocation events of torch's profiler (exact, and slow:
    CPU times then include the profiler)."""

    def __init__(self) -> None:
        self.cuda = DEVICE == "cuda"
        self.profiler: Any = None

    def start(self) -> int:
        gc.collect()
        if not self.cuda:
            from torch.profiler import ProfilerActivity, profile

            self.profiler = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
            self.profiler.__enter__()
            return 0
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()

    def peak(self, base: int) -> float:
        if self.cuda:
            return float(torch.cuda.max_memory_allocated() - base)
        self.profiler.__exit__(None, None, None)
        events = [e for e in self.profiler.profiler.kineto_results.events() if e.name() == "[memory]"]
        current = peak = 0
        for e in sorted(events, key=lambda e: e.start_ns()):
            current += e.nbytes()
            peak = max(peak, current)
        return float(peak)


def emit(row: Dict[str, Any], out: str) -> None:
    line = json.dumps(row)
    print("RESULT " + line, flush=True)
    if out:
        with open(out, "a") as f:
            f.write(line + "\n")


def record_decision(row: Dict[str, Any], spy: Any) -> None:
    """``recompute="auto"``'s decision of the measured call, in the row's fields."""
    decision = spy.summary()
    row["auto_mode"] = decision["mode"]
    row["part_size"] = decision["part_size"]
    for key in ("output_mixers", "projection_mixers", "sequence_settings"):
        row[key] = decision.get(key)
    row["auto_estimate_gib"] = decision.get("estimate_gib")


def measured_call(lrp: Any, ids: torch.Tensor, memory: Memory, spy: Any) -> Tuple[Optional[torch.Tensor], float, float]:
    """One attribution, timed and with its peak memory (GiB over what was allocated before it),
    ``auto``'s decision recorded by ``spy``: ``(relevance, seconds, peak)``, relevance None when it
    ran out of memory (the peak then up to the error)."""
    spy.reset()
    base = memory.start()
    sync()
    t = time.perf_counter()
    try:
        relevance = lrp.attribute(ids, target=1)
    except torch.cuda.OutOfMemoryError:
        return None, math.nan, memory.peak(base) / 2**30
    sync()
    return relevance, time.perf_counter() - t, memory.peak(base) / 2**30


def part_time(a: argparse.Namespace) -> None:
    from captum_mambalrp import MambaLRP

    dtype = getattr(torch, a.dtype)
    model = build(a.shape, dtype, a.layers, a.hidden)
    memory = Memory()
    weights = torch.cuda.memory_allocated() if memory.cuda else 0
    ids = torch.randint(0, 1000, (a.batch, a.length), device=DEVICE)
    tokens = ids.numel()
    long = tokens > 65536
    row: Dict[str, Any] = dict(part=a.part, shape=a.shape, dtype=a.dtype, batch=a.batch, length=a.length, tokens=tokens)
    row["weights_gib"] = weights / 2**30
    row["recompute"] = a.recompute if a.recompute != "sequence" else str(recompute_option(a))
    row["conv_kernel"] = os.environ.get("CAPTUM_MAMBALRP_CONV_KERNEL", "default")
    row["scan_inputs"] = os.environ.get("CAPTUM_MAMBALRP_SCAN_INPUTS", "default")
    row["conv_output"] = os.environ.get("CAPTUM_MAMBALRP_CONV_OUTPUT", "default")
    row["cuda_graph"] = a.cuda_graph
    row["tf32"] = not a.no_tf32
    row["triton_f32"] = os.environ.get("TRITON_F32_DEFAULT", "tf32")
    for name, env in KERNEL_SWITCHES.items():
        row[f"{name}_kernel"] = os.environ.get(env, "default")

    def forward():
        with torch.no_grad():
            model(ids)

    reps = 1 if long else a.repeats
    if not a.skip_forward:
        try:
            row["forward_s"] = best(forward, reps, warmup=0 if a.skip_forward_repeats else 1)
        except torch.cuda.OutOfMemoryError:
            row["forward_s"] = None
            row["forward_error"] = "out of memory"
    spy = RecomputeSpy()
    lrp = MambaLRP(model, recompute=recompute_option(a), cuda_graph=a.cuda_graph, backend=a.backend)
    row["backend"] = a.backend
    # warm-up (long: a short call compiles the kernels; with --cuda-graph this call records the graph)
    lrp.attribute(ids[:, :4096] if long else ids, target=1)
    relevance, first, peak = measured_call(lrp, ids, memory, spy)
    if relevance is None:
        row["error"] = "out of memory"
        row["peak_before_error_gib"] = peak
        record_decision(row, spy)
        emit(row, a.out)
        return
    times = [first]
    row["peak_over_weights_gib"] = peak
    row["mib_per_token"] = row["peak_over_weights_gib"] * 1024 / tokens
    row["goal2_share"] = row["mib_per_token"] / GOAL2_MIB_PER_TOKEN
    row["relevance_finite"] = bool(torch.isfinite(relevance).all())
    record_decision(row, spy)
    if reps > 1:
        times.append(best(lambda: lrp.attribute(ids, target=1), reps - 1, warmup=0))
    row["attribute_s"] = min(times)
    for label, (option, env, _, value) in COMPARES.items():
        if getattr(a, option, "default") != "compare":
            continue
        os.environ[env] = value
        if a.cuda_graph:  # the recorded graph would replay the baseline's pass: record another
            del lrp
            torch.cuda.empty_cache()
            lrp = MambaLRP(model, recompute=recompute_option(a), cuda_graph=True, backend=a.backend)
        lrp.attribute(ids[:, :4096] if long else ids, target=1)  # the warm-up (or recording), outside the peak
        other, first, peak = measured_call(lrp, ids, memory, spy)
        if other is None:  # the baseline's figures stand; this side's peak so far
            row[f"{label}_error"] = "out of memory"
            row[f"peak_before_error_{label}_gib"] = peak
            continue
        row[f"peak_over_weights_{label}_gib"] = peak
        row[f"{label}_auto_mode"] = spy.summary()["mode"]  # the estimate may choose otherwise on this side
        row[f"{label}_relevance_finite"] = bool(torch.isfinite(other).all())
        row[f"{label}_rel_l2"] = float((other.float() - relevance.float()).norm() / relevance.float().norm())
        del other
        seconds = [first] if reps == 1 else [first, best(lambda m=lrp: m.attribute(ids, target=1), reps - 1, warmup=0)]
        row[f"attribute_{label}_s"] = min(seconds)
        row[f"{label}_speedup"] = row["attribute_s"] / row[f"attribute_{label}_s"]
        if row.get("forward_s"):
            row[f"ratio_{label}"] = row[f"attribute_{label}_s"] / row["forward_s"]
    del relevance
    if row.get("forward_s"):
        row["ratio"] = row["attribute_s"] / row["forward_s"]
    if a.part == "throughput" and row.get("forward_s"):
        row["forward_tokens_per_s"] = tokens / row["forward_s"]
        row["attribute_tokens_per_s"] = tokens / row["attribute_s"]
        row["throughput_share"] = row["attribute_tokens_per_s"] / row["forward_tokens_per_s"]
    emit(row, a.out)


def part_check(a: argparse.Namespace) -> None:
    """recompute="sequence" against keeping everything on a reduced copy of the shape (pieces
    that do not divide the length): relevance relative L2 and the scan backends that ran."""
    from captum_mambalrp import MambaLRP, SequenceChunks
    from captum_mambalrp.scan import record_backends

    dtype = getattr(torch, a.dtype)
    model = build(a.shape, dtype, a.layers or 4, a.hidden or 512)
    ids = torch.randint(0, 1000, (a.batch, a.length), device=DEVICE)
    kept = MambaLRP(model, recompute=False).attribute(ids, target=1)
    row: Dict[str, Any] = dict(part="check", shape=a.shape, dtype=a.dtype, length=a.length, layers=a.layers or 4)
    chunk = a.chunk or max(1, a.length // 3 + 1)
    with record_backends() as used:
        seq = MambaLRP(model, recompute=SequenceChunks(chunk=chunk, stride=a.stride or 2, slots=a.slots or 1)).attribute(
            ids, target=1
        )
    row["chunk"] = chunk
    row["rel_l2_vs_keep"] = float((seq - kept).norm() / kept.norm())
    row["backends"] = dict(used)
    emit(row, a.out)


def part_precision(a: argparse.Namespace) -> None:
    """One row per seed (its own random model and tokens; seed 0's tokens are those drawn after
    building, as before ``--seeds``), then, for more than one seed, the pooled errors per dtype
    (``precision.pooled_errors``)."""
    from precision import measure, pooled_errors

    rows = []
    for seed in a.seeds:
        model = build(a.shape_for_precision, torch.float64, a.layers, a.hidden, seed).double()
        ids = torch.randint(0, 1000, (1, a.length), device=DEVICE)
        res = measure(model, ids, a.dtypes.split(","), 10, conv_compare=a.conv_output == "compare")
        res.update(part="precision", shape=a.shape_for_precision, layers=a.layers, hidden=a.hidden, length=a.length)
        res.update(seed=seed, scan_inputs=os.environ.get("CAPTUM_MAMBALRP_SCAN_INPUTS", "default"))
        emit(res, a.out)
        rows.append(res)
        del model
    if len(rows) > 1:
        pooled = {name: pooled_errors(rows, name) for name in a.dtypes.split(",")}
        wide = [n for n in pooled if "conv_compute" in rows[0][n]]
        pooled.update({f"{n}_conv_compute": pooled_errors(rows, n, "conv_compute") for n in wide})
        emit({"part": "precision_pooled", "shape": a.shape_for_precision, "seeds": a.seeds, **pooled}, a.out)


def part_pool(a: argparse.Namespace) -> None:
    """Goal 3 pooled over the models of several runs: the ``precision`` rows of ``--shape`` in the
    files ``--inputs``, each as the pass ships now (``precision.rows_as_shipped``), one
    ``precision_pooled`` row per dtype of ``--dtypes``. No GPU, no model."""
    from precision import pooled_errors, rows_as_shipped

    for name in a.dtypes.split(","):
        rows = rows_as_shipped(a.inputs, a.shape, name)
        emit(
            {"part": "precision_pooled", "shape": a.shape, "seeds": [r["seed"] for r in rows], "sources": a.inputs}
            | {name: pooled_errors(rows, name)},
            a.out,
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("part", choices=["time", "throughput", "precision", "check", "pool"])
    p.add_argument("--shape", default="falcon7b", choices=sorted(SHAPES))
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--length", type=int, default=4096)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--layers", type=int, default=0, help="override the number of layers (0: the shape's)")
    p.add_argument("--hidden", type=int, default=0, help="override d_model (0: the shape's)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dtypes", default="bfloat16,float32", help="precision part: dtypes compared with float64")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="precision part: one random model per seed")
    p.add_argument("--no-tf32", action="store_true")
    p.add_argument("--recompute", default="auto", choices=["auto", "true", "false", "projection", "offload", "sequence"])
    p.add_argument("--chunk", type=int, default=None, help="sequence: tokens per piece (default: from the budget)")
    p.add_argument("--stride", type=int, default=None, help="sequence: keep every stride-th block input")
    p.add_argument("--slots", type=int, default=None, help="sequence: block inputs kept while recomputing a stretch")
    p.add_argument("--host", choices=["yes", "no"], default=None, help="sequence: kept block inputs in pinned host memory")
    p.add_argument("--skip-forward-repeats", action="store_true", help="time the forward once, without a warm-up")
    p.add_argument("--skip-forward", action="store_true", help="do not time the forward")
    p.add_argument(
        "--conv-kernel",
        choices=["default", "on", "off"],
        default="default",
        help="the depthwise conv through kernels.conv: on/off sets CAPTUM_MAMBALRP_CONV_KERNEL",
    )
    p.add_argument(
        "--conv-output",
        choices=["default", "model", "compute", "compare"],
        default="default",
        help="a bf16 model's mixer conv output: rounded to its dtype or kept in float32 (sets "
        "CAPTUM_MAMBALRP_CONV_OUTPUT); compare times model, then compute, in this run (attribute_conv_compute_s, "
        "peak_over_weights_conv_compute_gib, conv_compute_rel_l2)",
    )
    p.add_argument(
        "--scan-inputs",
        choices=["default", "model", "compute"],
        default="default",
        help="a bf16 model's scan inputs: rounded to its dtype or not (sets CAPTUM_MAMBALRP_SCAN_INPUTS)",
    )
    p.add_argument(
        "--cuda-graph",
        action="store_true",
        help="MambaLRP(model, cuda_graph=True): the attribution replayed from a CUDA graph (no host launches); "
        "the forward stays eager",
    )
    for name, what in (
        ("decay", "SSD's chunk-end recurrence as one Triton kernel"),
        ("ssd", "SSD's chunk outputs in Triton"),
        ("split", "Mamba2's SiLU rule after the conv, fused with its split into x, B, C"),
    ):
        p.add_argument(
            f"--{name}-kernel",
            choices=["default", "on", "off", "compare"],
            default="default",
            help=f"{what}: on/off sets {KERNEL_SWITCHES[name]}; compare times the attribution without it, then with "
            f"it, in this run (attribute_{name}_kernel_s, {name}_kernel_speedup); one compare per run",
        )
    p.add_argument("--backend", default="auto", help="MambaLRP's scan backend (auto, torch, triton, mamba_ssm)")
    p.add_argument("--out", default="")
    p.add_argument("--inputs", nargs="+", default=[], help="pool part: JSONL files of earlier precision parts")
    a = p.parse_args()
    if a.part == "pool":
        return part_pool(a)
    compares = [option for option, *_ in COMPARES.values() if getattr(a, option) == "compare"]
    if len(compares) > 1:
        p.error(f"one compare per run (the baseline is the pass without that switch), got {compares}")
    for name, env in KERNEL_SWITCHES.items():
        mode = getattr(a, f"{name}_kernel")
        if mode != "default":
            os.environ[env] = "1" if mode == "on" else "0"  # compare: off first
    if a.conv_output != "default":
        os.environ["CAPTUM_MAMBALRP_CONV_OUTPUT"] = "model" if a.conv_output == "compare" else a.conv_output
    if a.scan_inputs != "default":
        os.environ["CAPTUM_MAMBALRP_SCAN_INPUTS"] = a.scan_inputs
    if a.conv_kernel != "default":
        os.environ["CAPTUM_MAMBALRP_CONV_KERNEL"] = "1" if a.conv_kernel == "on" else "0"
    torch.backends.cuda.matmul.allow_tf32 = not a.no_tf32
    torch.backends.cudnn.allow_tf32 = not a.no_tf32
    if a.no_tf32:  # read by Triton when it compiles, i.e. after this line
        os.environ.setdefault("TRITON_F32_DEFAULT", "ieee")
    if a.part == "precision":
        a.shape_for_precision = a.shape
        part_precision(a)
    elif a.part == "check":
        part_check(a)
    else:
        part_time(a)


if __name__ == "__main__":
    main()
