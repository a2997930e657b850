#!/usr/bin/env python3
"""Store a trained classifier as the package's embedded default (float16 weights).

python scripts/pack_default_model.py /tmp/default captum_mambalrp/default_model
"""

from __future__ import annotations

import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from captum_mambalrp.models.classifier import MambaForLastTokenClassification  # noqa: E402


def main(src: str, dst: str) -> None:
    from transformers import AutoTokenizer

    model = MambaForLastTokenClassification.from_pretrained(src).eval()
    tokenizer = AutoTokenizer.from_pretrained(src)
    os.makedirs(dst, exist_ok=True)
    model.half().save_pretrained(dst)
    tokenizer.save_pretrained(dst)
    metrics = json.load(open(os.path.join(src, "metrics.json")))
    metrics["weights_dtype"] = "float16"
    with open(os.path.join(dst, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2)
    reloaded = MambaForLastTokenClassification.from_pretrained(dst, dtype=torch.float32)
    print("packed", sum(p.numel() for p in reloaded.parameters()), "parameters into", dst)


if __name__ == "__main__":
    main(*sys.argv[1:3])
