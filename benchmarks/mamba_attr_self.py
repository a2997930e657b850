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
    a = p.parse_args()
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


if __name__ == "__main__":
    main()
