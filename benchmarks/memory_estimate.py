"""``recompute="auto"``'s memory estimate against what a relevance pass keeps, on tiny hybrids (CPU).

For each family (the tiny configs of ``tests/test_hybrids.py`` at d_model 64, with the families'
MLP / expert / attention proportions), one float32 pass over 256 tokens with ``recompute=True``
(mixers and the attention, MLP and expert layers recomputed): the bytes of the tensors saved for
the backward pass (saved-tensor hooks, each tensor counted once), against the plan's estimate of
what the forward pass keeps (mixer and layer inputs; the backward pass's working sets are left
out, they are not saved tensors), against the mixers' inputs alone, and against the mixers'
inputs plus what the other layers would keep without recomputation.

    python benchmarks/memory_estimate.py

``--pure`` instead measures what one pure Mamba1 (FalconMamba) and Mamba2 mixer keeps per token
without recomputation, by memory (each storage counted once, so that views of one tensor, as the
gate's input is of ``in_proj``'s output, count once), in float32 and bf16, with the fused kernels
on and off; run it under ``TRITON_INTERPRET=1`` so that the fused kernels (CUDA's path) run on the
CPU::

    TRITON_INTERPRET=1 python benchmarks/memory_estimate.py --pure

``--modes`` measures the peak memory of one pass per ``recompute`` mode (``False``,
``"projection"``, ``True``) on a tiny FalconMamba (d_model 64, 4 layers, 2048 tokens, float32):
the largest sum of live allocations in torch's profiler's memory records, per token and layer::

    python benchmarks/memory_estimate.py --modes
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from captum_mambalrp import MambaLRP  # noqa: E402
from captum_mambalrp.adapters import recompute as rc  # noqa: E402

LENGTH = 256
#: d_model 64, with the families' MLP / expert / attention proportions
SHAPES = {
    "nemotron_h": dict(hidden_size=64, intermediate_size=336, moe_intermediate_size=64, mamba_num_heads=8, mamba_head_dim=16),
    "bamba": dict(hidden_size=64, intermediate_size=256, mamba_n_heads=8, mamba_d_head=16),
    "granite": dict(hidden_size=64, intermediate_size=128, mamba_n_heads=8, mamba_d_head=16),
    "jamba": dict(hidden_size=64, intermediate_size=256),
}


def saved_bytes(model: torch.nn.Module, ids: torch.Tensor, mode) -> int:
    """Bytes of the tensors one relevance pass keeps for its backward pass (each counted once)."""
    seen, total = set(), [0]

    def pack(t):
        if torch._C._current_graph_task_id() == -1:  # saved in the forward pass
            key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
            if key not in seen:
                seen.add(key)
                total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        MambaLRP(model, recompute=mode).attribute(ids, target=1)
    return total[0]


def compare(family: str, length: int = LENGTH) -> dict:
    """Measured and estimated bytes per token of one pass with recomputation (``recompute=True``:
    mixers and the attention, MLP and expert layers recomputed), and what keeping those layers'
    tensors would add (the estimate before they were recomputed)."""
    from test_hybrids import build

    from captum_mambalrp.adapters.install import install_rules
    from captum_mambalrp.rules.composites import Composite

    model = build(family, **SHAPES[family])
    ids = torch.randint(1, model.config.vocab_size, (1, length), generator=torch.Generator().manual_seed(0))
    measured = saved_bytes(model, ids, True) / length
    inst = install_rules(model, Composite(), recompute=True)  # the names the pass uses
    try:
        plan = rc.plan_for(model, inst.mixers, attention_names=inst.attention, layer_names=inst.recomputed_layers)
        mixers = [model.get_submodule(n) for n in inst.mixers]
    finally:
        inst.patcher.restore()
    hidden = torch.zeros(1, length, model.config.hidden_size)
    plan.budget = 2.0**50  # any: only the estimate is read
    plan.choose(hidden)
    inputs = sum(rc.mixer_bytes_per_token(m, torch.float32)["input"] for m in mixers)
    # what the forward pass keeps (the saved tensors counted above): the estimate without the
    # working sets of one mixer's and one layer's backward pass, which exist during it only
    working = plan.layer_working + plan.layer_working_per_length * length
    others = plan.needed["others"] / length - working  # the other layers, recomputed
    kept = plan.needed["others_kept"] / length  # ... and not
    return dict(measured=measured, inputs=inputs, estimate=inputs + others, kept_estimate=inputs + kept, working=working)


def storage_bytes(model: torch.nn.Module, ids: torch.Tensor) -> int:
    """Bytes of the storages one relevance pass (``recompute=False``) keeps for its backward
    pass, each storage counted once whatever views of it are saved."""
    seen: dict = {}

    def pack(t):
        if torch._C._current_graph_task_id() == -1:
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        MambaLRP(model, recompute=False).attribute(ids, target=1)
    return sum(seen.values())


def pure(length: int = 64, layers: int = 2) -> None:
    """Bytes per token and mixer a pure Mamba1 / Mamba2 pass keeps (see the module docstring)."""
    import transformers

    configs = {
        "falcon_mamba": (transformers.FalconMambaConfig, transformers.FalconMambaForCausalLM, dict(state_size=16)),
        "mamba2": (
            transformers.Mamba2Config,
            transformers.Mamba2ForCausalLM,
            dict(state_size=16, head_dim=16, num_heads=16, n_groups=1, chunk_size=16),
        ),
    }
    print("| model | d_inner | dtype | fused kernels | kept B / token / mixer | per inner channel |")
    print("| :--- | ---: | :--- | :--- | ---: | ---: |")
    for name, (config_cls, model_cls, extra) in configs.items():
        config = config_cls(vocab_size=64, hidden_size=128, num_hidden_layers=layers, expand=2, **extra)
        d_inner = 2 * config.hidden_size
        for dtype in (torch.float32, torch.bfloat16):
            torch.manual_seed(0)
            model = model_cls(config).to(dtype).eval()
            ids = torch.randint(0, 64, (1, length), generator=torch.Generator().manual_seed(0))
            for fused in ("1", "0"):
                os.environ["CAPTUM_MAMBALRP_FUSED"] = fused
                per = storage_bytes(model, ids) / length / layers
                on = "on" if fused == "1" else "off"
                print(f"| {name} | {d_inner} | {str(dtype)[6:]} | {on} | {per:.0f} | {per / d_inner:.1f} |")
    os.environ.pop("CAPTUM_MAMBALRP_FUSED", None)


def peak_bytes(model: torch.nn.Module, ids: torch.Tensor, mode) -> int:
    """The peak of live CPU allocations during one pass (torch's profiler's memory records)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        MambaLRP(model, recompute=mode).attribute(ids, target=1)
    records = sorted((r.start_ns(), r.nbytes()) for r in prof.profiler.kineto_results.events() if r.name() == "[memory]")
    live = top = 0
    for _, n in records:
        live += n
        top = max(top, live)
    return top


def modes(length: int = 2048, layers: int = 4) -> None:
    """Peak bytes per token and layer of each recompute mode (see the module docstring)."""
    import transformers

    torch.manual_seed(0)
    config = transformers.FalconMambaConfig(vocab_size=64, hidden_size=64, num_hidden_layers=layers, state_size=8, expand=2)
    model = transformers.FalconMambaForCausalLM(config).eval()
    ids = torch.randint(0, 64, (1, length), generator=torch.Generator().manual_seed(0))
    for mode in (False, "projection", True):
        print(f"recompute={mode!r}: {peak_bytes(model, ids, mode) / length / layers:.0f} B per token and layer at the peak")


def main() -> None:
    if "--pure" in sys.argv[1:]:
        pure()
        return
    if "--modes" in sys.argv[1:]:
        modes()
        return
    header = "| family | measured B/token | estimate | estimate / measured | mixer inputs only / measured"
    print(header + " | other layers kept / measured |")
    print("| :--- | ---: | ---: | ---: | ---: | ---: |")
    for family in SHAPES:
        r = compare(family)
        print(
            f"| {family} | {r['measured']:.0f} | {r['estimate']:.0f} | {r['estimate'] / r['measured']:.2f} "
            f"| 1/{r['measured'] / r['inputs']:.0f} | {r['kept_estimate'] / r['measured']:.1f} |"
        )


if __name__ == "__main__":
    main()
