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
    # delta is not zero: the biases take their share (README), said next to it
    deltas = [line for line in out.splitlines() if "   delta = " in line]
    assert len(deltas) == 2 and all(line.endswith(" (absorbed by biases)") for line in deltas)
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


def test_compare_batching_options_reach_the_method_options(tmp_path):
    """``--ig-internal-batch`` / ``--smoothgrad-per-pass`` (named by docs/evaluation.md and the
    study's out-of-memory warning) set the study's MethodOptions; left out, the defaults stay."""
    from captum_mambalrp.cli import build_parser
    from captum_mambalrp.cli.compare import build_study
    from captum_mambalrp.evaluation import MethodOptions

    argv = ["compare", "--methods", "integrated_gradients,smoothgrad", "--n", "2", "--out", str(tmp_path / "s")]
    study = build_study(build_parser().parse_args([*argv, "--ig-internal-batch", "8", "--smoothgrad-per-pass", "2"]))
    options = study.config.options
    assert (options.ig_internal_batch_size, options.smoothgrad_samples_per_pass) == (8, 2)
    default = build_study(build_parser().parse_args(argv)).config.options
    assert default.ig_internal_batch_size == MethodOptions().ig_internal_batch_size
    assert default.smoothgrad_samples_per_pass == MethodOptions().smoothgrad_samples_per_pass
    assert not (tmp_path / "s").exists()


def fake_python(tmp_path, with_packages: bool) -> str:
    """A virtualenv without pip (made in a blink) whose ``pip`` fails at once, so scripts/setup.sh
    stops at its first install; ``with_packages``: it sees this Python's packages (all installed)."""
    import site
    import subprocess
    import sys
    import sysconfig

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    purelib = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], capture_output=True, text=True
    )
    packages = purelib.stdout.strip()
    os.makedirs(os.path.join(packages, "pip"))
    with open(os.path.join(packages, "pip", "__init__.py"), "w") as f:
        f.write("")
    with open(os.path.join(packages, "pip", "__main__.py"), "w") as f:
        f.write(
            "import sys\nif '--version' in sys.argv:\n    print('pip 0 (test)')\nelse:\n    sys.exit('pip (test): no index')\n"
        )
    if with_packages:
        with open(os.path.join(packages, "outer.pth"), "w") as f:
            f.write("\n".join([*site.getsitepackages(), sysconfig.get_path("purelib")]) + "\n")
    return python


@pytest.mark.parametrize("installed", [False, True])
def test_explain_script_says_when_it_installs(tmp_path, installed):
    """scripts/explain.sh hides setup.sh's output: on a first run (packages missing) it says first
    that it installs (and the test's pip fails); with everything installed it does not install
    again (no pip) and explains at once."""
    import subprocess

    from cli_fixtures import REPO

    env = {**os.environ, "PYTHON": fake_python(tmp_path, installed)}
    done = subprocess.run(
        ["bash", os.path.join(REPO, "scripts", "explain.sh"), "hi"], capture_output=True, text=True, env=env, timeout=120
    )
    message = "explain.sh: installing captum-mambalrp and its dependencies (first run: about a minute)..."
    if installed:
        assert done.returncode == 0 and message not in done.stderr and "setup.sh" not in done.stderr, done.stderr
        assert "hi" in done.stdout and "delta" in done.stdout, done.stdout
        return
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 1 and lines[-1].startswith("setup.sh: error: pip install"), done.stderr  # the test's pip
    assert lines[0] == message, done.stderr
