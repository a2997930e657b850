"""The command line and the dashboard on a hybrid (attention + Mamba2 + MoE): a tiny
Granite-4.0-H-like language model written by ``save_pretrained``, whose vocabulary holds the
six Emotion classes as tokens 0..5 named by ``config.id2label`` (as ``scripts/train_classifier.py
--arch hybrid`` does). ``explain``, ``compare`` and the dashboard's explainer give the Python API's
relevance, and conserve with ``composite="conservative"``."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest
import torch

from captum_mambalrp import MambaLRP
from captum_mambalrp.cli import main
from captum_mambalrp.datasets import EMOTION_LABELS
from captum_mambalrp.models import load_model_and_tokenizer
from captum_mambalrp.models.tokenizer import build_word_tokenizer

TEXTS = ["i feel happy today", "i feel sad and alone", "what a scary night", "so happy and loved", "i am angry and surprised"]
TEXT = "i feel happy and loved today"


def class_tokenizer(tokenizer):
    """scripts/train_classifier.py's tokenizer with the six class tokens at ids 0..5."""
    path = os.path.join(os.path.dirname(__file__), "..", "scripts", "train_classifier.py")
    spec = importlib.util.spec_from_file_location("train_classifier_for_cli", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.class_tokenizer(tokenizer)


@pytest.fixture(scope="module")
def granite_dir(tmp_path_factory):
    from transformers import GraniteMoeHybridConfig, GraniteMoeHybridForCausalLM

    tokenizer = class_tokenizer(build_word_tokenizer(TEXTS, min_freq=1))  # class tokens at ids 0..5
    config = GraniteMoeHybridConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=24,
        shared_intermediate_size=24,
        num_hidden_layers=3,
        layer_types=["mamba", "attention", "mamba"],
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        mamba_n_heads=4,
        mamba_d_head=16,
        mamba_d_state=8,
        mamba_n_groups=1,
        mamba_chunk_size=4,
        position_embedding_type="nope",
        pad_token_id=tokenizer.pad_token_id,
        id2label=dict(enumerate(EMOTION_LABELS)),
        label2id={name: i for i, name in enumerate(EMOTION_LABELS)},
    )
    torch.manual_seed(0)
    model = GraniteMoeHybridForCausalLM(config).eval()
    path = tmp_path_factory.mktemp("granite") / "ckpt"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def _reference(path, text, target=None):
    model, tok = load_model_and_tokenizer(path)
    ids = tok([text], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(ids).logits[0, -1]
    target = int(logits.argmax()) if target is None else target
    rel, delta = MambaLRP(model, composite="conservative").attribute(ids, target=target, return_convergence_delta=True)
    return rel[0], float(delta[0]), float(logits[target]), target


def test_explain_a_saved_hybrid(granite_dir, tmp_path, capsys):
    js = tmp_path / "out.json"
    args = ["explain", TEXT, "--model", granite_dir, "--composite", "conservative", "--target", "joy"]
    assert main([*args, "--json", str(js), "--html", ""]) == 0
    out = capsys.readouterr().out
    assert "logit of '[joy]'" in out  # an LM's classes are its vocabulary tokens: the class token decoded
    data = json.loads(js.read_text())[0]
    assert data["target_index"] == 1 and data["tokens"] == TEXT.split()
    expected, delta, logit, _ = _reference(granite_dir, TEXT, target=1)
    assert torch.allclose(torch.tensor(data["relevance"]), expected, atol=1e-6)
    assert data["explained_logit"] == pytest.approx(logit, abs=1e-5)
    assert abs(sum(data["relevance"]) - logit) <= 1e-5 * max(abs(logit), 0.1)
    assert "(absorbed by biases)" in out  # CP-LRP at attention conserves: only biases take a share
    # the default composite (AttnLRP) lets a share go at the attention's softmax, and says so
    assert main(["explain", TEXT, "--model", granite_dir, "--target", "joy", "--html", ""]) == 0
    assert "(absorbed by biases, and by AttnLRP's softmax at attention layers)" in capsys.readouterr().out


def test_compare_on_a_saved_hybrid(granite_dir, tmp_path):
    data = tmp_path / "d.txt"
    data.write_text("".join(f"{t};{label}\n" for t, label in zip(TEXTS * 2, ["joy", "sadness", "fear", "love", "anger"] * 2)))
    out = tmp_path / "study"
    args = ["compare", "--model", granite_dir, "--data", str(data), "--methods", "mambalrp,gxi,ig", "--n", "6"]
    assert main([*args, "--out", str(out), "--ig-steps", "4", "--no-figures", "--no-progress", "--no-layers"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_examples"] == 6
    assert set(summary["methods"]) == {"mambalrp", "gxi", "integrated_gradients"}
    for row in summary["methods"].values():
        assert row["n"] == 6 and all(v == v for v in row["dAF"] + row["AOPC"])  # finite means, no NaN


def test_dashboard_explainer_on_a_saved_hybrid(granite_dir):
    from captum_mambalrp.dashboard.explain import Explainer

    model, tok = load_model_and_tokenizer(granite_dir)
    view = Explainer(model, tok, composite="conservative").explain(TEXT, target="joy", methods=["input_x_gradient"])
    rows = {m["key"]: torch.tensor(m["relevance"]) for m in view["methods"]}
    expected, delta, logit, _ = _reference(granite_dir, TEXT, target=model.config.label2id["joy"])
    assert torch.allclose(rows["mambalrp"], expected, atol=1e-6)
    assert view["target"]["logit"] == pytest.approx(logit, abs=1e-5)
    # relevance per layer (embedding, Mamba2 + MoE, attention + MoE, Mamba2 + MoE) conserves at every depth
    assert len(view["layers"]["names"]) == 4
    assert view["layers"]["totals"] == pytest.approx([logit] * 4, abs=1e-4)
