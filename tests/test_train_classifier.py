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
    steps = 10 if arch == "mamba" else 2  # 10: OneCycleLR's warm-up would be 0 steps (it raised)
    run = ["--data", data, "--out", out, "--arch", arch, "--max-steps", str(steps), "--batch", "4", "--seed", "3"]
    metrics = script.main(run + tiny)
    saved = json.load(open(os.path.join(out, "metrics.json")))
    assert saved == json.loads(json.dumps(metrics)) and saved["steps"] == steps and saved["seed"] == 3
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


def test_language_model_classes_are_tokens_0_to_5_and_name_the_logits(script):
    from captum_mambalrp.attribution.targets import class_names
    from captum_mambalrp.models.tokenizer import build_word_tokenizer

    tok = script.class_tokenizer(build_word_tokenizer([t for t, _ in LINES], 1))
    assert tok.convert_tokens_to_ids([f"[{n}]" for n in script.EMOTION_LABELS]) == list(range(6))
    assert tok.pad_token_id == 6 and tok.unk_token_id == 7 and tok("i feel sad")["input_ids"][0] >= 8
    args = script.parse(["--data", "x", "--out", "x", "--arch", "mamba2", "--hidden", "16", "--layers", "1", "--state", "4"])
    args.head_dim, args.chunk = 8, 16
    model, class_ids = script.build_model(args, tok)
    assert class_ids.tolist() == list(range(6)) and class_names(model) == list(script.EMOTION_LABELS)
    assert model.config.chunk_size == 16


def test_time_budget_cuts_the_run_to_what_fits(script, data, tmp_path):
    out = str(tmp_path / "budget")
    tiny = ["--hidden", "16", "--layers", "1", "--state", "4", "--min-freq", "1", "--batch", "2"]
    metrics = script.main(["--data", data, "--out", out, "--epochs", "30", "--time-budget", "1e-6", "--seed", "1"] + tiny)
    assert metrics["steps"] == 20  # the budget is spent: the run stops where the count was fitted
    assert script.budget_lr(0, 100) == 0.1 and script.budget_lr(100, 100) == 0.0


def test_every_position_loss_is_the_mean_over_real_tokens_of_each_prefix(script):
    """``--every-position``: each real token's cross-entropy against its text's class, averaged per
    text over its real tokens, then over texts (padding left out); the last-token loss otherwise."""

    class Fixed(torch.nn.Module):  # logits chosen by hand: [B, L, V]
        def __init__(self, logits):
            super().__init__()
            self.out = logits

        def forward(self, input_ids, attention_mask):
            return type("Out", (), {"logits": self.out})()

    torch.manual_seed(0)
    logits = torch.randn(2, 4, 9)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    y = torch.tensor([2, 0])
    class_ids = torch.tensor([3, 4, 5])
    model, ids = Fixed(logits), torch.zeros(2, 4, dtype=torch.long)
    by_hand = []
    for b, n in enumerate(mask.sum(1).tolist()):
        tokens = [-torch.log_softmax(logits[b, t], -1)[class_ids[y[b]]] for t in range(n)]
        by_hand.append(sum(tokens) / n)
    every = script.lm_loss(model, ids, mask, y, class_ids, every_position=True)
    assert torch.allclose(every, torch.stack(by_hand).mean(), atol=1e-6)
    last = script.lm_loss(model, ids, mask, y, class_ids)
    by_hand_last = torch.stack([-torch.log_softmax(logits[0, 2], -1)[5], -torch.log_softmax(logits[1, 3], -1)[3]]).mean()
    assert torch.allclose(last, by_hand_last, atol=1e-6) and not torch.allclose(every, last)


@pytest.mark.parametrize("arch", ["mamba", "mamba2"])
def test_rescale_residual_scales_out_proj_at_init(script, arch):
    from captum_mambalrp.models.tokenizer import build_word_tokenizer

    tok = build_word_tokenizer([t for t, _ in LINES], 1)
    if arch != "mamba":
        tok = script.class_tokenizer(tok)
    stds = []
    for extra in ([], ["--rescale-residual"]):
        shape = ["--arch", arch, "--hidden", "64", "--layers", "16", "--state", "4"]
        args = script.parse(["--data", "x", "--out", "x"] + shape + extra)
        args.head_dim = 16
        torch.manual_seed(0)
        model, _ = script.build_model(args, tok)
        assert model.config.rescale_prenorm_residual == bool(extra)
        stds.append(torch.stack([m.mixer.out_proj.weight.std() for m in model.modules() if hasattr(m, "mixer")]).mean())
    assert stds[1] < 0.5 * stds[0]  # 1/sqrt(16) = 0.25 of the plain init


@pytest.mark.parametrize("arch", ["mamba", "mamba2", "hybrid"])
def test_init_range_sets_the_normal_init_of_embeddings(script, arch):
    """``--init-range`` (default 0.02, not transformers' 0.1 for Mamba/Mamba2) reaches the config
    and the embedding's initial std."""
    from captum_mambalrp.models.tokenizer import build_word_tokenizer

    tok = build_word_tokenizer([t for t, _ in LINES] * 50, 1)
    if arch != "mamba":
        tok = script.class_tokenizer(tok)
    for extra, std in (([], 0.02), (["--init-range", "0.1"], 0.1)):
        shape = ["--arch", arch, "--hidden", "256", "--layers", "1", "--state", "4", "--head-dim", "16", "--attn-layers", "0"]
        args = script.parse(["--data", "x", "--out", "x"] + shape + extra)
        torch.manual_seed(0)
        model, _ = script.build_model(args, tok)
        assert model.config.initializer_range == std
        got = float(model.get_input_embeddings().weight.detach().std())
        assert abs(got - std) < 0.2 * std, (extra, got)


def test_transformers_default_init_buries_recent_tokens_at_depth():
    """Why ``--init-range`` defaults to 0.02 (docs/results.md, "Deeper models"): a 24-layer Mamba1
    built with transformers' default std 0.1 has a residual stream far larger than its
    embedding, and its last state hardly depends on the last tokens; at 0.02 it does
    (``scripts/init_probe.py``, its Mamba1 rows)."""
    from transformers import MambaConfig, MambaModel

    path = os.path.join(os.path.dirname(__file__), "..", "scripts", "init_probe.py")
    spec = importlib.util.spec_from_file_location("init_probe", path)
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    shares = {}
    for std in (0.1, 0.02):
        torch.manual_seed(0)
        model = MambaModel(
            MambaConfig(vocab_size=100, hidden_size=768, num_hidden_layers=24, state_size=16, expand=2, initializer_range=std)
        )
        result = probe.probe(model)
        shares[std] = result["share_last4"]
        if std == 0.1:
            assert result["block_rms"][1] > 20 * result["embedding_rms"]
    assert shares[0.1] < 0.1 < 0.3 < shares[0.02], shares
