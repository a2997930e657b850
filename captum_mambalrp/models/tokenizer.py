"""A word-level transformers tokenizer for lower-cased, punctuation-free text (Emotion)."""

from __future__ import annotations

from collections import Counter
from typing import Iterable

SPECIALS = ["[PAD]", "[UNK]"]


def build_word_tokenizer(texts: Iterable[str], min_freq: int = 2):
    """A ``PreTrainedTokenizerFast`` over the words seen ``min_freq`` times or more.

    Saved with ``save_pretrained`` it reloads with ``AutoTokenizer.from_pretrained``.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    counts = Counter(w for t in texts for w in t.split())
    words = sorted(w for w, c in counts.items() if c >= min_freq)
    vocab = {tok: i for i, tok in enumerate(SPECIALS + words)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="[PAD]", unk_token="[UNK]", padding_side="right")
