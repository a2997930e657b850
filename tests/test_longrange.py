"""Long-range test (``captum-mambalrp longrange``, :mod:`captum_mambalrp.evaluation.longrange`).

- placement: the needle sits exactly ``distance`` tokens before the end, filler around it;
- on tiny models (Mamba and a hybrid): the table has one row per length and distance with
  every needle, the needle's share recomputed independently from a direct MambaLRP call on
  the same input, conservation, resuming, and the files of the command.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from captum_mambalrp import MambaLRP
from captum_mambalrp.evaluation import longrange as LR

NAMES = ["sadness", "joy", "love"]
WORDS = "alpha beta gamma delta eps zeta eta theta iota kappa lam mu".split()


def test_needle_placement():
    needle, hay = [90, 91, 92], list(range(20))
    for length, d in [(10, 0), (10, 3), (10, 7), (3, 0)]:
        ids, start = LR.place_needle(needle, hay, length, d)
        assert len(ids) == length and ids[start : start + 3] == needle
        assert length - 1 - (start + 2) == d  # the needle's last token is d tokens before the end
        assert ids[:start] + ids[start + 3 :] == hay[: length - 3]  # the filler, in order, around it
    with pytest.raises(ValueError, match="does not fit"):
        LR.place_needle(needle, hay, 10, 8)
    assert LR.default_distances(0, 8) == [0]
    cfg = LR.LongRangeConfig(lengths=[64], distances=[0, 10, 60, 61])
    assert cfg.distances_for(64, 4) == [0, 10, 60] and cfg.distances_for(3, 4) == []
    with pytest.raises(ValueError, match="filler"):
        LR.LongRangeConfig(filler="noise").check()


def tiny_data(n: int = 40, seed: int = 0):
    rng = np.random.default_rng(seed)
    texts = [" ".join(rng.choice(WORDS, size=int(rng.integers(3, 7)))) for _ in range(n)]
    return texts, [i % 3 for i in range(n)]


def tiny_classifier(tmp_path, arch: str = "mamba"):
    """A saved MambaForLastTokenClassification (so the command loads it as a user's folder)."""
    from transformers import MambaConfig

    from captum_mambalrp.models import MambaForLastTokenClassification
    from captum_mambalrp.models.tokenizer import build_word_tokenizer

    texts, labels = tiny_data()
    tokenizer = build_word_tokenizer(texts, min_freq=1)
    torch.manual_seed(0)
    config = MambaConfig(
        vocab_size=len(tokenizer),
        hidden_size=16,
        state_size=4,
        num_hidden_layers=2,
        expand=2,
        time_step_rank=4,
        id2label=dict(enumerate(NAMES)),
    )
    model = MambaForLastTokenClassification(config).eval()
    folder = str(tmp_path / "model")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model, tokenizer, folder


def check_rows(study: LR.LongRangeStudy, rows, lrp: MambaLRP, n_check: int = 3):
    """Shares recomputed from a direct MambaLRP call on the same input; conservation."""
    for r in rows[:n_check]:
        needle = {"index": r["needle"], "class": r["class"], "tokens": r["needle_tokens"]}
        ids, start = LR.place_needle(
            study.token_ids(r["needle"]), study.haystack(needle, r["length"]), r["length"], r["distance"]
        )
        assert start == r["start"]
        rel, delta = lrp.attribute(torch.tensor([ids]), target=r["class"], return_convergence_delta=True)
        rel = rel[0].double()
        on = rel[start : start + r["needle_tokens"]]
        assert r["abs_share"] == pytest.approx(float(on.abs().sum() / rel.abs().sum()), rel=1e-5)
        assert r["signed_share"] == pytest.approx(float(on.sum() / rel.abs().sum()), rel=1e-5, abs=1e-7)
        assert float(rel.sum()) + r["delta"] == pytest.approx(r["explained"], rel=1e-4, abs=1e-5)
    for r in rows:
        assert 0 <= r["abs_share"] <= 1 and abs(r["signed_share"]) <= r["abs_share"] + 1e-12
        assert r["uniform"] == pytest.approx(r["needle_tokens"] / r["length"])


def test_longrange_command_shapes_files_and_shares(tmp_path, capsys):
    from captum_mambalrp.cli import main

    model, tokenizer, folder = tiny_classifier(tmp_path)
    texts, labels = tiny_data()
    data = str(tmp_path / "data.txt")
    with open(data, "w", encoding="utf-8") as f:
        f.write("text;label_name\n" + "".join(f"{t};{NAMES[y]}\n" for t, y in zip(texts, labels)))
    out = str(tmp_path / "lr")
    args = ["longrange", "--model", folder, "--data", data, "--out", out, "--needles", "4", "--needle-max-tokens", "6"]
    assert main(args + ["--lengths", "16,32", "--n-distances", "4", "--no-progress"]) == 0
    assert "longrange.md" in capsys.readouterr().out
    with open(os.path.join(out, "longrange.json"), encoding="utf-8") as f:
        summary = json.load(f)
    n_needles = len(summary["needles"])
    assert 1 <= n_needles <= 4 and all(n["tokens"] <= 6 for n in summary["needles"])
    longest = max(n["tokens"] for n in summary["needles"])
    for length in (16, 32):
        distances = [c["distance"] for c in summary["curves"] if c["length"] == length]
        assert distances == LR.default_distances(length - longest, 4)
    assert all(c["n"] == n_needles for c in summary["curves"])
    for name in ("longrange.csv", "per_input.csv", "longrange.md", "longrange.png", "rows.jsonl", "config.json"):
        assert os.path.getsize(os.path.join(out, name)) > 0
    with open(os.path.join(out, "longrange.csv"), encoding="utf-8") as f:
        assert len(f.read().strip().splitlines()) == 1 + len(summary["curves"])

    # rerun with one more length: only its rows are computed
    rows_before = len(LR.JsonLines(os.path.join(out, "rows.jsonl")).read())
    assert main(args + ["--lengths", "16,32,48", "--n-distances", "4", "--no-progress", "--no-figures"]) == 0
    rows = LR.JsonLines(os.path.join(out, "rows.jsonl")).read()
    assert len(rows) == rows_before + n_needles * len(LR.default_distances(48 - longest, 4))

    # the shares, recomputed independently on the saved model
    study = LR.LongRangeStudy(model, tokenizer, texts, labels, LR.LongRangeConfig(lengths=[16], n_needles=4, needle_max_tokens=6))
    check_rows(study, [r for r in rows if r["length"] == 48], MambaLRP(model))


@pytest.mark.parametrize("filler", ["token", "any"])
def test_longrange_api_on_a_hybrid(filler):
    from test_hybrids import build

    from captum_mambalrp.models.tokenizer import build_word_tokenizer

    texts, _ = tiny_data()
    tokenizer = build_word_tokenizer(texts, min_freq=1)
    model = build("bamba")  # a language model: the needle's "class" is its predicted next token
    cfg = LR.LongRangeConfig(lengths=[20], distances=[0, 5, 14], n_needles=3, needle_max_tokens=6, filler=filler, batch_size=2)
    study = LR.LongRangeStudy(model, tokenizer, texts, None, cfg)
    summary = study.run(progress=False)
    assert [(c["length"], c["distance"], c["n"]) for c in summary["curves"]] == [(20, 0, 3), (20, 5, 3), (20, 14, 3)]
    assert all(c["accuracy"][0] <= 1 for c in summary["curves"])
    if filler == "token":
        assert set(study.haystack(summary["needles"][0], 20)) == {tokenizer.unk_token_id}
    check_rows(study, study._memory, MambaLRP(model))


def test_longrange_lengths_shorter_than_a_needle_are_refused(tmp_path):
    model, tokenizer, _ = tiny_classifier(tmp_path)
    texts, labels = tiny_data()
    study = LR.LongRangeStudy(
        model, tokenizer, texts, None, LR.LongRangeConfig(lengths=[4, 32], n_needles=2, needle_max_tokens=6)
    )
    with pytest.raises(ValueError, match=r"lengths \[4\] are shorter than the longest needle"):
        study.run(progress=False)


def test_longrange_command_refuses_short_lengths_before_writing(tmp_path, capsys):
    """``--lengths`` shorter than the longest needle: one line, exit 2, and nothing in --out (not
    even config.json), so the folder does not hold a run that never started."""
    from captum_mambalrp.cli import main

    _, _, folder = tiny_classifier(tmp_path)
    texts, labels = tiny_data()
    data = str(tmp_path / "data.txt")
    with open(data, "w", encoding="utf-8") as f:
        f.write("text;label_name\n" + "".join(f"{t};{NAMES[y]}\n" for t, y in zip(texts, labels)))
    out = tmp_path / "lr"
    argv = ["longrange", "--model", folder, "--data", data, "--out", str(out), "--needles", "2", "--needle-max-tokens", "6"]
    capsys.readouterr()  # the checkpoint's saving bar
    with pytest.raises(SystemExit) as err:
        main(argv + ["--lengths", "4,32", "--no-progress"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert err.value.code == 2 and len(lines) == 1 and "lengths [4] are shorter than the longest needle" in lines[0]
    assert not out.exists()


def _summary(lengths, share):
    curves = [
        {"length": n, "distance": d, "accuracy": [1.0 - d / n, 0.1], "abs_share": [share, 0.01], "uniform": 1.0 / n}
        for n in lengths
        for d in (0, 1, n // 2)
    ]
    return {"curves": curves}


def test_plot_models_picks_the_longest_common_length_and_refuses_a_missing_one(tmp_path, monkeypatch):
    import importlib.util

    a, b = _summary([16, 32, 64], 0.8), _summary([16, 32], 0.3)
    path = LR.plot_models({"a": a, "b": b}, str(tmp_path / "x.png"))
    assert os.path.getsize(path) > 0
    drawn = []
    import matplotlib.axes

    real_plot = matplotlib.axes.Axes.plot

    def plot(self, x, *r, **k):
        drawn.append(list(x))
        return real_plot(self, x, *r, **k)

    monkeypatch.setattr(matplotlib.axes.Axes, "plot", plot)
    LR.plot_models({"a": a, "b": b}, str(tmp_path / "y.png"))
    assert [0, 1, 16] in drawn and all(max(x) <= 16 for x in drawn)  # 32 tokens: distances 0, 1, 16
    with pytest.raises(ValueError, match="length 64 is not in every summary"):
        LR.plot_models({"a": a, "b": b}, str(tmp_path / "z.png"), length=64)
    with pytest.raises(ValueError, match="share no length"):
        LR.plot_models({"a": _summary([8], 0.5), "b": b}, str(tmp_path / "z.png"))

    # the script over longrange folders: LABEL=FOLDER, one line when a folder has no results
    here = os.path.join(os.path.dirname(__file__), "..", "scripts", "plot_longrange.py")
    spec = importlib.util.spec_from_file_location("plot_longrange", here)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "longrange.json").write_text(json.dumps(a))
    assert script.main([f"A={folder}", f"B={folder}", "--out", str(tmp_path / "s.png"), "--length", "64"]).endswith("s.png")
    with pytest.raises(SystemExit, match="no longrange.json"):
        script.main([f"A={tmp_path}", "--out", str(tmp_path / "t.png")])
