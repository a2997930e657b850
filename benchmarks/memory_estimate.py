"""``recompute="auto"``'s memory estimate against what a relevance pass keeps, on tiny hybrids (CPU).

For each family (the tiny configs of ``tests/test_hybrids.py`` at d_model 64, with the families'
MLP / expert / attention proportions), one float32 pass over 256 tokens with ``recompute=True``:
the bytes of the tensors saved for the backward pass (saved-tensor hooks, each tensor counted
once), against the estimate (the mixers' inputs plus
:func:`captum_mambalrp.adapters.recompute.others_bytes_per_token`) and against the mixers'
inputs alone (the estimate before it counted the other layers). Ratios are estimate / measured.

    python benchmarks/memory_estimate.py
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
    """Measured and estimated bytes per token of one pass with recomputation."""
    from test_hybrids import build, mixers_of

    model = build(family, **SHAPES[family])
    ids = torch.randint(1, model.config.vocab_size, (1, length), generator=torch.Generator().manual_seed(0))
    measured = saved_bytes(model, ids, True) / length
    mixers = mixers_of(model, family)
    attention = [m for m in model.modules() if type(m).__name__.endswith("Attention")]
    inputs = sum(rc.mixer_bytes_per_token(m, torch.float32)["input"] for m in mixers)
    others, per_length = rc.others_bytes_per_token(model, mixers, attention, torch.float32)
    return dict(measured=measured, inputs=inputs, estimate=inputs + others + per_length * length)


def main() -> None:
    print("| family | measured B/token | estimate | estimate / measured | mixer inputs only / measured |")
    print("| :--- | ---: | ---: | ---: | ---: |")
    for family in SHAPES:
        r = compare(family)
        print(
            f"| {family} | {r['measured']:.0f} | {r['estimate']:.0f} | {r['estimate'] / r['measured']:.2f} "
            f"| 1/{r['measured'] / r['inputs']:.0f} |"
        )


if __name__ == "__main__":
    main()
