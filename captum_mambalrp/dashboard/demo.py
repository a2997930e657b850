"""A tiny random Mamba text classifier saved as a checkpoint: for tests, screenshots and
trying the dashboard or Insights without a trained model (its predictions mean nothing)."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    from .explain import Explainer

DEMO_TEXTS = [
    "i feel so happy and loved today",
    "i am scared of the dark and feel so alone",
    "i feel angry and annoyed about this news",
    "i was surprised by the gift from my friend",
    "i feel sad and lonely tonight",
    "what a scary night",
    "so happy and loved",
]
DEMO_LABELS = ["sadness", "joy", "love", "anger", "fear", "surprise"]


def make_demo_checkpoint(
    path: str, seed: int = 0, hidden_size: int = 16, layers: int = 2, texts: Sequence[str] = DEMO_TEXTS
) -> str:
    """Write a random bias-free ``MambaForLastTokenClassification`` and a word tokenizer
    over ``texts`` to ``path`` (loadable with ``load_model_and_tokenizer(path)``)."""
    import torch
    from transformers import MambaConfig

    from ..models import MambaForLastTokenClassification
    from ..models.tokenizer import build_word_tokenizer

    tokenizer = build_word_tokenizer(texts, min_freq=1)
    labels = dict(enumerate(DEMO_LABELS))
    config = MambaConfig(  # type: ignore[call-arg]
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        state_size=4,
        num_hidden_layers=layers,
        num_labels=len(labels),
        id2label=labels,
        label2id={v: k for k, v in labels.items()},
        use_bias=False,
        use_conv_bias=False,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = MambaForLastTokenClassification(config).eval()
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def demo_explainer(path: str, **explainer_options) -> Explainer:
    """A dashboard :class:`~captum_mambalrp.dashboard.Explainer` of a fresh demo checkpoint at ``path``."""
    from ..models import load_model_and_tokenizer
    from .explain import Explainer

    model, tokenizer = load_model_and_tokenizer(make_demo_checkpoint(path))
    return Explainer(model, tokenizer, source="demo (random tiny classifier)", **explainer_options)
