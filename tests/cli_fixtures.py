"""Tiny checkpoints on disk for the command-line and data tests (save_pretrained, no hub)."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Dict, Optional, Sequence

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXTS = ["i feel happy today", "i feel sad and alone", "what a scary night", "so happy and loved", "this is great", "bad"]


def save_tiny_classifier(path: str, labels: Optional[Sequence[str]] = ("sadness", "joy", "fear"), n_classes: int = 3) -> str:
    """A 2-layer MambaForLastTokenClassification and its word tokenizer in ``path``;
    ``labels=None`` saves transformers' placeholder names (no class names)."""
    from transformers import MambaConfig

    from captum_mambalrp.models import MambaForLastTokenClassification
    from captum_mambalrp.models.tokenizer import build_word_tokenizer

    tokenizer = build_word_tokenizer(TEXTS, min_freq=1)
    names: Dict = {}
    if labels is not None:
        n_classes = len(labels)
        names = dict(id2label=dict(enumerate(labels)), label2id={n: i for i, n in enumerate(labels)})
    config = MambaConfig(
        vocab_size=len(tokenizer), hidden_size=16, state_size=4, num_hidden_layers=2, num_labels=n_classes, **names
    )
    torch.manual_seed(0)
    MambaForLastTokenClassification(config).eval().save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def run_cli(*args: str, env: Optional[Dict[str, str]] = None, cwd: Optional[str] = None) -> subprocess.CompletedProcess:
    """``python -m captum_mambalrp ARGS`` in a fresh process (the package from this checkout)."""
    full_env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "captum_mambalrp", *args], capture_output=True, text=True, env=full_env, cwd=cwd, timeout=300
    )
