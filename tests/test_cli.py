"""The command line on a checkpoint written by save_pretrained, and on the embedded default."""

from __future__ import annotations

import json
import os

import pytest
import torch

from captum_mambalrp.cli import main
from captum_mambalrp.models import DEFAULT_MODEL_DIR, MambaForLastTokenClassification, load_model_and_tokenizer
from captum_mambalrp.models.tokenizer import build_word_tokenizer


@pytest.fixture
def tiny_checkpoint(tmp_path):
    from transformers import MambaConfig

    texts = ["i feel happy today", "i feel sad and alone", "what a scary night", "so happy and loved"]
    tokenizer = build_word_tokenizer(texts, min_freq=1)
    config = MambaConfig(
        vocab_size=len(tokenizer),
        hidden_size=16,
        state_size=4,
        num_hidden_layers=2,
        num_labels=3,
        id2label={0: "sadness", 1: "joy", 2: "fear"},
        label2id={"sadness": 0, "joy": 1, "fear": 2},
    )
    torch.manual_seed(0)
    model = MambaForLastTokenClassification(config).eval()
    path = tmp_path / "ckpt"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def test_explain_command_writes_html_and_json(tiny_checkpoint, tmp_path, capsys):
    html, js = tmp_path / "out.html", tmp_path / "out.json"
    assert (
        main(
            [
                "explain",
                "i feel happy today",
                "what a scary night",
                "--model",
                tiny_checkpoint,
                "--html",
                str(html),
                "--json",
                str(js),
                "--target",
                "joy",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "prediction:" in out and "logit of 'joy'" in out
    data = json.loads(js.read_text())
    assert [d["tokens"] for d in data] == [["i", "feel", "happy", "today"], ["what", "a", "scary", "night"]]
    model, tok = load_model_and_tokenizer(tiny_checkpoint)
    from captum_mambalrp import MambaLRP

    ids = tok(["i feel happy today"], return_tensors="pt")["input_ids"]
    expected = MambaLRP(model).attribute(ids, target=1)[0]
    assert torch.allclose(torch.tensor(data[0]["relevance"]), expected, atol=1e-6)
    page = html.read_text()
    assert page.count("<mark") == 8 and "happy" in page


def test_colour_output(tiny_checkpoint, tmp_path, capsys):
    main(["explain", "so happy", "--model", tiny_checkpoint, "--html", "", "--color"])
    assert "\x1b[48;2;" in capsys.readouterr().out


def test_embedded_default_model(capsys, tmp_path):
    assert os.path.isfile(os.path.join(DEFAULT_MODEL_DIR, "model.safetensors")), "the package must ship its default model"
    model, tokenizer = load_model_and_tokenizer(None)
    assert isinstance(model, MambaForLastTokenClassification)
    assert model.config.id2label[1] == "joy" and next(model.parameters()).dtype == torch.float32
    main(["explain", "i feel so happy and loved today", "--html", str(tmp_path / "d.html")])
    out = capsys.readouterr().out
    assert "prediction: joy" in out or "prediction: love" in out


def test_compare_defaults_to_the_demo_sample_and_embedded_model(tmp_path, capsys):
    """The README's compare example on a fresh clone: no --model, no --data; `ig` is an alias."""
    from captum_mambalrp.datasets import DEMO_DATA, EMOTION_LABELS, load_texts

    out = tmp_path / "study"
    argv = ["compare", "--methods", "mambalrp,ig", "--ig-steps", "2", "--n", "4", "--batch-size", "4", "--out", str(out)]
    assert main([*argv, "--no-layers", "--no-figures", "--no-progress"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["meta"]["data"] == DEMO_DATA and "embedded default" in summary["meta"]["model"]
    assert set(summary["methods"]) == {"mambalrp", "integrated_gradients"}
    demo = load_texts()
    truth = dict(zip(demo.texts, demo.label_ids(EMOTION_LABELS)))
    examples = [json.loads(line) for line in (out / "examples.jsonl").read_text().splitlines()]
    assert len(examples) == 4 and all(e["label"] == truth[e["text"]] for e in examples)
