"""Docs cannot drift: every Python example of README.md and docs/*.md runs, and every
``captum-mambalrp`` command line shown in a shell example parses.

The Python blocks of one file run in order in one fresh interpreter (later blocks may use names
that earlier ones defined), in a scratch folder, offline (``HF_HUB_OFFLINE=1``). Hub ids that the
docs use are served from a local Hugging Face cache that this test fills with tiny random models
written by ``save_pretrained`` (no weights are downloaded). A block preceded by the line
``<!-- docs-test: skip REASON -->`` is not run (the reason is required: for example, it needs a
GPU); a block preceded by ``<!-- docs-test: setup -->`` is code the reader does not need to see
(written inside an HTML comment, see ``SETUP``).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Tuple

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)\s*$")
SKIP = re.compile(r"^<!--\s*docs-test:\s*skip\s+(\S.*?)\s*-->\s*$")
SETUP = re.compile(r"^<!--\s*docs-test:\s*setup\s*$")
# hub ids used in the docs -> the kind of tiny model standing in for them
HUB_MODELS = {"state-spaces/mamba-130m-hf": "mamba_lm"}


def blocks(path: Path) -> List[Tuple[str, int, str, str]]:
    """(language, first line, code, skip reason or "") of every fenced block, plus hidden setup
    code (``<!-- docs-test: setup`` ... ``-->``) as language "python"."""
    lines = path.read_text(encoding="utf-8").splitlines()
    out: List[Tuple[str, int, str, str]] = []
    i = 0
    while i < len(lines):
        if SETUP.match(lines[i]):
            j = i + 1
            while j < len(lines) and lines[j].strip() != "-->":
                j += 1
            out.append(("python", i + 2, "\n".join(lines[i + 1 : j]), ""))
            i = j + 1
            continue
        m = FENCE.match(lines[i])
        if m and m.group(1):
            j = i + 1
            while j < len(lines) and not lines[j].startswith("```"):
                j += 1
            skip = SKIP.match(lines[i - 1]) if i > 0 else None
            out.append((m.group(1), i + 2, "\n".join(lines[i + 1 : j]), skip.group(1) if skip else ""))
            i = j + 1
            continue
        i += 1
    return out


def _fake_hub(cache: Path) -> None:
    """A Hugging Face cache holding tiny random models under the hub ids the docs use."""
    import torch
    from transformers import AutoTokenizer, MambaConfig, MambaForCausalLM

    from captum_mambalrp.models import DEFAULT_MODEL_DIR

    tokenizer = AutoTokenizer.from_pretrained(DEFAULT_MODEL_DIR)
    for repo, kind in HUB_MODELS.items():
        assert kind == "mamba_lm"
        torch.manual_seed(0)
        config = MambaConfig(vocab_size=len(tokenizer), hidden_size=32, state_size=8, num_hidden_layers=2, expand=2)
        snapshot = cache / f"models--{repo.replace('/', '--')}" / "snapshots" / ("0" * 40)
        MambaForCausalLM(config).save_pretrained(snapshot)
        tokenizer.save_pretrained(snapshot)
        refs = snapshot.parent.parent / "refs"
        refs.mkdir(parents=True, exist_ok=True)
        (refs / "main").write_text("0" * 40)


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory) -> Path:
    cache = tmp_path_factory.mktemp("hf") / "hub"
    _fake_hub(cache)
    return cache


def _python_files() -> List[Path]:
    return [p for p in DOCS if any(lang == "python" for lang, *_ in blocks(p))]


@pytest.mark.parametrize("path", _python_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_python_examples_run(path: Path, hub_cache: Path, tmp_path: Path) -> None:
    script: List[str] = ["import matplotlib", "matplotlib.use('Agg')"]
    ran = 0
    for lang, line, code, skip in blocks(path):
        if lang != "python" or skip:
            continue
        ran += 1
        script.append(f"print({json.dumps(f'--- {path.name}:{line}')}, flush=True)")
        script.append(code)
    if not ran:
        pytest.skip(f"every Python example of {path.name} is marked as not runnable here")
    env: Dict[str, str] = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_HUB_CACHE": str(hub_cache),
        "MPLBACKEND": "Agg",
        "PYTHONPATH": str(ROOT),
    }
    proc = subprocess.run(
        [sys.executable, "-c", "\n".join(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    output = f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert proc.returncode == 0, f"{path.name}: an example failed (the last '---' line says which)\n{output}"


def _command_lines() -> List[Tuple[str, str]]:
    found = []
    for path in DOCS:
        for lang, line, code, _ in blocks(path):
            if lang not in ("bash", "sh", "console", "shell"):
                continue
            for k, text in enumerate(code.replace("\\\n", " ").splitlines()):
                text = text.split(" #")[0].strip().lstrip("$ ")
                if text.startswith("captum-mambalrp "):
                    found.append((f"{path.name}:{line + k}", text))
    return found


@pytest.mark.parametrize("where,command", _command_lines(), ids=[w for w, _ in _command_lines()])
def test_command_lines_parse(where: str, command: str) -> None:
    """Every documented command line is accepted by the CLI's parser (flags and choices exist)."""
    from captum_mambalrp.cli import build_parser

    # a synopsis (`explain "TEXT" [--model PATH]`) parses as the full command line it describes
    argv = [a for a in shlex.split(command.replace("[", " ").replace("]", " "))[1:] if a not in ("...", "|")]
    try:
        build_parser().parse_args(argv)
    except SystemExit as err:
        pytest.fail(f"{where}: `{command}` is not accepted by the parser (exit {err.code})")
