"""``captum-mambalrp bias``: which words drive each class across a data set, with
permutation tests and a counterfactual group swap (:mod:`captum_mambalrp.evaluation.bias`)."""

from __future__ import annotations

import argparse
import os
from typing import Any, List, Optional, Tuple

from . import DEVICE_HELP, quiet_transformers

#: ``--recompute`` values and MambaLRP's ``recompute`` for each (docs/usage.md)
RECOMPUTE_CHOICES = {
    "auto": "auto",
    "on": True,
    "off": False,
    "projection": "projection",
    "offload": "offload",
    "sequence": "sequence",
}


def recompute_value(text: str) -> Any:
    """``--recompute`` as MambaLRP's ``recompute``: ``on``/``off`` are True/False, the others
    (``auto``, ``projection``, ``offload``, ``sequence``) the modes of that name.

    >>> recompute_value("on"), recompute_value("sequence")
    (True, 'sequence')
    """
    return RECOMPUTE_CHOICES[text]


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """The options every data-set command shares: model, data, MambaLRP's settings, device, output."""
    p.add_argument("--model", default=None, help="transformers checkpoint folder or hub id (default: embedded Emotion model)")
    p.add_argument(
        "--data",
        default=None,
        help="a file (.txt TEXT;LABEL, .csv, .tsv, .jsonl, .json, .parquet), a folder with <split>.<ext>, or a datasets id "
        "(default: the package's 96-example Emotion demo sample)",
    )
    p.add_argument("--split", default="test", help="split of a folder or a datasets id (default: test)")
    p.add_argument("--text-column", default=None, help="text column of csv/tsv/jsonl/parquet/datasets")
    p.add_argument("--label-column", default=None, help="label column (names map through the model's id2label)")
    p.add_argument("--out", required=True, help="output folder (rerun the same command to resume)")
    p.add_argument("--composite", default="mambalrp", help="MambaLRP rule set (mambalrp; conservative for hybrids' attention)")
    p.add_argument("--backend", default="auto", help="MambaLRP scan backend: auto, torch, triton, mamba_ssm")
    p.add_argument(
        "--recompute",
        default="auto",
        choices=list(RECOMPUTE_CHOICES),
        help="MambaLRP's memory mode: recompute mixers in the backward pass (on), keep everything (off), or "
        "projection, offload, sequence; auto (default) picks from the memory a pass needs",
    )
    p.add_argument("--device", default="cpu", help=DEVICE_HELP)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="discard results in --out made with other settings")
    p.add_argument("--no-figures", action="store_true", help="write the tables only")
    p.add_argument("--no-progress", action="store_true")


def load_for(
    args: argparse.Namespace, dtype: Optional[str] = None
) -> Tuple[Any, Any, List[str], Optional[List[int]], Optional[List[str]], dict]:
    """Model, tokenizer, texts, labels (the model's class indices), class names and the
    report's meta lines, read as ``compare`` reads them."""
    import torch

    from ..attribution.targets import class_names
    from ..models import load_model_and_tokenizer
    from .compare import data_labels, load_data, model_meta

    data = load_data(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    kwargs = {} if dtype is None else {"dtype": getattr(torch, dtype)}
    model, tokenizer = load_model_and_tokenizer(args.model, device=args.device, **kwargs)
    labels = data_labels(data, model)
    names = class_names(model) or data.label_names
    return model, tokenizer, data.texts, labels, names, {**model_meta(args.model), "data": data.source}


def run(args: argparse.Namespace) -> int:
    from ..evaluation.bias import BiasConfig, BiasStudy

    quiet_transformers()
    config = BiasConfig(
        explain=args.explain,
        unit=args.unit,
        groups=list(args.groups or []),
        min_freq=args.min_freq,
        top=args.top,
        n_permutations=args.permutations,
        seed=args.seed,
        alpha=args.alpha,
        n_examples=args.n or None,
        batch_size=args.batch_size,
        max_length=args.max_length,
        composite=args.composite,
        backend=args.backend,
        recompute=recompute_value(args.recompute),
        counterfactual=not args.no_counterfactual,
    )
    config.check()
    model, tokenizer, texts, labels, names, meta = load_for(args)
    study = BiasStudy(model, tokenizer, texts, labels, config, args.out, class_names=names, meta=meta, overwrite=args.overwrite)
    study.run(progress=not args.no_progress, figures=not args.no_figures)
    with open(os.path.join(args.out, "bias.md"), encoding="utf-8") as f:
        print(f.read())
    figures = "" if args.no_figures else ", top_units.png"
    print(f"results in {os.path.abspath(args.out)} (bias.md, bias.json, units.csv, groups.csv, counterfactual.csv{figures})")
    return 0


def register(sub) -> None:
    """Add ``bias`` to the ``captum-mambalrp`` sub-commands."""
    p = sub.add_parser(
        "bias",
        help="find the words and word groups that drive each class across a data set",
        description=(
            "Explain every example with MambaLRP, rank the words that drive each class (mean relevance, "
            "frequency, permutation-test p-values) and check word groups by swapping them in the texts."
        ),
    )
    add_model_arguments(p)
    p.add_argument(
        "--explain",
        default="pred",
        choices=["pred", "label"],
        help="the class explained and grouped by: the predicted class (default) or the gold label",
    )
    p.add_argument("--unit", default="word", choices=["word", "token"], help="words (subword pieces summed) or tokens")
    p.add_argument(
        "--groups",
        nargs="+",
        default=None,
        metavar="GROUP",
        help='word groups, "w1,w2,..." or "name:w1,w2,..."; the first two (aligned lists) are swapped for the counterfactual',
    )
    p.add_argument("--no-counterfactual", action="store_true", help="skip the group swap")
    p.add_argument("--min-freq", type=int, default=5, help="a word enters a class's table when in this many of its examples")
    p.add_argument("--top", type=int, default=10, help="rows per class")
    p.add_argument("--permutations", type=int, default=1000, help="permutations of the significance test")
    p.add_argument("--alpha", type=float, default=0.05, help="level at which q-values are marked significant")
    p.add_argument("--n", type=int, default=0, help="examples, a seeded random subset of the split (0: all)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=128, help="texts are cut to this many tokens")
    p.set_defaults(func=run)
