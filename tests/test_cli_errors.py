"""Every user error of the command line is one line ``captum-mambalrp: error: ...`` and exit
status 2; a runtime failure exits 1 with its cause in one line; ``--debug`` shows the traceback.
Most cases run ``main`` in this process; the hub and offline cases and one end-to-end run
start a fresh ``python -m captum_mambalrp`` (the environment variables must be set before
huggingface_hub is imported)."""

from __future__ import annotations

import json
import os
import socket
import time

import pytest
import torch
from cli_fixtures import run_cli, save_tiny_classifier

from captum_mambalrp.cli import main

PREFIX = "captum-mambalrp: error: "


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return save_tiny_classifier(str(tmp_path_factory.mktemp("cli") / "ckpt"))


def fails(argv, capsys, code: int = 2) -> str:
    """Run ``main(argv)``, expect exit ``code`` and exactly one error line on stderr (what ``main``
    writes: output from before the call, such as transformers' progress bar while a test saved
    its model, is dropped first; it used to fail the test when no earlier test had turned that
    bar off in the same process)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        main(argv)
    captured = capsys.readouterr()
    assert info.value.code == code, captured.err
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(PREFIX), captured.err
    return lines[0][len(PREFIX) :]


def test_empty_and_too_long_text(capsys):
    assert "empty" in fails(["explain", "   "], capsys)
    msg = fails(["explain", "word " * 4000], capsys)
    assert "20000 characters" in msg and "at most 2000" in msg and "--max-chars" in msg


def test_model_paths(tmp_path, capsys):
    assert fails(["explain", "hi", "--model", "/no/such/folder"], capsys) == "no such folder: /no/such/folder"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "is empty" in fails(["explain", "hi", "--model", str(empty)], capsys)
    (tmp_path / "noconf").mkdir()
    (tmp_path / "noconf" / "config.json").write_text(json.dumps({"hidden_size": 8}))
    assert "has no model_type" in fails(["explain", "hi", "--model", str(tmp_path / "noconf")], capsys)
    (tmp_path / "notok").mkdir()
    (tmp_path / "notok" / "config.json").write_text(json.dumps({"model_type": "mamba"}))
    assert "has no tokenizer" in fails(["explain", "hi", "--model", str(tmp_path / "notok")], capsys)
    (tmp_path / "file.bin").write_text("x")
    assert "is a file, not a model folder" in fails(["explain", "hi", "--model", str(tmp_path / "file.bin")], capsys)


def test_model_without_rules(tmp_path, capsys):
    """A GPT-2 (attention MambaLRP has no rule for): one short line from explain, compare and dashboard."""
    from cli_fixtures import TEXTS
    from transformers import GPT2Config, GPT2LMHeadModel

    from captum_mambalrp.models.tokenizer import build_word_tokenizer

    tokenizer = build_word_tokenizer(TEXTS, min_freq=1)
    config = GPT2Config(vocab_size=len(tokenizer), n_layer=1, n_embd=8, n_head=2, n_positions=32, bos_token_id=0, eos_token_id=0)
    GPT2LMHeadModel(config).save_pretrained(tmp_path / "gpt")
    tokenizer.save_pretrained(tmp_path / "gpt")
    gpt = str(tmp_path / "gpt")
    expected = (
        f"{gpt} (a 'gpt2' model) cannot be explained: MambaLRP has no rule for module 'transformer.h.0.attn' (GPT2Attention); "
        "the supported architectures are listed in docs/architectures.md (--debug prints the library's full message)"
    )
    assert fails(["explain", "i feel happy", "--model", gpt, "--no-html"], capsys) == expected
    assert fails(["compare", "--model", gpt, "--methods", "mambalrp", "--out", str(tmp_path / "o")], capsys) == expected
    assert fails(["dashboard", "--model", gpt, "--export", str(tmp_path / "d.html")], capsys) == expected
    assert not (tmp_path / "o").exists() and not (tmp_path / "d.html").exists()


def test_unknown_composite_method_and_option(ckpt, capsys):
    msg = fails(["explain", "hi", "--model", ckpt, "--composite", "nope"], capsys)
    assert "unknown composite 'nope'" in msg and "mambalrp" in msg
    msg = fails(["compare", "--methods", "mambalrp,nope", "--out", "x"], capsys)
    assert "unknown method 'nope'" in msg and "integrated_gradients" in msg and "kernelshap" in msg
    msg = fails(["dashboard", "--methods", "nope", "--export", "x.html"], capsys)
    assert "unknown method 'nope'" in msg
    msg = fails(["explain", "hi", "--no-such-option"], capsys)
    assert "unrecognized arguments: --no-such-option" in msg
    assert "--out DIR" in fails(["compare", "--methods", "mambalrp"], capsys)
    # a method's reference (docs/evaluation.md): taken where the method has one, refused where not
    msg = fails(["compare", "--methods", "saliency@zero", "--out", "x"], capsys)
    assert "method 'saliency' takes no reference" in msg and "integrated_gradients" in msg
    assert "reference must be one of" in fails(["compare", "--methods", "ig@nope", "--out", "x"], capsys)


def test_methods_with_their_reference():
    """``--methods integrated_gradients@mean,ig@token:0,kernelshap@zero``: a reference per method,
    aliases included, as docs/evaluation.md shows."""
    from captum_mambalrp.cli.compare import parse_methods

    keys = parse_methods("integrated_gradients@mean,ig@token:0,kernelshap@zero,lrp")
    assert keys == ["integrated_gradients@mean", "integrated_gradients@token:0", "kernelshap@zero", "mambalrp", "gxi", "lrp_ln"]


def test_target_by_name(ckpt, tmp_path, capsys):
    msg = fails(["explain", "i feel happy", "--model", ckpt, "--target", "happiness", "--no-html"], capsys)
    assert msg == "--target 'happiness' is not a class of the model; its classes are: sadness, joy, fear"
    assert "out of range" in fails(["explain", "i feel happy", "--model", ckpt, "--target", "7", "--no-html"], capsys)
    msg = fails(["explain", "hi", "--model", ckpt, "--target", "token:happy", "--no-html"], capsys)
    assert msg == (
        "--target 'token:happy': token:WORD is for language models; this model is a classifier: "
        "give one of its 3 classes (sadness, joy, fear) or an index 0..2"
    )
    js = tmp_path / "e.json"
    assert main(["explain", "i feel happy", "--model", ckpt, "--target", "fear", "--no-html", "--json", str(js)]) == 0
    by_name = json.loads(js.read_text())[0]
    assert main(["explain", "i feel happy", "--model", ckpt, "--target", "2", "--no-html", "--json", str(js)]) == 0
    by_index = json.loads(js.read_text())[0]
    assert by_name["target_label"] == "fear" and by_name["target_index"] == 2 and by_name["relevance"] == by_index["relevance"]


def test_target_name_on_model_without_names(tmp_path, capsys):
    plain = save_tiny_classifier(str(tmp_path / "plain"), labels=None, n_classes=3)
    msg = fails(["explain", "i feel happy", "--model", plain, "--target", "joy", "--no-html"], capsys)
    assert "no class names" in msg and "token:WORD" in msg
    msg = fails(["explain", "i feel happy", "--model", plain, "--target", "token:happy", "--no-html"], capsys)
    assert msg.endswith("token:WORD is for language models; this model is a classifier: give a class index 0..2")


def test_token_target_on_a_language_model(tmp_path, capsys):
    """``token:WORD`` explains a language model's logit of that vocabulary token; a word of two
    tokens is refused."""
    from cli_fixtures import TEXTS
    from transformers import MambaConfig, MambaForCausalLM

    from captum_mambalrp.models.tokenizer import build_word_tokenizer

    tokenizer = build_word_tokenizer(TEXTS, min_freq=1)
    torch.manual_seed(0)
    lm = MambaForCausalLM(MambaConfig(vocab_size=len(tokenizer), hidden_size=16, state_size=4, num_hidden_layers=1))
    lm.save_pretrained(tmp_path / "lm")
    tokenizer.save_pretrained(tmp_path / "lm")
    capsys.readouterr()
    lm_path, js = str(tmp_path / "lm"), tmp_path / "lm.json"
    assert "not one" in fails(["explain", "hi", "--model", lm_path, "--target", "token:so happy", "--no-html"], capsys)
    assert main(["explain", "i feel", "--model", lm_path, "--target", "token:happy", "--no-html", "--json", str(js)]) == 0
    assert json.loads(js.read_text())[0]["target_index"] == tokenizer.convert_tokens_to_ids("happy")


def test_device_is_checked_before_anything(tmp_path, capsys, monkeypatch):
    """``--device cuda`` on a torch without CUDA: one line naming the fix, exit 2, from every
    sub-command that has ``--device`` (was AssertionError, exit 1), nothing written; each
    ``--device`` has a help text."""
    import argparse

    import torch

    from captum_mambalrp.cli import build_parser

    monkeypatch.setattr(torch.version, "cuda", None)
    monkeypatch.setattr(torch.version, "hip", None, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    expected = f"--device cuda: this torch has no CUDA (torch {torch.__version__}); use --device cpu, or install a CUDA build "
    expected += "of torch"
    for argv in (
        ["explain", "hi", "--html", str(tmp_path / "e.html")],
        ["compare", "--out", str(tmp_path / "c")],
        ["dashboard", "--export", str(tmp_path / "d.html")],
        ["bias", "--out", str(tmp_path / "b")],
        ["longrange", "--out", str(tmp_path / "l")],
    ):
        assert fails([*argv, "--device", "cuda"], capsys) == expected, argv
    assert fails(["explain", "hi", "--device", "gpu"], capsys) == "--device 'gpu' is not a device; give cpu, cuda, cuda:N or mps"
    assert os.listdir(tmp_path) == []
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    with_device = {name: p for name, p in sub.choices.items() if any("--device" in a.option_strings for a in p._actions)}
    assert set(with_device) == {"explain", "compare", "dashboard", "bias", "longrange"}
    for name, p in with_device.items():
        assert all(a.help for a in p._actions if "--device" in a.option_strings), name


def test_compare_batching_options(capsys):
    msg = fails(["compare", "--out", "x", "--ig-internal-batch", "0"], capsys)
    assert msg.startswith("argument --ig-internal-batch: 0 is below 1")


def test_data_errors(ckpt, tmp_path, capsys):
    msg = fails(["compare", "--model", ckpt, "--data", str(tmp_path / "missing.csv"), "--out", str(tmp_path / "o")], capsys)
    assert msg == f"no such file or folder: {tmp_path / 'missing.csv'}"
    bad = tmp_path / "bad.csv"
    bad.write_text("text,label\ni feel happy,joy\nthis is great,positive\n")
    msg = fails(["compare", "--model", ckpt, "--data", str(bad), "--methods", "mambalrp", "--out", str(tmp_path / "o")], capsys)
    assert "label 'positive' (example 2 of" in msg and "its classes are: sadness, joy, fear" in msg
    msg = fails(["compare", "--data", str(bad), "--text-column", "sentence", "--out", str(tmp_path / "o")], capsys)
    assert "no column 'sentence'" in msg and "its columns: text, label" in msg


def test_output_folder_missing(capsys, tmp_path):
    msg = fails(["explain", "hi", "--html", str(tmp_path / "nope" / "x.html")], capsys)
    assert "does not exist" in msg


def test_port_in_use(capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        msg = fails(["dashboard", "--port", str(port)], capsys)
    assert msg.startswith(f"port {port} on 127.0.0.1 is in use") and "--port 0" in msg


def test_runtime_failure_and_debug(ckpt, monkeypatch, capsys):
    import captum_mambalrp.text as text

    def broken(*args, **kwargs):
        raise RuntimeError("CUDA out of memory.\nTried to allocate 2 GiB")

    monkeypatch.setattr(text, "explain_texts", broken)
    msg = fails(["explain", "hi", "--model", ckpt, "--no-html"], capsys, code=1)
    assert msg == "RuntimeError: CUDA out of memory. Tried to allocate 2 GiB (run again with --debug for the traceback)"
    for argv in (["--debug", "explain", "hi"], ["explain", "hi", "--debug"]):
        with pytest.raises(SystemExit) as info:
            main([*argv, "--model", ckpt, "--no-html"])
        err = capsys.readouterr().err
        assert info.value.code == 1 and "Traceback (most recent call last)" in err and "in broken" in err


def test_hub_unreachable_fails_fast(monkeypatch):
    """A bogus HF_ENDPOINT: no retries, one line within seconds (was 27 s of retries)."""
    from captum_mambalrp.models.loading import ModelLoadError, resolve_model_source

    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:1")
    start = time.perf_counter()
    with pytest.raises(ModelLoadError, match=r"^no such folder: someone/model; .*hub \(http://127.0.0.1:1\) cannot be reached"):
        resolve_model_source("someone/model")
    assert time.perf_counter() - start < 5


# fresh processes: the real exit status, stderr and environment variables read at import


def test_subprocess_offline_and_unreachable_hub(tmp_path):
    start = time.perf_counter()
    offline = run_cli("explain", "hi", "--model", "someone/model", env={"HF_HUB_OFFLINE": "1"}, cwd=str(tmp_path))
    assert offline.returncode == 2 and offline.stdout == ""
    assert offline.stderr.strip().splitlines() == [
        PREFIX + "no such folder: someone/model; as a hub id it is not in the local Hugging Face cache, and HF_HUB_OFFLINE "
        "is set (download it once with network access, or give a checkpoint folder)"
    ]
    bogus = run_cli("explain", "hi", "--model", "DIR", env={"HF_ENDPOINT": "http://127.0.0.1:1"}, cwd=str(tmp_path))
    assert bogus.returncode == 2 and len(bogus.stderr.strip().splitlines()) == 1
    assert "cannot be reached" in bogus.stderr
    assert os.listdir(tmp_path) == []  # nothing written on failure
    print(f"two failing runs in {time.perf_counter() - start:.1f} s")


def test_subprocess_explain_output(tmp_path):
    """The default HTML lands in the working folder; the output has a legend and labelled values."""
    done = run_cli("explain", "i feel so happy and loved today", "--no-color", "--target", "love", cwd=str(tmp_path))
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "legend: red = for the explained class (+), white = none, blue = against it (-)" in out
    assert "relevance for 'love', scaled to [-1, 1] by the largest |relevance| (+ for, - against):" in out
    assert "most relevant (raw relevance): " in out and "\x1b[" not in out
    assert os.listdir(tmp_path) == ["mambalrp_explanation.html"]


def test_subprocess_hub_id_from_the_local_cache_offline(tmp_path):
    """With HF_HUB_OFFLINE=1 a hub id found in the local cache loads from it (no network needed)."""
    snapshot = tmp_path / "hub" / "models--someone--tiny-emotion" / "snapshots" / ("0" * 40)
    save_tiny_classifier(str(snapshot))
    (tmp_path / "hub" / "models--someone--tiny-emotion" / "refs").mkdir()
    (tmp_path / "hub" / "models--someone--tiny-emotion" / "refs" / "main").write_text("0" * 40)
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub")}
    done = run_cli("explain", "i feel happy", "--model", "someone/tiny-emotion", "--target", "joy", "--no-html", env=env)
    assert done.returncode == 0, done.stderr
    assert "model: someone/tiny-emotion" in done.stdout and "logit of 'joy'" in done.stdout
