"""scripts/train_classifier.py: each architecture trains a few steps on CPU and records its run."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest
import torch

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "scripts", "train_classifier.py")
LINES = [
    ("i feel happy and loved", "joy"),
    ("i feel so sad", "sadness"),
    ("i am afraid of the night", "fear"),
    ("i am angry at you", "anger"),
    ("i love my friends", "love"),
    ("what a surprise", "surprise"),
]


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("train_classifier", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("emotion")
    for split in ("train", "val", "test"):
        (folder / f"{split}.txt").write_text("text;label_name\n" + "".join(f"{t};{l}\n" for t, l in LINES * 2))
    return str(folder)


@pytest.mark.parametrize("arch", ["mamba", "mamba2", "hybrid"])
def test_tiny_training_run_records_seed_command_and_accuracy(script, data, tmp_path, arch):
    out = str(tmp_path / arch)
    tiny = ["--hidden", "16", "--layers", "2", "--state", "4", "--head-dim", "8", "--attn-heads", "2", "--min-freq", "1"]
    run = ["--data", data, "--out", out, "--arch", arch, "--max-steps", "2", "--batch", "4", "--seed", "3"]
    metrics = script.main(run + tiny)
    saved = json.load(open(os.path.join(out, "metrics.json")))
    assert saved == json.loads(json.dumps(metrics)) and saved["steps"] == 2 and saved["seed"] == 3
    assert "--arch " + arch in saved["command"] and 0 <= saved["test_accuracy"] <= 1
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(out)
    assert sorted(config.id2label.values()) == sorted(n for _, n in LINES)
    if arch == "mamba":
        from captum_mambalrp.models import MambaForLastTokenClassification

        model = MambaForLastTokenClassification.from_pretrained(out)
    else:  # a language model whose class tokens are in the vocabulary
        model = AutoModelForCausalLM.from_pretrained(out)
        tok = AutoTokenizer.from_pretrained(out)
        assert set(config.id2label) == set(tok.convert_tokens_to_ids([f"[{n}]" for _, n in LINES]))
    assert config.num_hidden_layers == 2 and config.hidden_size == 16
    ids = torch.tensor([[5, 6, 7]])
    assert torch.isfinite(model(input_ids=ids).logits).all()


def test_presets_are_the_deep_shapes(script):
    args = script.parse(["--data", "d", "--out", "o", "--preset", "mamba-130m"])
    assert (args.arch, args.hidden, args.layers, args.state, args.expand) == ("mamba", 768, 24, 16, 2)
    args = script.parse(["--data", "d", "--out", "o", "--preset", "hybrid-130m", "--layers", "12", "--attn-layers", "5"])
    assert (args.arch, args.layers, args.attn_layers, args.head_dim) == ("hybrid", 12, "5", 64)
