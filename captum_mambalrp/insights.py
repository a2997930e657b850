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
import shutil
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


VENV_CHECK = (  # imports what the Insights server needs; finds (without importing) this package
    "import importlib.util, torch, captum, captum.insights, flask, flask_compress; "
    "assert importlib.util.find_spec('captum_mambalrp'), 'captum_mambalrp is not on its path'; "
    "print(torch.__version__, captum.__version__)"
)


def _site_dirs() -> List[str]:
    """The site-packages folders this interpreter imports from (its own, and its system's or
    user's when it sees those), in import order."""
    dirs = [p for p in sys.path if os.path.basename(p) in ("site-packages", "dist-packages") and os.path.isdir(p)]
    return list(dict.fromkeys(os.path.abspath(p) for p in dirs))


def venv_problem(path: str) -> Optional[str]:
    """Why the Insights virtualenv at ``path`` cannot serve this environment's models, or None.

    It must exist, import torch (the same version as this process), Captum with Insights,
    flask, flask-compress and captum_mambalrp.

    >>> venv_problem("/no/such/venv")
    'no virtualenv at /no/such/venv'
    """
    python = os.path.join(path, "bin", "python")
    if not os.path.isfile(python):
        return f"no virtualenv at {path}"
    try:
        done = subprocess.run([python, "-c", VENV_CHECK], capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.SubprocessError) as err:
        return f"{python} does not run ({type(err).__name__}: {err})"
    if done.returncode != 0:
        lines = (done.stderr or done.stdout).strip().splitlines()
        return f"{python}: {lines[-1] if lines else f'exit {done.returncode}'}"
    torch_version = done.stdout.split()[0] if done.stdout.split() else "?"
    if torch_version != torch.__version__:
        return f"{python} has torch {torch_version}, this environment torch {torch.__version__}"
    return None


def make_venv(path: str, python: str = sys.executable, force: bool = False) -> str:
    """A virtualenv for Insights beside a Captum 0.9 install; its python.

    It sees the packages of the environment that creates it (``python``'s site-packages,
    whatever kind of environment that is: a virtualenv, conda, the system's), through a
    ``.pth`` file, so torch and transformers are the same ones, and adds in front only
    ``captum==0.8.0`` (without its ``numpy<2`` pin: Insights runs with NumPy 2), ``flask``
    and ``flask-compress`` when missing, and a ``.pth`` file that puts this copy of
    captum-mambalrp on its path (an editable install, unbuilt). A healthy virtualenv at
    ``path`` is kept (unless ``force``); a broken one (for example one linked to an
    environment that no longer exists, or made by an older version with
    ``--system-site-packages`` from inside a virtualenv, which misses that virtualenv's
    torch) is deleted and made again.

    Returns:
        the path of the virtualenv's python.

    Raises:
        RuntimeError: (one line) the virtualenv could not be made to import torch, Captum
            Insights and captum_mambalrp; the message says why.
    """
    venv_python = os.path.join(path, "bin", "python")
    if not force and venv_problem(path) is None:
        return venv_python
    if os.path.lexists(path):
        shutil.rmtree(path)
    if os.path.abspath(python) == os.path.abspath(sys.executable):
        sites = _site_dirs()
    else:
        code = "import sys, os; print(os.pathsep.join(p for p in sys.path if p.endswith(('site-packages', 'dist-packages'))))"
        found = subprocess.run([python, "-c", code], check=True, capture_output=True, text=True).stdout.strip()
        sites = [p for p in found.split(os.pathsep) if p]

    def run(*cmd: str) -> str:
        done = subprocess.run(list(cmd), capture_output=True, text=True)
        if done.returncode != 0:
            lines = (done.stderr or done.stdout).strip().splitlines()
            raise RuntimeError(f"making the Insights virtualenv {path}: `{' '.join(cmd)}` failed: {lines[-1] if lines else ''}")
        return done.stdout.strip()

    run(python, "-m", "venv", path)
    site = run(venv_python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])")
    with open(os.path.join(site, "_captum_mambalrp_parent_env.pth"), "w") as f:
        # `import` lines of a .pth run at start-up: addsitedir also reads the parent's own .pth files
        f.write("".join(f"import site; site.addsitedir({p!r})\n" for p in sites))
    for requirement in VENV_REQUIREMENTS:
        run(venv_python, "-m", "pip", "install", "-q", *requirement)
    with open(os.path.join(site, "captum_mambalrp_source.pth"), "w") as f:
        f.write(os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + "\n")
    problem = venv_problem(path)
    if problem is not None:
        raise RuntimeError(f"the Insights virtualenv {path} is not usable: {problem}")
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
    p.add_argument("--make-venv", metavar="DIR", default=None, help="only create (or repair) the Insights virtualenv in DIR")
    args = p.parse_args(argv)
    if args.make_venv:
        try:
            print(make_venv(args.make_venv))
        except (RuntimeError, OSError, subprocess.SubprocessError) as err:
            print(f"python -m captum_mambalrp.insights: error: {err}", file=sys.stderr)
            return 1
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
