"""Subword pieces merged into words for display (as Inseq does).

A tokenizer cuts a word into pieces and marks where words begin or continue:

- byte-level BPE (GPT-2, GPT-NeoX: Mamba's tokenizer): a piece that starts a word after a
  space begins with ``Ġ`` (and a newline is ``Ċ``); bytes are shown as GPT-2's printable
  characters, which :func:`word_groups` decodes back (``Ã©`` -> ``é``);
- SentencePiece (Llama, T5): a piece that starts a word begins with ``▁``;
- WordPiece (BERT): a piece that *continues* a word begins with ``##``.

A word is what lies between spaces (so ``"world!"`` is one word when the tokenizer glues
the ``!`` to it). Special tokens (``<s>``, ``[CLS]``, ``<|endoftext|>``, ...) stay alone.

The relevance of a word is the **sum** of its pieces' relevance. Summing keeps
conservation: the words' relevance adds up to the same total as the tokens', so it still
equals the explained logit (up to the convergence delta). The merged view is for reading
only; the attribution is per token.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Dict, List, Sequence, Tuple, Union

import torch
from torch import Tensor

SCHEMES = ("auto", "bpe", "sentencepiece", "wordpiece", "none")
_SPECIAL = re.compile(r"^(<[^<>\s]+>|\[[A-Z_]+\]|<\|[^|]+\|>)$")


@lru_cache(maxsize=1)
def _byte_decoder() -> Dict[str, int]:
    """GPT-2's byte -> printable-character table, inverted (character -> byte)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = keep[:]
    n = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(keep, chars)}


def _bpe_bytes(piece: str) -> bytes:
    """A byte-level BPE piece as the bytes it stands for (``Ġ`` -> a space); a piece
    outside GPT-2's table (a special token, a plain word) as its UTF-8 text."""
    table = _byte_decoder()
    if not all(ch in table for ch in piece):
        return piece.encode("utf-8")
    return bytes(table[ch] for ch in piece)


def detect_scheme(tokens: Sequence[str]) -> str:
    """The subword convention of ``tokens``: ``"wordpiece"`` if a piece starts with ``##``,
    ``"sentencepiece"`` if one starts with ``▁``, ``"bpe"`` if one starts with ``Ġ``, else
    ``"none"`` (every token a word).

    >>> detect_scheme(["Ġthe", "Ġun", "believ", "able"])
    'bpe'
    """
    if any(t.startswith("##") and len(t) > 2 for t in tokens):
        return "wordpiece"
    if any(t.startswith("▁") for t in tokens):
        return "sentencepiece"
    if any(t.startswith("Ġ") or t.startswith("Ċ") for t in tokens):
        return "bpe"
    return "none"


def word_groups(tokens: Sequence[str], scheme: str = "auto") -> List[Tuple[str, List[int]]]:
    """The words of a token sequence, each with the indices of its pieces.

    Args:
        tokens: the tokens as the tokenizer names them (``convert_ids_to_tokens``).
        scheme: ``"auto"`` (see :func:`detect_scheme`), ``"bpe"``, ``"sentencepiece"``,
            ``"wordpiece"`` or ``"none"``.

    Returns:
        ``[(word, [token indices]), ...]`` in order; every index appears once.

    Raises:
        ValueError: an unknown ``scheme``.

    >>> word_groups(["Ġthe", "Ġun", "believ", "able", "Ġday"])
    [('the', [0]), ('unbelievable', [1, 2, 3]), ('day', [4])]
    >>> word_groups(["[CLS]", "the", "un", "##believ", "##able", "[SEP]"])
    [('[CLS]', [0]), ('the', [1]), ('unbelievable', [2, 3, 4]), ('[SEP]', [5])]
    """
    if scheme not in SCHEMES:
        raise ValueError(f"unknown subword scheme {scheme!r}; use one of {', '.join(SCHEMES)}")
    tokens = [str(t) for t in tokens]
    if scheme == "auto":
        scheme = detect_scheme(tokens)
    groups: List[Tuple[bytes, List[int]]] = []  # the word's text as UTF-8 bytes (BPE pieces may split a character)
    previous_special = True
    for i, tok in enumerate(tokens):
        special = bool(_SPECIAL.match(tok))
        if scheme == "none" or special:
            starts, text = True, tok.encode("utf-8")
        elif scheme == "wordpiece":
            starts, text = not tok.startswith("##"), (tok[2:] if tok.startswith("##") else tok).encode("utf-8")
        elif scheme == "sentencepiece":
            starts, text = tok.startswith("▁"), tok.lstrip("▁").encode("utf-8")
        else:  # byte-level BPE
            raw = _bpe_bytes(tok)
            starts, text = raw[:1].isspace(), raw.lstrip()
        if starts or previous_special or not groups:
            groups.append((text, [i]))
        else:
            word, index = groups[-1]
            groups[-1] = (word + text, index + [i])
        previous_special = special
    out: List[Tuple[str, List[int]]] = []
    for raw_word, index in groups:
        shown = raw_word.decode("utf-8", errors="replace").strip()
        out.append((shown if shown else tokens[index[0]], index))
    return out


def merge_subwords(
    tokens: Sequence[str], relevance: Union[Tensor, Sequence[float]], scheme: str = "auto"
) -> Tuple[List[str], Tensor]:
    """Words and their relevance (the sum of their pieces', which keeps the total).

    Returns:
        ``(words, relevance)``: ``relevance`` is a float tensor ``[number of words]``.

    Raises:
        ValueError: ``tokens`` and ``relevance`` differ in length, or an unknown ``scheme``.

    >>> words, rel = merge_subwords(["▁the", "▁un", "believ", "able"], [0.5, 1.0, 2.0, -0.5])
    >>> words, rel.tolist()
    (['the', 'unbelievable'], [0.5, 2.5])
    """
    values = torch.as_tensor(relevance).detach().float().cpu().reshape(-1)
    if len(values) != len(tokens):
        raise ValueError(f"{len(tokens)} tokens but {len(values)} relevance values; give one value per token")
    groups = word_groups(tokens, scheme)
    merged = torch.stack([values[index].sum() for _, index in groups]) if groups else values[:0]
    return [w for w, _ in groups], merged


__all__ = ["SCHEMES", "detect_scheme", "merge_subwords", "word_groups"]
