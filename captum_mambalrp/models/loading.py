"""Loading a model and its tokenizer: the embedded default, a local folder or a hub id."""

from __future__ import annotations

import os
from typing import Optional, Tuple

from torch import nn

DEFAULT_MODEL_DIR = os.path.join(os.path.dirname(os.path.dirname(__file__)), "default_model")


def load_model_and_tokenizer(path_or_id: Optional[str] = None, device: str = "cpu", dtype=None) -> Tuple[nn.Module, object]:
    """``from_pretrained`` of a transformers checkpoint (folder or hub id) and its tokenizer.

    ``None`` loads the embedded default (a small Emotion classifier shipped with the
    package, float16 weights computed in float32). Checkpoints saved from :class:`MambaForLastTokenClassification` load as
    that class; anything else as ``AutoModelForCausalLM``.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from .classifier import MambaForLastTokenClassification

    source = path_or_id or DEFAULT_MODEL_DIR
    if path_or_id is None and dtype is None:
        dtype = torch.float32  # the embedded weights are stored in float16 to keep the package small
    config = AutoConfig.from_pretrained(source)
    kwargs = {} if dtype is None else {"dtype": dtype}
    if MambaForLastTokenClassification.__name__ in (getattr(config, "architectures", None) or []):
        model = MambaForLastTokenClassification.from_pretrained(source, **kwargs)
    else:
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(source)
    return model.to(device).eval(), tokenizer
