"""Subword pieces merged into words for display, with tokenizers of each convention trained
here with the ``tokenizers`` library (byte-level BPE as GPT-2/GPT-NeoX, SentencePiece's ``▁``,
WordPiece's ``##``): words as the text has them, the relevance of a word the sum of its pieces."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from captum_mambalrp.visualization import merge_subwords, terminal_heatmap, text_records, word_groups
from captum_mambalrp.visualization.words import detect_scheme

CORPUS = ["the unbelievable café day, hello world!", "unbelievably happy people", "happiness is unbelievable"] * 5
TEXT = "the unbelievable café day"


def trained(kind: str) -> Tokenizer:
    if kind == "bpe":  # GPT-2 / GPT-NeoX (Mamba's tokenizer): byte-level BPE, Ġ starts a word
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    elif kind == "sentencepiece":  # ▁ starts a word
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        trainer = trainers.BpeTrainer(vocab_size=60, special_tokens=["<unk>", "<s>", "</s>"])
    else:  # WordPiece: ## continues a word
        tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        trainer = trainers.WordPieceTrainer(vocab_size=60, special_tokens=["[UNK]", "[CLS]", "[SEP]"])
    tok.train_from_iterator(CORPUS, trainer)
    return tok


@pytest.mark.parametrize("kind", ["bpe", "sentencepiece", "wordpiece"])
def test_real_tokenizers_merge_into_the_texts_words(kind):
    tokens = trained(kind).encode(TEXT).tokens
    assert len(tokens) > 4  # some words are cut into pieces
    assert detect_scheme(tokens) == kind
    groups = word_groups(tokens)
    assert [w for w, _ in groups] == TEXT.split()  # "café" too: BPE's bytes are decoded across pieces
    assert sorted(i for _, index in groups for i in index) == list(range(len(tokens)))  # each piece once, in order
    relevance = torch.randn(len(tokens), generator=torch.Generator().manual_seed(0))
    words, merged = merge_subwords(tokens, relevance)
    expected = torch.stack([relevance[index].sum() for _, index in groups])
    assert words == TEXT.split() and torch.allclose(merged, expected)
    assert float(merged.sum()) == pytest.approx(float(relevance.sum()), abs=1e-5)  # the sum is conservative


def test_token_lists_of_each_convention():
    assert word_groups(["Ġthe", "Ġun", "believ", "able", "!", "Ġday"]) == [
        ("the", [0]),
        ("unbelievable!", [1, 2, 3, 4]),  # a word is what lies between spaces
        ("day", [5]),
    ]
    assert word_groups(["<|endoftext|>", "Hello", "Ġwor", "ld"]) == [("<|endoftext|>", [0]), ("Hello", [1]), ("world", [2, 3])]
    assert word_groups(["<s>", "▁un", "believ", "able", "▁day", "</s>"]) == [
        ("<s>", [0]),
        ("unbelievable", [1, 2, 3]),
        ("day", [4]),
        ("</s>", [5]),
    ]
    assert word_groups(["[CLS]", "un", "##believ", "##able", "day", "[SEP]"]) == [
        ("[CLS]", [0]),
        ("unbelievable", [1, 2, 3]),
        ("day", [4]),
        ("[SEP]", [5]),
    ]
    assert word_groups(["i", "feel", "happy"]) == [("i", [0]), ("feel", [1]), ("happy", [2])]  # word-level: as is
    assert word_groups(["Ġthe", "Ġday"], scheme="none") == [("Ġthe", [0]), ("Ġday", [1])]
    with pytest.raises(ValueError, match="unknown subword scheme 'bytes'"):
        word_groups(["a"], scheme="bytes")
    with pytest.raises(ValueError, match="3 tokens but 2 relevance values"):
        merge_subwords(["a", "b", "c"], [1.0, 2.0])


def test_visualisers_merge_on_request():
    tokens, relevance = ["Ġun", "believ", "able", "Ġday"], torch.tensor([1.0, 1.0, 2.0, -2.0])
    assert terminal_heatmap(tokens, relevance, color=False, words=True) == "unbelievable(+1.00) day(-0.50)"
    assert terminal_heatmap(tokens, relevance, color=False).startswith("Ġun(+0.50) believ(+0.50)")
    (rec,) = text_records(relevance[None], [tokens], words=True)
    assert rec.raw_input_ids == ["unbelievable", "day"] and rec.word_attributions.tolist() == [1.0, -0.5]
    assert rec.attr_score == pytest.approx(2.0)  # the summed relevance, the same with or without merging
