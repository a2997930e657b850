"""``captum-mambalrp compare``: a comparative attribution study on a model and a data set."""

from __future__ import annotations

import argparse
import json
import os

from . import quiet_transformers


def model_meta(path: str | None) -> dict:
    """The model's name and, when its folder has a ``metrics.json``, its test accuracy."""
    from ..models import DEFAULT_MODEL_DIR

    folder = path or DEFAULT_MODEL_DIR
    meta = {"model": path or "embedded default (captum_mambalrp/default_model)"}
    metrics = os.path.join(folder, "metrics.json")
    if os.path.isfile(metrics):
        with open(metrics, encoding="utf-8") as f:
            m = json.load(f)
        if "test_accuracy" in m:
            meta["model test accuracy (metrics.json)"] = f"{m['test_accuracy']:.4f} on {m.get('n_test', '?')} examples"
    return meta


def build_study(args: argparse.Namespace):
    """The :class:`~captum_mambalrp.evaluation.Study` the arguments describe."""
    import torch

    from ..evaluation import MethodOptions, Perturbation, Study, StudyConfig, load_split, resolve_methods
    from ..evaluation.perturbation import neutral_token_id, reference_token_id
    from ..models import load_model_and_tokenizer

    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_model_and_tokenizer(args.model, device=args.device)
    texts, labels, path = load_split(args.data, args.split)
    config = StudyConfig(
        methods=resolve_methods(args.methods),
        n_examples=args.n or None,
        batch_size=args.batch_size,
        seed=args.seed,
        max_length=args.max_length,
        perturbation=Perturbation(
            args.fraction, args.replacement, args.token_id if args.token_id is not None else neutral_token_id(tokenizer)
        ),
        options=MethodOptions(
            reference_token_id=args.reference_token_id if args.reference_token_id is not None else reference_token_id(tokenizer),
            ig_steps=args.ig_steps,
            smoothgrad_samples=args.smoothgrad_samples,
            smoothgrad_noise=args.smoothgrad_noise,
            kernelshap_samples=args.kernelshap_samples,
        ),
        layer_analysis=not args.no_layers,
    )
    meta = {**model_meta(args.model), "data": path}
    return Study(model, tokenizer, texts, labels, config, args.out, meta=meta, overwrite=args.overwrite)


def run(args: argparse.Namespace) -> int:
    from ..evaluation import GROUPS, METHODS

    if args.list_methods:
        for name, spec in METHODS.items():
            print(f"{name:22s} {spec.family:12s} {spec.description}")
        print("groups: " + ", ".join(f"{g} = {','.join(ms)}" for g, ms in GROUPS.items()))
        return 0
    if not args.out:
        raise SystemExit("compare: --out DIR is required")
    quiet_transformers()
    study = build_study(args)
    study.run(progress=not args.no_progress, figures=not args.no_figures)
    with open(os.path.join(args.out, "summary.md"), encoding="utf-8") as f:
        print(f.read())
    print(f"results in {os.path.abspath(args.out)} (summary.md, summary.json, per_example.csv, results.jsonl, *.png)")
    return 0


def register(sub) -> None:
    """Add ``compare`` to the ``captum-mambalrp`` sub-commands."""
    p = sub.add_parser(
        "compare",
        help="compare attribution methods (faithfulness, cost, conservation, analyses)",
        description="Run a comparative attribution study; rerun the same command to resume.",
    )
    p.add_argument("--model", default=None, help="transformers checkpoint folder or hub id (default: embedded)")
    p.add_argument("--data", default=None, help="folder with <split>.txt or one TEXT;LABEL file (default: shared Emotion)")
    p.add_argument("--split", default="test")
    p.add_argument("--methods", default="all", help="comma list of methods or groups (lrp, ablations, captum, attention; all)")
    p.add_argument("--out", default=None, help="output folder (resumes what is there)")
    p.add_argument("--n", type=int, default=500, help="examples, a seeded random subset of the split (0: all)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--fraction", type=float, default=0.1, help="fraction of the tokens flipped per step")
    p.add_argument(
        "--replacement",
        default="token",
        choices=["token", "zero", "mean"],
        help="what a removed token becomes: a neutral token, a zero or the mean embedding",
    )
    p.add_argument("--token-id", type=int, default=None, help="the neutral token (default: the tokenizer's unknown token)")
    p.add_argument(
        "--reference-token-id",
        type=int,
        default=None,
        help="baseline token of IG, FeatureAblation, KernelShap (default: the padding token)",
    )
    p.add_argument("--ig-steps", type=int, default=50)
    p.add_argument("--smoothgrad-samples", type=int, default=20)
    p.add_argument("--smoothgrad-noise", type=float, default=0.15)
    p.add_argument("--kernelshap-samples", type=int, default=200)
    p.add_argument("--no-layers", action="store_true", help="skip the per-layer relevance analysis")
    p.add_argument("--no-figures", action="store_true", help="write the tables only")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--overwrite", action="store_true", help="discard results in --out made with other settings")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--list-methods", action="store_true", help="list the methods and exit")
    p.set_defaults(func=run)
