"""``captum-mambalrp explain``: a prediction's token relevance, in colour and as HTML."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, List, Optional, Union

from ..text import MAX_CHARS  # the dashboard's cap too
from . import DEVICE_HELP, UsageError, quiet_transformers

MAX_TOKENS = 4096  # explain_texts' truncation length: never cut a text silently
DEFAULT_HTML = "mambalrp_explanation.html"


def check_texts(texts: List[str], max_chars: int) -> None:
    """Each text non-empty and at most ``max_chars`` characters (``0``: no cap).

    Raises:
        UsageError: naming the text and the fix.

    >>> check_texts(["fine"], 2000)
    """
    for i, text in enumerate(texts):
        which = f"text {i + 1}" if len(texts) > 1 else "the text"
        if not text.strip():
            raise UsageError(f'{which} is empty: give the text to explain in quotes, e.g. explain "i feel happy"')
        if max_chars and len(text) > max_chars:
            raise UsageError(
                f"{which} has {len(text)} characters; explain takes at most {max_chars} "
                "(raise the cap with --max-chars N, or --max-chars 0 for none)"
            )


def check_output_path(path: Optional[str], option: str) -> None:
    """The folder of an output file exists (else a user error, before any work is done)."""
    if not path:
        return
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UsageError(f"cannot write {option} {path}: folder {folder} does not exist")
    if os.path.isdir(path):
        raise UsageError(f"cannot write {option} {path}: it is a folder; give a file name")


def check_composite(name: str) -> None:
    """``name`` is one of the named rule sets (else a user error listing them)."""
    from ..rules import COMPOSITES

    if name not in COMPOSITES:
        raise UsageError(f"unknown composite {name!r}; choose one of: {', '.join(sorted(COMPOSITES))}")


def make_lrp(model: Any, source: str, composite: str = "mambalrp") -> Any:
    """``MambaLRP(model, composite)``, or a short user error when MambaLRP has no rule for one
    of the model's layers (the library's full message, with the supported list, under --debug).

    Raises:
        UsageError: the model holds a layer MambaLRP cannot explain.
    """
    from ..adapters import UnsupportedModelError
    from ..attribution import MambaLRP

    try:
        return MambaLRP(model, composite=composite)
    except UnsupportedModelError as err:
        kind = getattr(getattr(model, "config", None), "model_type", None)
        what = f"{source} (a {kind!r} model)" if kind else source
        raise UsageError(
            f"{what} cannot be explained: {str(err).split(':')[0]}; the supported architectures are listed in "
            "docs/architectures.md (--debug prints the library's full message)"
        ) from err


def output_classes(model: Any) -> Optional[int]:
    """The number of scores the model's output layer gives (``None`` when it has no linear
    output layer): the vocabulary size for a language model, the classes for a classifier."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    out = getattr(head, "out_features", None)
    return int(out) if isinstance(out, int) else None


def cli_target(target: Optional[str], model: Any, tokenizer: Any) -> Union[None, int]:
    """The class index for ``--target``: a class name of ``config.id2label``, an index
    (``"3"``), or ``token:WORD`` for a vocabulary token of a language model. A word is never
    read as a vocabulary id.

    Raises:
        UsageError: an unknown class name (the message lists the model's classes), a
            ``token:`` that is not a single token, or ``token:`` on a classifier.
    """
    from ..attribution.targets import class_names, resolve_class_names

    if target is None:
        return None
    if target.startswith("token:"):
        word = target[len("token:") :]
        outputs = output_classes(model)
        vocab = min(len(tokenizer), getattr(getattr(model, "config", None), "vocab_size", None) or len(tokenizer))
        if outputs is not None and outputs < vocab:  # a classification head, not one score per vocabulary token
            names = class_names(model)
            fix = (
                f"one of its {outputs} classes ({', '.join(names)}) or an index 0..{outputs - 1}"
                if names
                else f"a class index 0..{outputs - 1}"
            )
            raise UsageError(f"--target {target!r}: token:WORD is for language models; this model is a classifier: give {fix}")
        ids = tokenizer.encode(word, add_special_tokens=False)
        if len(ids) != 1:
            raise UsageError(f"--target {target!r}: {word!r} is {len(ids)} tokens of the tokenizer, not one")
        return int(ids[0])
    try:
        return int(resolve_class_names(target, model))  # type: ignore[arg-type]
    except ValueError:
        if class_names(model) is None:
            raise UsageError(
                f"--target {target!r} is not a class index, and the model has no class names (config.id2label): "
                "give an index, or token:WORD for a vocabulary token of a language model"
            ) from None
        raise UsageError(
            f"--target {target!r} is not a class of the model; its classes are: {', '.join(class_names(model) or [])}"
        ) from None


def run(args: argparse.Namespace) -> int:
    import torch

    check_texts(args.text, args.max_chars)
    check_composite(args.composite)
    check_output_path(None if args.no_html else args.html, "--html")
    check_output_path(args.json, "--json")
    quiet_transformers()
    from ..models import load_model_and_tokenizer
    from ..text import explain_texts, records
    from ..visualization import captum_html, legend, terminal_heatmap

    model, tokenizer = load_model_and_tokenizer(args.model, device=args.device)
    lengths = [len(tokenizer.encode(t)) for t in args.text]
    if max(lengths) > MAX_TOKENS:
        raise UsageError(f"a text has {max(lengths)} tokens; explain takes at most {MAX_TOKENS} tokens per text")
    source = args.model or "embedded default (Emotion classifier)"
    lrp = make_lrp(model, args.model or "the model", args.composite)
    target = cli_target(args.target, model, tokenizer)
    explanations = explain_texts(model, tokenizer, args.text, target=target, lrp=lrp, max_length=MAX_TOKENS)
    installed = getattr(lrp, "last_installation", None)
    attention = bool(getattr(installed, "attention", None)) and args.composite != "conservative"
    absorbed = "absorbed by biases" + (", and by AttnLRP's softmax at attention layers" if attention else "")
    color = not args.no_color and (sys.stdout.isatty() or args.color)
    print(f"model: {source}   rules: {args.composite}")
    print(legend(color))
    for e in explanations:
        print()
        print(f"text:       {e.text}")
        print(f"prediction: {e.pred_label} (p={e.pred_prob:.3f})")
        print(
            f"explained:  logit of {e.target_label!r} at position {e.position} = {e.explained:.4f}"
            f"   sum of relevance = {float(e.relevance.sum()):.4f}"
            f"   delta = {e.delta:.2e} ({absorbed})"
        )
        if color:
            print(f"relevance for {e.target_label!r} (red = for, blue = against; colour scaled to the largest |relevance|):")
        else:
            print(f"relevance for {e.target_label!r}, scaled to [-1, 1] by the largest |relevance| (+ for, - against):")
        print(terminal_heatmap(e.tokens, e.relevance, color=color))
        top = torch.argsort(e.relevance.abs(), descending=True)[: args.top]
        print("most relevant (raw relevance): " + ", ".join(f"{e.tokens[i]} {float(e.relevance[i]):+.3f}" for i in top))
    if args.html and not args.no_html:
        with open(args.html, "w", encoding="utf-8") as f:
            f.write(captum_html(records(explanations)))
        print(f"\nHTML (Captum's text visualisation): {os.path.abspath(args.html)}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump([e.as_dict() for e in explanations], f, indent=1)
        print(f"JSON: {os.path.abspath(args.json)}")
    return 0


def register(sub) -> None:
    """Add ``explain`` to the ``captum-mambalrp`` sub-commands."""
    ex = sub.add_parser(
        "explain",
        help="explain the prediction for one or more texts",
        description="Explain a model's prediction for each text with MambaLRP: relevance per token in the terminal "
        f"(red = for the explained class, blue = against) and Captum's HTML view ({DEFAULT_HTML} by default).",
    )
    ex.add_argument("text", nargs="+", help="text(s) to explain")
    ex.add_argument("--model", default=None, help="transformers checkpoint folder or hub id (default: the embedded model)")
    ex.add_argument(
        "--target",
        default=None,
        help="class to explain: a class name of the model (joy), a class index (1), or token:WORD for a language "
        "model's vocabulary token (default: the predicted class)",
    )
    ex.add_argument("--composite", default="mambalrp", help="rule set: mambalrp, gradient, ln_only, no_<kind>_rule, ...")
    ex.add_argument(
        "--html",
        default=DEFAULT_HTML,
        metavar="FILE",
        help=f"write Captum's HTML view here (default: {DEFAULT_HTML} in the current folder)",
    )
    ex.add_argument("--no-html", action="store_true", help="write no HTML file")
    ex.add_argument("--json", default=None, metavar="FILE", help="also write the relevance as JSON")
    ex.add_argument("--top", type=int, default=5, help="list this many most relevant tokens")
    ex.add_argument(
        "--max-chars",
        type=int,
        default=MAX_CHARS,
        help=f"longest text accepted, in characters (default {MAX_CHARS}, as the dashboard; 0: no cap)",
    )
    ex.add_argument("--device", default="cpu", help=DEVICE_HELP)
    ex.add_argument("--color", action="store_true", help="colour even when not writing to a terminal")
    ex.add_argument("--no-color", action="store_true", help="no colours: relevance printed as numbers")
    ex.set_defaults(func=run)
