"""The study runner from the command line and from Python on a tiny random model (seconds)."""

from __future__ import annotations

import csv
import json
import os

import pytest
import torch

from captum_mambalrp.cli import main
from captum_mambalrp.evaluation import MethodOptions, Perturbation, Study, StudyConfig, load_split
from captum_mambalrp.models import MambaForLastTokenClassification, load_model_and_tokenizer
from captum_mambalrp.models.tokenizer import build_word_tokenizer

TEXTS = [
    ("i feel happy and loved today", "joy"),
    ("i feel so sad and alone tonight", "sadness"),
    ("what a scary night i am afraid", "fear"),
    ("i am angry at the world", "anger"),
    ("i feel loved by my friends", "love"),
    ("what a surprise that was", "surprise"),
    ("i feel happy", "joy"),
    ("so sad", "sadness"),
]
PNGS = [
    "flipping_curves.png",
    "scores_dAF.png",
    "conservation.png",
    "distance_profile.png",
    "layer_profile.png",
    "layer_sums.png",
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from transformers import MambaConfig

    root = tmp_path_factory.mktemp("study")
    data = root / "data"
    data.mkdir()
    (data / "test.txt").write_text("text;label_name\n" + "".join(f"{t};{l}\n" for t, l in TEXTS))
    tokenizer = build_word_tokenizer([t for t, _ in TEXTS], min_freq=1)
    names = ["sadness", "joy", "love", "anger", "fear", "surprise"]
    config = MambaConfig(
        vocab_size=len(tokenizer),
        hidden_size=16,
        state_size=4,
        num_hidden_layers=2,
        num_labels=6,
        id2label=dict(enumerate(names)),
        label2id={n: i for i, n in enumerate(names)},
    )
    torch.manual_seed(0)
    model = MambaForLastTokenClassification(config).eval()
    model.save_pretrained(root / "ckpt")
    tokenizer.save_pretrained(root / "ckpt")
    (root / "ckpt" / "metrics.json").write_text(json.dumps({"test_accuracy": 0.5, "n_test": 8}))
    return str(root / "ckpt"), str(data)


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def test_command_line_writes_table_csv_plots_and_resumes(tiny, tmp_path, capsys):
    ckpt, data = tiny
    out = str(tmp_path / "cli")
    args = [
        "compare",
        "--model",
        ckpt,
        "--data",
        data,
        "--methods",
        "mambalrp,gxi,random,feature_ablation",
        "--n",
        "4",
        "--batch-size",
        "4",
        "--out",
        out,
        "--no-progress",
        "--fraction",
        "0.5",
    ]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "| MambaLRP |" in printed and "ΔA^F" in printed and "0.5000 on 8 examples" in printed
    with open(os.path.join(out, "per_example.csv")) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 * 4 and {r["method"] for r in rows} == {"mambalrp", "gxi", "random", "feature_ablation"}
    for png in PNGS:
        assert os.path.getsize(os.path.join(out, png)) > 1000, png
    first = read_jsonl(os.path.join(out, "results.jsonl"))
    # resume: nothing is recomputed, an added method is computed alone
    capsys.readouterr()
    assert main(args[:6] + ["mambalrp,gxi,random,feature_ablation,saliency"] + args[7:] + ["--no-figures"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("results in ") and ".png" not in last  # no figures written, none announced
    second = read_jsonl(os.path.join(out, "results.jsonl"))
    assert second[: len(first)] == first and len(second) == len(first) + 4
    assert {r["method"] for r in second[len(first) :]} == {"saliency"}
    # the batching of the same computation may change on resume (lowered after running out of memory)
    smaller = args[:6] + ["mambalrp,gxi,random,feature_ablation,saliency"] + args[7:] + ["--no-figures"]
    assert main(smaller + ["--ig-internal-batch", "2", "--smoothgrad-per-pass", "1"]) == 0
    assert read_jsonl(os.path.join(out, "results.jsonl")) == second
    with pytest.raises(SystemExit) as exit_:
        main(args[:-1] + ["0.25"])
    assert exit_.value.code == 2 and "other settings" in capsys.readouterr().err


def test_python_api_all_methods_and_interrupted_run(tiny, tmp_path):
    ckpt, data = tiny
    model, tokenizer = load_model_and_tokenizer(ckpt)
    texts, labels, _ = load_split(data, "test")
    config = StudyConfig(
        methods=["all"],
        n_examples=3,
        batch_size=3,
        perturbation=Perturbation(0.5, "mean"),
        options=MethodOptions(reference_token_id=0, ig_steps=4, smoothgrad_samples=2, kernelshap_samples=16),
    )
    out = str(tmp_path / "py")
    summary = Study(model, tokenizer, texts, labels, config, out).run(progress=False, figures=False)
    assert set(summary["methods"]) == set(config.methods) and summary["n_examples"] == 3
    for m, row in summary["methods"].items():
        assert row["n"] == 3 and len(row["dAF"]) == 2, m
        assert row["seconds"][0] >= 0
    assert summary["methods"]["integrated_gradients"]["forward_rows"][0] >= 4
    assert summary["methods"]["mambalrp"]["forward_rows"][0] == 1
    assert summary["methods"]["random"]["forward_rows"][0] == 0
    assert set(summary["conservation"]) == {"mambalrp", "mambalrp_cp", "gxi"}
    # no attention layer: CP-LRP changes nothing
    cons = summary["conservation"]
    assert cons["mambalrp_cp"]["mean_abs_gap"] == pytest.approx(cons["mambalrp"]["mean_abs_gap"], rel=1e-5)
    table = open(os.path.join(out, "summary.md")).read()
    assert "Mamba-Attr" in table and "KernelShap" in table and "± " in table
    # an interruption in the middle of a write: the cut line and what follows are recomputed
    path = os.path.join(out, "results.jsonl")
    lines = open(path).read().splitlines(keepends=True)
    with open(path, "w") as f:
        f.writelines(lines[:-3])
        f.write(lines[-3][:20])
    again = Study(model, tokenizer, texts, labels, config, out).run(progress=False, figures=False)
    assert all(again["methods"][m]["n"] == 3 for m in summary["methods"])
    for m in summary["methods"]:  # seeded: recomputed records are the same numbers
        assert again["methods"][m]["dAF"] == pytest.approx(summary["methods"][m]["dAF"]), m


def test_growing_a_study_computes_only_the_new_examples(tiny, tmp_path):
    ckpt, data = tiny
    model, tokenizer = load_model_and_tokenizer(ckpt)
    texts, labels, _ = load_split(data, "test")
    out = str(tmp_path / "grow")
    small = StudyConfig(methods=["gxi"], n_examples=3, batch_size=2, perturbation=Perturbation(0.5), layer_analysis=False)
    Study(model, tokenizer, texts, labels, small, out).run(progress=False, figures=False)
    first = read_jsonl(os.path.join(out, "results.jsonl"))
    big = StudyConfig(methods=["gxi"], n_examples=5, batch_size=2, perturbation=Perturbation(0.5), layer_analysis=False)
    summary = Study(model, tokenizer, texts, labels, big, out).run(progress=False, figures=False)
    records = read_jsonl(os.path.join(out, "results.jsonl"))
    assert records[:3] == first and len(records) == 5 and summary["methods"]["gxi"]["n"] == 5
    assert Study(model, tokenizer, texts, labels, small, out).run(progress=False, figures=False)["methods"]["gxi"]["n"] == 3


def test_reference_table_runs_every_reference_under_every_replacement(tiny, tmp_path, capsys):
    ckpt, data = tiny
    out = str(tmp_path / "table")
    args = ["compare", "--model", ckpt, "--data", data, "--methods", "mambalrp,feature_ablation,random", "--n", "3"]
    args += ["--out", out, "--no-progress", "--no-figures", "--no-layers", "--fraction", "0.5", "--reference-table"]
    assert main(args + ["--references", "zero,mean,token:0", "--replacements", "token,zero"]) == 0
    printed = capsys.readouterr().out
    assert "Matched references" in printed and "| Occlusion (FeatureAblation) | token:0 |" in printed
    table = json.load(open(os.path.join(out, "reference_table.json")))
    assert table["matched"]["zero"] == "zero" and table["matched"]["token"].startswith("token:")
    variants = {k for k in table["rows"] if k.startswith("feature_ablation@")}
    assert variants == {"feature_ablation@zero", "feature_ablation@mean", "feature_ablation@token:0"}
    summary = json.load(open(os.path.join(out, "replacement-zero", "summary.json")))
    assert summary["perturbation"]["replacement"] == "zero"
    assert summary["methods"]["feature_ablation@mean"]["reference"] == "mean"
    assert summary["methods"]["mambalrp"]["reference"] == "none"
    for m, row in summary["methods"].items():  # AOPC and ABPC with SEs, paired against MambaLRP
        assert len(row["AOPC"]) == 2 and len(row["ABPC"]) == 2, m
        assert set(summary["paired_vs_mambalrp"][m]) == {"dAF", "AOPC", "ABPC", "dAI"}
    # the occlusion of a token by the zero embedding, judged by replacing with zero: the
    # occlusion score of the most relevant token is the MoRF curve's first drop
    rows = [json.loads(line) for line in open(os.path.join(out, "replacement-zero", "results.jsonl"))]
    fa = [r for r in rows if r["method"] == "feature_ablation@zero"]
    assert len(fa) == 3 and all(r["reference"] == "zero" for r in fa)
    from captum_mambalrp.dashboard.study import load_study

    shown = load_study(out)  # the dashboard shows the reference table first, then each replacement's summary
    assert shown["tables"][0]["name"] == "reference_table.md"
    assert {t["name"] for t in shown["tables"]} >= {"replacement-zero/summary.md", "replacement-token/summary.md"}


def test_matched_reference_follows_the_replacement(tiny, tmp_path):
    ckpt, data = tiny
    out = str(tmp_path / "matched")
    args = ["compare", "--model", ckpt, "--data", data, "--methods", "integrated_gradients,smoothgrad", "--n", "2"]
    args += ["--out", out, "--no-progress", "--no-figures", "--no-layers", "--fraction", "0.5", "--ig-steps", "4"]
    assert main(args + ["--smoothgrad-samples", "2", "--replacement", "mean", "--reference", "matched"]) == 0
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert {m: r["reference"] for m, r in summary["methods"].items()} == {"integrated_gradients": "mean", "smoothgrad": "mean"}


def test_the_models_modes_come_back_after_a_study(tiny, tmp_path):
    """A study runs the model in eval mode and gives each module its own mode back."""
    ckpt, data = tiny
    model, tokenizer = load_model_and_tokenizer(ckpt)
    texts, labels, _ = load_split(data, "test")
    model.train()
    frozen = model.backbone.layers[0]
    frozen.eval()  # a mixed state, as after freezing part of a model
    before = {name: m.training for name, m in model.named_modules()}
    config = StudyConfig(methods=["mambalrp"], n_examples=2, batch_size=2)
    Study(model, tokenizer, texts, labels, config, str(tmp_path / "s")).run(progress=False, figures=False)
    assert {name: m.training for name, m in model.named_modules()} == before
    assert model.training and not frozen.training


def test_gpu_options_and_a_partial_summary_of_the_finished_examples(tiny, tmp_path):
    """scripts/run_emotion_study.py: the batching options land in config.json; --finalize-partial
    summarizes only the examples every method finished (a study stopped by a time limit)."""
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts", "run_emotion_study.py")
    spec = importlib.util.spec_from_file_location("run_emotion_study", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    ckpt, data = tiny
    out = str(tmp_path / "s")
    args = ["--model", ckpt, "--data", data, "--methods", "mambalrp,feature_ablation,random", "--n", "6", "--batch-size", "2"]
    args += ["--out", out, "--no-figures", "--no-progress", "--perturbations-per-eval", "3", "--model-forward"]
    assert script.main(args) == 0
    saved = json.load(open(os.path.join(out, "config.json")))
    assert saved["batching"]["perturbations_per_eval"] == 3 and saved["identity"]["package_scan"] is False
    assert "perturbations_per_eval" not in saved["identity"]["options"]  # batching only: may change on resume
    rows = read_jsonl(os.path.join(out, "results.jsonl"))
    kept = [r for r in rows if not (r["method"] == "random" and r["batch"] == 0)]  # as if stopped before it
    with open(os.path.join(out, "results.jsonl"), "w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in kept))
    complete = script.complete_examples(out, ["mambalrp", "feature_ablation", "random"])
    assert len(complete) == 4 and not {r["index"] for r in rows if r["batch"] == 0} & set(complete)
    assert script.main(args + ["--finalize-partial"]) == 0
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["n_examples"] == 4 and summary["meta"]["partial"] == "4 examples"


class _OutOfMemoryAbove:
    """A method that runs out of device memory on more than ``rows`` examples at once."""

    def __init__(self, inner, rows: int) -> None:
        self.inner, self.rows, self.calls = inner, rows, []

    def attribute(self, ids, target, mask):
        self.calls.append(len(ids))
        if len(ids) > self.rows:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return self.inner.attribute(ids, target, mask)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_a_batch_out_of_device_memory_runs_in_halves(tiny, tmp_path, monkeypatch):
    import captum_mambalrp.evaluation.study as study_module

    ckpt, data = tiny
    model, tokenizer = load_model_and_tokenizer(ckpt)
    texts, labels, _ = load_split(data, "test")
    config = StudyConfig(methods=["mambalrp"], n_examples=5, batch_size=5, perturbation=Perturbation(0.5), layer_analysis=False)
    whole = Study(model, tokenizer, texts, labels, config, str(tmp_path / "whole")).run(progress=False, figures=False)
    real_build, wrapped = study_module.build_method, []

    def build(name, model, options):
        wrapped.append(_OutOfMemoryAbove(real_build(name, model, options), rows=1))
        return wrapped[-1]

    monkeypatch.setattr(study_module, "build_method", build)
    with pytest.warns(ResourceWarning, match="out of device memory on 5 examples"):
        split = Study(model, tokenizer, texts, labels, config, str(tmp_path / "split")).run(progress=False, figures=False)
    # 5 -> 2 + 3 -> 1 + 1 and 1 + 2 -> 1 + 1: every example ends up alone, none lost or repeated
    assert sorted(wrapped[0].calls) == [1, 1, 1, 1, 1, 2, 2, 3, 5]
    records = read_jsonl(str(tmp_path / "split" / "results.jsonl"))
    assert sorted(r["index"] for r in records) == sorted(
        r["index"] for r in read_jsonl(str(tmp_path / "whole" / "results.jsonl"))
    )
    assert split["methods"]["mambalrp"]["dAF"] == pytest.approx(whole["methods"]["mambalrp"]["dAF"], abs=1e-5)
    # one example that does not fit is an error, not a loop
    wrapped.clear()
    monkeypatch.setattr(study_module, "build_method", lambda n, m, o: _OutOfMemoryAbove(real_build(n, m, o), rows=0))
    with pytest.raises(torch.OutOfMemoryError), pytest.warns(ResourceWarning):
        Study(model, tokenizer, texts, labels, config, str(tmp_path / "none")).run(progress=False, figures=False)
