"""Bias discovery (``captum-mambalrp bias``, :mod:`captum_mambalrp.evaluation.bias`).

- the statistics against direct computations: permutation p-values against a loop over the
  same permutations, Benjamini-Hochberg against hand-computed values, the per-class tables
  against sums written out, word merging keeping the total, the group swap on texts;
- the acceptance check on the embedded Emotion model: in a synthetic data set where a marker
  word decides the label, each marker ranks first for its class with p < 0.01, and swapping
  two markers flips the predictions;
- every architecture family (Mamba, FalconMamba, Mamba2, a hybrid): the words' relevance adds
  up to the explained logit (conservation through the merge), and a rerun resumes.
"""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import LastTokenClassifier, make_config, zero_biases

from captum_mambalrp.evaluation import bias as B


# ---------------------------------------------------------------- statistics, no model
def test_permutation_pvalues_equal_a_loop_over_the_same_permutations():
    rng = np.random.default_rng(3)
    n_examples, n_units, n_classes, K = 30, 5, 3, 200
    classes = rng.integers(0, n_classes, n_examples)
    present = rng.random((n_units, n_examples)) < 0.5
    present[2, classes == 1] = True
    values = rng.normal(size=(n_units, n_examples)) + (classes[None] == 1) * 5.0 * (np.arange(n_units)[:, None] == 2)
    u, e = np.nonzero(present)
    pairs = B.Pairs(u, e, values[u, e], np.ones(len(u), dtype=np.int64))
    tested = np.ones((n_units, n_classes), dtype=bool)
    tested[0, 0] = False
    p = B.permutation_pvalues(pairs, classes, n_units, n_classes, tested, K, seed=7, chunk=13)

    R = np.where(present, values, 0.0)  # R_w(e), 0 where absent
    observed = np.stack([R[:, classes == c].sum(1) for c in range(n_classes)], 1)
    exceed = np.zeros((n_units, n_classes))
    loop_rng = np.random.default_rng(7)
    for _ in range(K):
        perm = loop_rng.permutation(classes)
        exceed += np.stack([R[:, perm == c].sum(1) for c in range(n_classes)], 1) >= observed - 1e-9
    expected = (1 + exceed) / (1 + K)
    assert np.isnan(p[0, 0])
    np.testing.assert_allclose(p[tested], expected[tested])
    assert p[2, 1] <= 2 / (1 + K)  # the planted unit-class pair


def test_benjamini_hochberg_against_hand_computed_values():
    # sorted 0.005, 0.01, 0.03, 0.04 -> 0.02, 0.02, 0.04, 0.04 after the running minimum
    np.testing.assert_allclose(B.benjamini_hochberg([0.01, 0.04, 0.03, 0.005]), [0.02, 0.04, 0.04, 0.02])
    assert B.benjamini_hochberg([]).shape == (0,)


def test_unit_statistics_equal_direct_sums():
    records = [
        {"units": ["a", "b", "a"], "relevance": [1.0, 2.0, 0.5], "class": 0},
        {"units": ["a", "c"], "relevance": [-1.0, 4.0], "class": 0},
        {"units": ["b"], "relevance": [3.0], "class": 1},
        {"units": ["x", "y"], "relevance": [0.0, 0.0], "class": 1},
    ]
    cfg = B.BiasConfig(min_freq=1, n_permutations=50, top=5)
    report = B.aggregate(records, ["zero", "one"], [B.parse_group("g:a,c")], cfg)
    top0 = {r["unit"]: r for r in report["classes"]["zero"]["top"]}
    # a: example 0 gives 1.0 + 0.5 (two occurrences), example 1 gives -1.0
    assert top0["a"]["mean"] == pytest.approx((1.5 - 1.0) / 2)
    assert (top0["a"]["examples"], top0["a"]["occurrences"]) == (2, 3)
    assert top0["a"]["contribution"] == pytest.approx(0.5 / 2)
    assert top0["a"]["se"] == pytest.approx(np.std([1.5, -1.0], ddof=1) / np.sqrt(2))
    assert [r["unit"] for r in report["classes"]["zero"]["top"]] == ["c", "b", "a"]
    assert [r["unit"] for r in report["classes"]["zero"]["against"]] == []
    group = report["groups"]["g"]["classes"]["zero"]
    assert group["mean"] == pytest.approx((1.5 + 3.0) / 2) and group["examples"] == 2
    assert report["groups"]["g"]["classes"]["one"]["examples"] == 0
    assert report["tests"]["n_tests"] == len(report["rows"]) == 6  # zero: a, b, c; one: b, x, y


def test_special_tokens_are_left_out_and_no_unit_against_says_none():
    """``[UNK]`` is a marker of the tokenizer, not a word of the texts: not ranked; a class whose
    least relevant unit is not negative (to the 3 digits shown) reads "none", not ``-0.000``."""
    records = [
        {"units": ["[UNK]", "a", "b"], "relevance": [5.0, 1.0, -0.0001], "class": 0},
        {"units": ["[UNK]", "a", "b"], "relevance": [4.0, 2.0, -0.0002], "class": 0},
    ]
    cfg = B.BiasConfig(min_freq=1, n_permutations=10, top=5)
    report = B.aggregate(records, ["zero"], [], cfg, exclude=B.special_units(SimpleNamespace(all_special_tokens=["[UNK]"])))
    assert [r["unit"] for r in report["classes"]["zero"]["top"]] == ["a", "b"] and report["excluded_units"] == ["[UNK]"]
    assert [r["unit"] for r in report["classes"]["zero"]["against"]] == ["b"]  # -0.00015: negative, but -0.000 shown
    text = B.report_markdown({**report, "n_examples": 2})
    against = [line for line in text.splitlines() if line.startswith("Most against it")]
    assert against == ["Most against it: none (no word in 1 or more of its examples has a mean relevance below -0.0005)."]
    assert "- left out: the tokenizer's special tokens `[UNK]`" in text
    records[0]["relevance"][2] = records[1]["relevance"][2] = -0.25
    text = B.report_markdown({**B.aggregate(records, ["zero"], [], cfg), "n_examples": 2})
    assert "Most against it: `b` -0.250 (2)." in text


def test_bias_study_leaves_out_the_tokenizers_special_tokens():
    """On the embedded Emotion model: words it does not know are ``[UNK]``, which the tables skip."""
    from captum_mambalrp.models import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(None)
    texts = [f"i feel zzqx{k} and wwkq{k} today" for k in range(6)]
    cfg = B.BiasConfig(min_freq=2, n_permutations=20, counterfactual=False, batch_size=8)
    study = B.BiasStudy(model, tokenizer, texts, None, cfg)
    report = study.run(progress=False, figures=False)
    assert any("[UNK]" in r["units"] for r in study._memory)  # the texts do have unknown words
    assert set(tokenizer.all_special_tokens) <= set(report["excluded_units"])
    assert not {r["unit"] for r in report["rows"]} & set(tokenizer.all_special_tokens)
    assert "feel" in {r["unit"] for r in report["rows"]}


def test_words_keep_the_total_and_units_are_normalised():
    tokens = ["Ġthe", "ĠHap", "py", "!", "Ġday"]
    rel = [0.5, 1.0, 2.0, 0.25, -0.5]
    units, values = B.unit_relevance(tokens, rel, "word")
    assert units == ["the", "happy", "day"]
    assert values == pytest.approx([0.5, 3.25, -0.5]) and sum(values) == pytest.approx(sum(rel))
    units, values = B.unit_relevance(tokens, rel, "token")
    assert units == ["the", "hap", "py", "!", "day"] and values == rel
    with pytest.raises(ValueError, match="unit"):
        B.unit_relevance(tokens, rel, "sentence")


def test_group_swap_on_texts():
    mapping = B.swap_map(B.parse_group("he,his,him,himself"), B.parse_group("she,her,her,herself"))
    assert mapping["her"] == "his" and mapping["him"] == "her"
    text, n = B.swap_words("He told her that HIS sister (himself?) was there. Hershey!", mapping)
    assert text == "She told his that HER sister (herself?) was there. Hershey!" and n == 4
    with pytest.raises(ValueError, match="aligned"):
        B.swap_map(B.parse_group("he,him"), B.parse_group("she"))
    with pytest.raises(ValueError, match="no words"):
        B.parse_group("name: , ")


# ---------------------------------------------------------------- the embedded Emotion model
PREFIXES = ["today at work i was", "after the long meeting we were", "on the train home he was", "in the morning she was"]
SUFFIXES = ["and then we went home", "so i called my mother", "while it was raining outside", "before dinner", "at the station"]
MARKERS = {"joy": "energetic", "sadness": "lonely", "fear": "afraid"}


def synthetic_emotion(path: str) -> None:
    """A TEXT;LABEL file where the marker word decides the label (20 texts per class)."""
    with open(path, "w", encoding="utf-8") as f:
        f.write("text;label_name\n")
        for label, marker in MARKERS.items():
            for p in PREFIXES:
                for s in SUFFIXES:
                    f.write(f"{p} {marker} {s};{label}\n")


def test_bias_command_finds_planted_markers_and_the_swap_flips(tmp_path, capsys):
    from captum_mambalrp.cli import main

    data, out = str(tmp_path / "synthetic.txt"), str(tmp_path / "bias")
    synthetic_emotion(data)
    args = ["bias", "--data", data, "--out", out, "--min-freq", "5", "--permutations", "1000", "--no-progress"]
    assert main(args + ["--groups", "joy:energetic", "sad:lonely"]) == 0
    assert "results in" in capsys.readouterr().out
    with open(os.path.join(out, "bias.json"), encoding="utf-8") as f:
        report = json.load(f)
    assert report["n_examples"] == 60 and report["accuracy_on_examples"] > 0.8
    for label, marker in MARKERS.items():
        first = report["classes"][label]["top"][0]
        assert first["unit"] == marker, (label, report["classes"][label]["top"][:3])
        assert first["p"] < 0.01 and first["q"] < 0.05
    cf = report["counterfactual"]["summary"]
    assert cf["joy -> sad"]["n"] == 20 and cf["sad -> joy"]["n"] == 20
    assert cf["joy -> sad"]["flipped"][0] >= 0.8 and cf["sad -> joy"]["flipped"][0] >= 0.8
    assert cf["joy -> sad"]["delta_logit"][0] < -1.0  # the joy logit falls when "energetic" becomes "lonely"
    assert report["counterfactual"]["transitions"].get("joy -> sadness", 0) >= 16
    for name in ("bias.md", "units.csv", "groups.csv", "counterfactual.csv", "top_units.png", "records.jsonl"):
        assert os.path.getsize(os.path.join(out, name)) > 0
    # explaining the gold label instead is another study: refused in the same folder
    with pytest.raises(SystemExit) as err:
        main(args + ["--explain", "label"])
    assert err.value.code == 2
    assert "other settings" in capsys.readouterr().err


# ---------------------------------------------------------------- every architecture
WORDS = "alpha beta gamma delta eps zeta eta theta iota kappa lam mu".split()


def tiny_texts(n: int = 24, seed: int = 0):
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(3, 9)))) for _ in range(n)]


def tiny_model(arch: str):
    from transformers import Mamba2Config, Mamba2Model, MambaModel

    torch.manual_seed(0)
    if arch == "mamba2":
        backbone = Mamba2Model(
            Mamba2Config(vocab_size=64, hidden_size=16, state_size=4, num_hidden_layers=2, num_heads=4, head_dim=8, n_groups=1)
        )
    elif arch == "falcon":
        from transformers import FalconMambaModel

        backbone = FalconMambaModel(make_config("falcon"))
    elif arch == "bamba":
        from test_hybrids import build

        return build("bamba")
    else:
        backbone = MambaModel(make_config("mamba"))
    return zero_biases(LastTokenClassifier(backbone, n_classes=3).eval())


@pytest.mark.parametrize("arch", ["mamba", "falcon", "mamba2", "bamba"])
def test_every_architecture_conserves_through_the_words_and_resumes(arch, tmp_path):
    from captum_mambalrp.models.tokenizer import build_word_tokenizer

    texts = tiny_texts()
    tokenizer = build_word_tokenizer(texts, min_freq=1)
    model = tiny_model(arch)
    labels = [i % 3 for i in range(len(texts))]
    cfg = B.BiasConfig(groups=["alpha,beta", "gamma,delta"], min_freq=2, n_permutations=100, batch_size=8)
    out = str(tmp_path / arch)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    forwards = {n: m.forward for n, m in model.named_modules()}
    report = B.BiasStudy(model, tokenizer, texts, labels, cfg, out, class_names=None).run(progress=False, figures=False)
    # the user's model is left as it was: weights, forward methods, mode
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
    assert {n: m.forward for n, m in model.named_modules()} == forwards and not model.training
    records = B.JsonLines(os.path.join(out, "records.jsonl")).read()
    assert sorted(r["index"] for r in records) == list(range(len(texts)))
    for r in records:  # sum of the words' relevance + delta = the explained logit
        assert sum(r["relevance"]) + r["delta"] == pytest.approx(r["explained"], rel=1e-4, abs=1e-4)
        assert r["class"] == r["pred"]
    if arch != "bamba":  # no relevance absorbed by biases: conservation itself
        assert max(abs(r["delta"]) for r in records) <= 1e-4 * max(1.0, max(abs(r["explained"]) for r in records))
    assert report["counterfactual"]["summary"]["all"]["n"] == sum(
        any(w in ("alpha", "beta", "gamma", "delta") for w in t.split()) for t in texts
    )
    before = os.path.getsize(os.path.join(out, "records.jsonl"))
    again = B.BiasStudy(model, tokenizer, texts, labels, cfg, out).run(progress=False, figures=False)
    assert os.path.getsize(os.path.join(out, "records.jsonl")) == before  # resumed: nothing explained twice
    assert again["classes"] == report["classes"]


def test_bias_command_user_errors_are_one_line(tmp_path, capsys):
    from captum_mambalrp.cli import main

    data = str(tmp_path / "synthetic.txt")
    synthetic_emotion(data)
    for extra, message in [
        (["--groups", "he,him", "she"], "cannot be swapped"),
        (["--permutations", "0"], "n_permutations must be at least 1"),
    ]:
        with pytest.raises(SystemExit) as err:
            main(["bias", "--data", data, "--out", str(tmp_path / "out"), *extra])
        assert err.value.code == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("captum-mambalrp: error:") and message in lines[0]


def test_every_recompute_mode_on_the_command_line():
    """``bias`` and ``longrange`` take every memory mode of the API by name (``on``/``off`` as
    True/False), and refuse others."""
    from captum_mambalrp.cli import build_parser
    from captum_mambalrp.cli.bias import recompute_value

    parser = build_parser()
    for command in ("bias", "longrange"):
        modes = (("on", True), ("off", False), ("auto", "auto"), ("projection", "projection"), ("sequence", "sequence"))
        for text, value in modes:
            args = parser.parse_args([command, "--recompute", text, "--out", "x"])
            assert recompute_value(args.recompute) == value
        with pytest.raises(SystemExit):
            parser.parse_args([command, "--recompute", "sometimes", "--out", "x"])
