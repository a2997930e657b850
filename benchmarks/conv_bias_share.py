#!/usr/bin/env python3
"""How much of the explained logit the depthwise conv biases take, with and without them.

Under LRP-epsilon a conv's bias takes the share ``b / z`` of the relevance at its output, so a
Mamba mixer whose conv bias is large against its weighted input ``w * x`` passes on less. This
script measures, for trained Mamba2 / hybrid classifiers (``scripts/train_classifier.py``
folders), in float64 on the CPU: the ratio ``mean |b| / mean |w * x|`` of every mixer's conv,
and the median relative conservation gap ``|logit - sum R| / |logit|`` of MambaLRP with CP-LRP
attention (``composite="conservative"``) over a few test texts, as trained and with the conv
biases set to zero (the other rules conserve exactly, so the second gap is about 0).

    # the models of docs/results.md ("Conservation on the hybrid"), 6 layers, d_model 64, 300 steps
    python scripts/train_classifier.py --data DIR --out runs/bias-hybrid --arch hybrid --layers 6 --hidden 64 \\
        --attn-layers 2,5 --attn-heads 4 --head-dim 16 --state 16 --chunk 64 --max-steps 300 --batch 32 --lr 5e-4 --device cpu
    python scripts/train_classifier.py --data DIR --out runs/bias-mamba2 --arch mamba2 --layers 6 --hidden 64 \\
        --head-dim 16 --state 16 --chunk 64 --max-steps 300 --batch 32 --lr 5e-4 --device cpu
    python benchmarks/conv_bias_share.py --models runs/bias-hybrid runs/bias-mamba2 --data DIR/test.txt
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
from typing import List

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from captum_mambalrp import MambaLRP  # noqa: E402
from captum_mambalrp.models import load_model_and_tokenizer  # noqa: E402


def conv_bias_ratios(model: nn.Module, ids: torch.Tensor) -> List[float]:
    """``mean |b| / mean |w * x|`` of every Mamba2 mixer's conv over its ``x`` channels, in
    module order (transformers' Mamba2 and Bamba mixers: ``in_proj`` gives ``[z, xBC, dt]``; the
    conv is applied functionally on the CPU, so its input is taken from ``in_proj``)."""
    ratios: List[float] = []

    def hook_for(mixer: nn.Module):
        def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
            d, conv = mixer.intermediate_size, mixer.conv1d
            x = out[..., d : d + mixer.conv_dim].transpose(1, 2)
            wx = F.conv1d(x, conv.weight, None, 1, conv.padding, 1, conv.groups)[..., : x.shape[-1]][:, :d]
            ratios.append(float(conv.bias[:d].abs().mean() / wx.abs().mean().clamp_min(1e-30)))

        return hook

    mixers = [m for m in model.modules() if all(hasattr(m, a) for a in ("conv1d", "in_proj", "intermediate_size", "conv_dim"))]
    handles = [m.in_proj.register_forward_hook(hook_for(m)) for m in mixers if m.conv1d.bias is not None]
    try:
        with torch.no_grad():
            model(input_ids=ids)
    finally:
        for h in handles:
            h.remove()
    return ratios


def relative_gap(model: nn.Module, ids: torch.Tensor) -> float:
    """``|logit - sum R| / |logit|`` of CP-LRP MambaLRP for the predicted class (of the first 6)."""
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, -1]
    target = int(logits[:6].argmax())
    relevance, delta = MambaLRP(model, composite="conservative").attribute(ids, target=target, return_convergence_delta=True)
    return float(delta.abs().sum() / logits[target].abs())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", required=True, help="trained classifier folders")
    p.add_argument("--data", required=True, help="a TEXT;LABEL file (the first --n texts are explained)")
    p.add_argument("--n", type=int, default=6)
    a = p.parse_args()
    texts = [line.split(";")[0] for line in open(a.data, encoding="utf-8").read().splitlines()[1 : a.n + 1]]
    for folder in a.models:
        model, tokenizer = load_model_and_tokenizer(folder)
        model = model.double().eval()
        for layer in model.modules():  # transformers keeps the residual stream in float32 otherwise
            if hasattr(layer, "residual_in_fp32"):
                layer.residual_in_fp32 = False
        encoded = [torch.tensor([tokenizer(t)["input_ids"]]) for t in texts]
        ratios = conv_bias_ratios(model, encoded[0])
        trained = [relative_gap(model, ids) for ids in encoded]
        zeroed_model = copy.deepcopy(model)
        with torch.no_grad():
            for name, param in zeroed_model.named_parameters():
                if name.endswith("conv1d.bias"):
                    param.zero_()
        zeroed = [relative_gap(zeroed_model, ids) for ids in encoded]
        print(
            f"{folder}: |b| / |w*x| per conv {min(ratios):.2f}-{max(ratios):.2f} (mean {statistics.mean(ratios):.2f}); "
            f"median relative gap (CP-LRP) trained {statistics.median(trained):.4f}, conv biases zeroed "
            f"{statistics.median(zeroed):.2e} ({len(texts)} texts)",
            flush=True,
        )


if __name__ == "__main__":
    main()
