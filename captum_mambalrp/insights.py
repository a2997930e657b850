"""MambaLRP in Captum Insights (``captum.insights``, shipped with Captum up to 0.8).

Insights was removed in Captum 0.9: install the ``insights`` extra (``captum==0.8.0``,
``flask``, ``flask-compress``) to use it; our own dashboard (``captum-mambalrp
dashboard``) works with any Captum. :func:`register_mambalrp` adds MambaLRP to the
methods Insights offers; :func:`text_visualizer` builds an ``AttributionVisualizer`` for a
Mamba text classifier, and ``python -m captum_mambalrp.insights --model DIR`` serves it.

    from captum_mambalrp.insights import text_visualizer
    visualizer = text_visualizer(model, tokenizer, ["i feel so happy today"])
    visualizer.serve(port=6080)   # pick "MambaLRP" in the method list, press Fetch
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
import time
import urllib.request
from typing import Any, List, Optional, Sequence

import torch
from torch import Tensor, nn

from .attribution import MambaLRP, find_embedding
from .evaluation.scores import LastTokenScores
from .text import label_names

METHOD_NAME = "MambaLRP"
VENV_REQUIREMENTS = (["--no-deps", "captum==0.8.0"], ["flask", "flask-compress"])


def _insights_config() -> Any:
    try:
        from captum.insights.attr_vis import config
    except ImportError as err:
        import captum

        raise ImportError(
            f"Captum Insights is not in captum {captum.__version__} (it was removed in 0.9): "
            "pip install 'captum-mambalrp[insights]' (captum==0.8.0, flask, flask-compress)"
        ) from err
    return config


def register_mambalrp(name: str = METHOD_NAME) -> str:
    """Offer MambaLRP in every Insights visualizer of this process, under ``name``."""
    config = _insights_config()
    config.ATTRIBUTION_NAMES_TO_METHODS[name] = MambaLRP
    return name


class TokenText:
    """Insights' visualisation transform: token ids ``[1, L]`` -> the tokens as strings."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    def __call__(self, ids: Tensor) -> List[str]:
        return self.tokenizer.convert_ids_to_tokens(ids.reshape(-1).tolist())


class Embed:
    """Insights' input transform: token ids ``[L]`` -> embeddings ``[L, H]``."""

    def __init__(self, embedding: nn.Embedding) -> None:
        self.embedding = embedding

    def __call__(self, ids: Tensor) -> Tensor:
        with torch.no_grad():
            return self.embedding(ids.long())


def text_visualizer(
    model: nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    labels: Optional[Sequence[int]] = None,
    classes: Optional[List[str]] = None,
    select: bool = True,
) -> Any:
    """An Insights ``AttributionVisualizer`` for a Mamba text classifier, MambaLRP included.

    The model Insights sees maps token embeddings ``[1, L, H]`` to the class logits at the
    last token (softmax for display); every method, Captum's and MambaLRP, explains the
    predicted class with respect to the embeddings. ``labels`` are the true classes
    (default: the predicted ones); ``select`` makes MambaLRP the method selected first.
    """
    name = register_mambalrp()  # fails early, with the fix, on a Captum without Insights
    from captum.insights import AttributionVisualizer, Batch
    from captum.insights.attr_vis.app import FilterConfig
    from captum.insights.attr_vis.features import TextFeature

    embedding = find_embedding(model)
    if embedding is None:
        raise ValueError("cannot find the model's token embedding (get_input_embeddings())")
    scores = LastTokenScores(model.eval())
    batches = []
    for i, text in enumerate(texts):
        ids = tokenizer([text], return_tensors="pt")["input_ids"]
        if labels is None:
            with torch.no_grad():
                label = int(scores(ids).argmax(-1))
        else:
            label = int(labels[i])
        batches.append(Batch(inputs=(ids,), labels=torch.tensor([label])))
    with torch.no_grad():
        n = scores(tokenizer(["a"], return_tensors="pt")["input_ids"]).shape[-1]
    feature = TextFeature(
        "Text", baseline_transforms=None, input_transforms=[Embed(embedding)], visualization_transform=TokenText(tokenizer)
    )
    visualizer = AttributionVisualizer(
        models=[scores],
        classes=classes or label_names(model, tokenizer, n),
        features=[feature],
        dataset=batches,
        score_func=lambda o: o.softmax(-1),
    )
    if select:
        visualizer._config = FilterConfig(
            attribution_method=name, attribution_arguments={}, prediction="all", classes=[], num_examples=4
        )
    return visualizer


def make_venv(path: str, python: str = sys.executable) -> str:
    """A virtualenv for Insights beside a Captum 0.9 install; its python.

    It sees the system's packages (torch, transformers) and adds only ``captum==0.8.0``
    (without its ``numpy<2`` pin: Insights runs with NumPy 2), ``flask`` and
    ``flask-compress``, which shadow the system's inside the venv, and a ``.pth`` file
    that puts this copy of captum-mambalrp on its path (an editable install, unbuilt).
    """
    subprocess.run([python, "-m", "venv", "--system-site-packages", path], check=True)
    venv_python = os.path.join(path, "bin", "python")
    for requirement in VENV_REQUIREMENTS:
        subprocess.run([venv_python, "-m", "pip", "install", "-q", *requirement], check=True)
    site = subprocess.run(
        [venv_python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    with open(os.path.join(site, "captum_mambalrp_source.pth"), "w") as f:
        f.write(os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + "\n")
    return venv_python


def serve_in_subprocess(
    python: str, model: str, texts: Sequence[str], port: int, log_path: str, timeout: float = 180.0, env: Optional[dict] = None
) -> subprocess.Popen:
    """Start ``python -m captum_mambalrp.insights`` (output to ``log_path``) and wait until
    it answers; the caller ends the process."""
    cmd = [python, "-m", "captum_mambalrp.insights", "--model", model, "--port", str(port), "--log"]
    for text in texts:
        cmd += ["--text", text]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            with open(log_path) as log:
                raise RuntimeError(f"the Insights server stopped (exit {proc.returncode}):\n{log.read()[-4000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/init", timeout=2):
                return proc
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise TimeoutError(f"the Insights server did not answer on port {port} within {timeout:.0f} s")


def main(argv: Optional[List[str]] = None) -> int:
    """``python -m captum_mambalrp.insights``: serve Insights with MambaLRP for a classifier."""
    from .models import load_model_and_tokenizer

    p = argparse.ArgumentParser(prog="python -m captum_mambalrp.insights", description=main.__doc__)
    p.add_argument("--model", default=None, help="checkpoint folder (default: the embedded Emotion classifier)")
    p.add_argument("--text", action="append", default=None, help="a text to show (repeat for several)")
    p.add_argument("--port", type=int, default=6080)
    p.add_argument("--log", action="store_true", help="log requests and errors (tracebacks) to stderr")
    p.add_argument("--make-venv", metavar="DIR", default=None, help="only create the Insights virtualenv in DIR")
    args = p.parse_args(argv)
    if args.make_venv:
        print(make_venv(args.make_venv))
        return 0
    model, tokenizer = load_model_and_tokenizer(args.model)
    texts = args.text or ["i feel so happy and loved today", "i am scared of the dark and feel so alone"]
    text_visualizer(model, tokenizer, texts).serve(port=args.port)  # in a thread, 127.0.0.1 only
    if args.log:  # Insights silences Flask's loggers unless in debug mode (which adds a debugger)
        import logging

        from captum.insights.attr_vis import server

        logging.getLogger("werkzeug").disabled = False
        server.app.logger.disabled = False
    threading.Event().wait()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
