#!/usr/bin/env python3
"""Mamba-Attr's own entry for the explained token: its share of the relevance, and the flipping
score with and without it (MambaLRP beside them).

Ali et al.'s Vim code drops the class token's entry of the rolled-out map (an image's class token
is no patch); on text the explained token is the last real word, and the package keeps its entry
(docs/evaluation.md). This script measures what that choice does: ΔA^F (a removed token becomes
the tokenizer's unknown token, 10 % per step) of ``mamba_attr`` as it is and with the explained
token's relevance set to 0, paired over the same test examples::

    # an 8-layer Mamba1 classifier trained on the CPU (about 27 minutes on 2 cores)
    python scripts/train_classifier.py --data DIR --out runs/ma/m1 --arch mamba --layers 8 --hidden 128 --state 16 \\
        --max-steps 800 --batch 64 --lr 1e-3 --every-position --device cpu --eval-every 200
    python benchmarks/mamba_attr_self.py --model runs/ma/m1 --data DIR --n 256

``--parts`` instead takes Mamba-Attr apart, to see which of its pieces orders the tokens against
the model: each layer's map is the hidden attention ``A_l = mean_d alpha^+ / max`` times the
column weights ``g_l`` (the positive gradient at the block's input, min-max normalised); the
variants are its rollout as it is, the rollout of ``A_l`` alone, the last layer's map alone,
``g`` alone at the first rolled-out block and at the embeddings, and a recency ordering (later
tokens first), each scored by ΔA^F beside MambaLRP::

    python benchmarks/mamba_attr_self.py --model runs/ma/m1 --data DIR --n 256 --parts
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Dict, List

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from captum_mambalrp.evaluation.data import load_split  # noqa: E402
from captum_mambalrp.evaluation.methods import build_method  # noqa: E402
from captum_mambalrp.evaluation.perturbation import (  # noqa: E402
    CURVES,
    Perturbation,
    flipping_scores,
    neutral_token_id,
    perturbation_curves,
)
from captum_mambalrp.evaluation.scores import LastTokenScores  # noqa: E402
from captum_mambalrp.models import load_model_and_tokenizer  # noqa: E402


def mean_se(values: List[float]) -> str:
    t = torch.tensor(values, dtype=torch.float64)
    return f"{t.mean():.3f} ± {t.std() / len(t) ** 0.5:.3f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a classifier folder (scripts/train_classifier.py)")
    p.add_argument("--data", required=True, help="the Emotion folder (test split)")
    p.add_argument("--n", type=int, default=256, help="the first N test examples")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--parts", action="store_true", help="score Mamba-Attr's pieces (see above)")
    a = p.parse_args()
    if a.parts:
        parts(a)
        return
    model, tok = load_model_and_tokenizer(a.model)
    model.eval()
    texts = load_split(a.data, "test")[0][: a.n]
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # less padding per batch
    config = Perturbation(0.1, "token", neutral_token_id(tok))
    methods = {name: build_method(name, model) for name in ("mambalrp", "mamba_attr")}
    scores: Dict[str, List[float]] = {"mambalrp": [], "mamba_attr": [], "mamba_attr without its own entry": []}
    share: List[float] = []
    for start in range(0, len(order), a.batch):
        enc = tok([texts[i] for i in order[start : start + a.batch]], return_tensors="pt", padding=True)
        ids, mask = enc["input_ids"], enc["attention_mask"]
        with torch.no_grad():
            target = LastTokenScores(model)(ids, mask).argmax(-1)
        rows, last = torch.arange(len(ids)), mask.sum(1) - 1  # right padding: the explained position
        for name, method in methods.items():
            relevance = method.attribute(ids, target, mask).detach()
            variants = {name: relevance}
            if name == "mamba_attr":
                share += (relevance[rows, last].abs() / (relevance.abs() * mask).sum(1)).tolist()
                without = relevance.clone()
                without[rows, last] = 0
                variants["mamba_attr without its own entry"] = without
            for key, r in variants.items():
                curves = perturbation_curves(model, ids, mask, r, target, config, CURVES, torch.Generator().manual_seed(start))
                scores[key] += flipping_scores(curves, config)["dAF"].tolist()
    print(f"{len(share)} test examples; ΔA^F (mean ± SE):")
    for key, values in scores.items():
        print(f"  {key}: {mean_se(values)}")
    diff = (torch.tensor(scores["mamba_attr without its own entry"]) - torch.tensor(scores["mamba_attr"])).tolist()
    print(f"  without minus with the own entry, paired: {mean_se(diff)}")
    print(f"mamba_attr's share of |relevance| on the explained token: {mean_se(share)}")


def part_relevances(
    model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, target: torch.Tensor
) -> Dict[str, torch.Tensor]:
    """Mamba-Attr and its pieces for one batch, each the explained position's relevance ``[b, l]``."""
    from captum_mambalrp.evaluation import hidden_attention as ha

    records, _ = ha.scan_records(model, ids, mask, target, with_gradient=True)
    real = mask.bool()
    pair = (real[:, :, None] & real[:, None, :]).float()
    rows, last = torch.arange(len(ids)), mask.sum(1) - 1
    start = ha.mamba_attr_start(len(records))
    attention = [ha.mamba_attr_attention(r) * pair for r in records]
    weights = [ha.mamba_attr_weights(r, real) for r in records]
    full = [a * w[:, None, :] for a, w in zip(attention, weights)]  # ha.mamba_attr_map, per layer
    rollout = ha.rollout
    positions = torch.arange(ids.shape[1], dtype=torch.float32)[None, :].expand(len(ids), -1)
    return {
        "Mamba-Attr (rollout of A_l g_l, layers start..L-1)": rollout(full[start:], rescale=False)[rows, last],
        "rollout of A_l g_l from layer 0": rollout(full, rescale=False)[rows, last],
        "rollout of A_l alone (no gradient weights)": rollout(attention[start:], rescale=False)[rows, last],
        "last layer's A_l g_l alone (no rollout)": full[-1][rows, last],
        "last layer's A_l alone": attention[-1][rows, last],
        "g alone, at the first rolled-out block": weights[start],
        "g alone, at the embeddings (block 0's input)": weights[0],
        "recency (later tokens first)": positions * mask,
    }


def parts(a: argparse.Namespace) -> None:
    model, tok = load_model_and_tokenizer(a.model)
    model.eval()
    texts = load_split(a.data, "test")[0][: a.n]
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    config = Perturbation(0.1, "token", neutral_token_id(tok))
    lrp = build_method("mambalrp", model)
    scores: Dict[str, List[float]] = {"MambaLRP": []}
    for start in range(0, len(order), a.batch):
        enc = tok([texts[i] for i in order[start : start + a.batch]], return_tensors="pt", padding=True)
        ids, mask = enc["input_ids"], enc["attention_mask"]
        with torch.no_grad():
            target = LastTokenScores(model)(ids, mask).argmax(-1)
        variants = {"MambaLRP": lrp.attribute(ids, target, mask).detach(), **part_relevances(model, ids, mask, target)}
        for key, r in variants.items():
            seed = torch.Generator().manual_seed(start)
            curves = perturbation_curves(model, ids, mask, r.detach(), target, config, CURVES, seed)
            scores.setdefault(key, []).extend(flipping_scores(curves, config)["dAF"].tolist())
    print(f"{len(scores['MambaLRP'])} test examples; ΔA^F (mean ± SE):")
    for key, values in scores.items():
        print(f"  {key}: {mean_se(values)}")


if __name__ == "__main__":
    main()
