#!/usr/bin/env python3
"""The forward a study runs its methods through: transformers' torch path or the package's scan.

A study (``evaluation.study``) runs every method and curve either through the model's own
forward (``--model-forward``) or through the package's scan with plain-gradient rules
(``scores.package_forward``: the same function). For Mamba2 and Bamba on transformers' torch
SSD path (no mamba-ssm), this script measures, at the deep models' width (d_model 768, 24 heads
x 64, state 128, chunk 64) and a few layers, in one run: the time of a forward pass and of a
forward and backward pass (to the input embeddings), and the bytes autograd saves for the
backward pass, per token and layer; and that both give the same logits and input gradients.

    python benchmarks/study_forward.py                    # Mamba2 and Bamba, 6 layers, 16 x 64 tokens
    python benchmarks/study_forward.py --arch mamba2 --rows 64 --length 32
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Dict, Tuple

import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from captum_mambalrp.evaluation.scores import package_forward  # noqa: E402


def build(arch: str, layers: int) -> nn.Module:
    from transformers import BambaConfig, BambaForCausalLM, Mamba2Config, Mamba2ForCausalLM

    torch.manual_seed(0)
    if arch == "mamba2":
        cfg = Mamba2Config(
            vocab_size=7400,
            hidden_size=768,
            num_hidden_layers=layers,
            state_size=128,
            head_dim=64,
            num_heads=24,
            expand=2,
            n_groups=1,
            chunk_size=64,
        )
        return Mamba2ForCausalLM(cfg).eval()
    cfg = BambaConfig(
        vocab_size=7400,
        hidden_size=768,
        num_hidden_layers=layers,
        num_attention_heads=12,
        num_key_value_heads=12,
        intermediate_size=1536,
        attn_layer_indices=[layers - 1],
        mamba_expand=2,
        mamba_n_heads=24,
        mamba_d_head=64,
        mamba_n_groups=1,
        mamba_d_state=128,
        mamba_chunk_size=64,
    )
    return BambaForCausalLM(cfg).eval()


def measure(model: nn.Module, ids: torch.Tensor) -> Tuple[Dict[str, float], torch.Tensor, torch.Tensor]:
    """Seconds of a forward and of a forward and backward pass (best of 2), saved bytes, logits, gradient."""
    saved = [0]

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved[0] += t.numel() * t.element_size()
        return t

    embeds = model.get_input_embeddings()(ids).detach()
    times = {"forward": float("inf"), "forward_backward": float("inf")}
    for _ in range(2):
        with torch.no_grad():
            t = time.perf_counter()
            logits = model(inputs_embeds=embeds).logits[:, -1]
            times["forward"] = min(times["forward"], time.perf_counter() - t)
        x = embeds.clone().requires_grad_(True)
        saved[0] = 0
        t = time.perf_counter()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            score = model(inputs_embeds=x).logits[:, -1, 0].sum()
        score.backward()
        times["forward_backward"] = min(times["forward_backward"], time.perf_counter() - t)
    times["saved_bytes"] = float(saved[0])
    return times, logits, x.grad


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", choices=["mamba2", "bamba", "both"], default="both")
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--rows", type=int, default=16)
    p.add_argument("--length", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    for arch in ["mamba2", "bamba"] if a.arch == "both" else [a.arch]:
        model = build(arch, a.layers)
        ids = torch.randint(0, 7000, (a.rows, a.length), generator=torch.Generator().manual_seed(0))
        own, logits0, grad0 = measure(model, ids)
        with package_forward(model) as took_over:
            pkg, logits1, grad1 = measure(model, ids)
        tokens = ids.numel()
        print(
            f"{arch}, {a.layers} layers, {a.rows} x {a.length} tokens (package took over: {took_over}): "
            f"forward {own['forward'] * 1e3:.0f} / {pkg['forward'] * 1e3:.0f} ms ({own['forward'] / pkg['forward']:.1f}x), "
            f"forward + backward {own['forward_backward'] * 1e3:.0f} / {pkg['forward_backward'] * 1e3:.0f} ms "
            f"({own['forward_backward'] / pkg['forward_backward']:.1f}x), saved "
            f"{own['saved_bytes'] / tokens / a.layers / 1e6:.2f} / "
            f"{pkg['saved_bytes'] / tokens / a.layers / 1e6:.2f} MB per token and layer "
            "(transformers' torch path / package's scan); max |logit difference| "
            f"{(logits0 - logits1).abs().max():.1e}, input gradient relative difference "
            f"{float((grad0 - grad1).norm() / grad0.norm()):.1e}",
            flush=True,
        )


if __name__ == "__main__":
    main()
