"""``captum-mambalrp compare``: a comparative attribution study on a model and a data set."""

from __future__ import annotations

import argparse
import json
import os

from . import DEVICE_HELP, UsageError, quiet_transformers

# short names accepted by --methods, besides the registry's keys and groups
METHOD_ALIASES = {"ig": "integrated_gradients", "ixg": "input_x_gradient", "shap": "kernelshap"}


def parse_methods(value: str) -> list:
    """The method keys of ``--methods`` (keys, groups, ``all``, or :data:`METHOD_ALIASES`; a key
    or alias may name its reference, ``integrated_gradients@mean``, ``ig@token:0``).

    Raises:
        UsageError: an unknown name, or a reference on a method without one; the message lists
            the valid ones.
    """
    from ..evaluation import GROUPS, METHODS, resolve_methods
    from ..evaluation.methods import split_variant

    names = []
    for item in (n.strip() for n in value.split(",")):
        if item:
            name, ref = split_variant(item)
            name = METHOD_ALIASES.get(name, name)
            names.append(name if ref is None else f"{name}@{ref}")
    if not names:
        raise UsageError("--methods is empty; give a comma list of methods (see compare --list-methods)")
    for n in names:
        name = split_variant(n)[0]
        if n != "all" and name not in METHODS and n not in GROUPS:
            raise UsageError(
                f"unknown method {name!r} in --methods; methods: {', '.join(METHODS)}; groups: {', '.join(GROUPS)}, all; "
                f"aliases: {', '.join(f'{a}={k}' for a, k in METHOD_ALIASES.items())}"
            )
    try:
        return resolve_methods(names)
    except ValueError as e:  # a reference the method does not take, or one that does not parse
        raise UsageError(f"--methods: {e}") from None


def load_data(args: argparse.Namespace):
    """The texts of ``--data`` (default: the package's Emotion demo sample)."""
    from ..datasets import load_texts

    return load_texts(args.data, args.split, args.text_column, args.label_column)


def data_labels(data, model) -> list | None:
    """The data's labels as the model's class indices (names through ``config.id2label``)."""
    from ..attribution.targets import class_names

    head = getattr(model, "lm_head", None)
    n_classes = getattr(head, "out_features", None) if class_names(model) is None else None
    return data.label_ids(class_names(model), n_classes)


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


def positive_int(text: str) -> int:
    """An integer of at least 1 (``argparse`` type).

    >>> positive_int("8")
    8
    """
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is below 1")
    return value


def batching_options(args: argparse.Namespace) -> dict:
    """The :class:`~captum_mambalrp.evaluation.MethodOptions` fields of the batching options given
    (``--ig-internal-batch``, ``--smoothgrad-per-pass``); unset ones keep the options' defaults."""
    given = {
        "ig_internal_batch_size": getattr(args, "ig_internal_batch", None),
        "smoothgrad_samples_per_pass": getattr(args, "smoothgrad_per_pass", None),
    }
    return {k: v for k, v in given.items() if v is not None}


def build_study(args: argparse.Namespace):
    """The :class:`~captum_mambalrp.evaluation.Study` the arguments describe."""
    import torch

    from ..evaluation import MethodOptions, Perturbation, Study, StudyConfig
    from ..evaluation.distributed import local_device
    from ..evaluation.perturbation import neutral_token_id, reference_token_id
    from ..models import load_model_and_tokenizer
    from .explain import make_lrp

    methods = parse_methods(args.methods)
    data = load_data(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_model_and_tokenizer(args.model, device=local_device(args.device))  # cuda:LOCAL_RANK under torchrun
    make_lrp(model, args.model or "the model")  # a model MambaLRP cannot explain: one line, before any work
    labels = data_labels(data, model)
    perturbation = Perturbation(
        args.fraction, args.replacement, args.token_id if args.token_id is not None else neutral_token_id(tokenizer)
    )
    reference = perturbation.as_reference().name if args.reference == "matched" else args.reference
    config = StudyConfig(
        methods=methods,
        n_examples=args.n or None,
        batch_size=args.batch_size,
        seed=args.seed,
        max_length=args.max_length,
        perturbation=perturbation,
        options=MethodOptions(
            reference=reference,
            reference_token_id=args.reference_token_id if args.reference_token_id is not None else reference_token_id(tokenizer),
            ig_steps=args.ig_steps,
            smoothgrad_samples=args.smoothgrad_samples,
            smoothgrad_noise=args.smoothgrad_noise,
            kernelshap_samples=args.kernelshap_samples,
            **batching_options(args),
        ),
        layer_analysis=not args.no_layers,
    )
    meta = {**model_meta(args.model), "data": data.source}
    return Study(model, tokenizer, data.texts, labels, config, args.out, meta=meta, overwrite=args.overwrite)


def run_table(args: argparse.Namespace, study) -> int:
    """``--reference-table``: the study once per replacement with every reference."""
    from ..evaluation.reference_table import run_reference_table

    references = [r.strip() for r in args.references.split(",") if r.strip()] if args.references else None
    replacements = [r.strip() for r in args.replacements.split(",") if r.strip()]
    run_reference_table(
        study.model,
        study.tokenizer,
        study.texts,
        study.labels,
        study.config,
        args.out,
        references=references,
        replacements=replacements,
        meta=study.meta,
        overwrite=args.overwrite,
        progress=not args.no_progress,
        figures=not args.no_figures,
    )
    if study.is_main:
        with open(os.path.join(args.out, "reference_table.md"), encoding="utf-8") as f:
            print(f.read())
        print(f"results in {os.path.abspath(args.out)} (reference_table.md/json; one study per replacement in replacement-*/)")
    return 0


def run(args: argparse.Namespace) -> int:
    from ..evaluation import GROUPS, METHODS

    if args.list_methods:
        for name, spec in METHODS.items():
            print(f"{name:22s} {spec.family:12s} {spec.description}")
        print("groups: " + ", ".join(f"{g} = {','.join(ms)}" for g, ms in GROUPS.items()))
        return 0
    if not args.out:
        raise UsageError("compare needs --out DIR: the folder the study writes to (rerun the command to resume)")
    quiet_transformers()
    study = build_study(args)
    if args.reference_table:
        return run_table(args, study)
    study.run(progress=not args.no_progress, figures=not args.no_figures)
    if not study.is_main:  # a torchrun rank other than 0: rank 0 writes and prints the summary
        return 0
    with open(os.path.join(args.out, "summary.md"), encoding="utf-8") as f:
        print(f.read())
    figures = "" if args.no_figures else ", *.png"
    print(f"results in {os.path.abspath(args.out)} (summary.md, summary.json, per_example.csv, results.jsonl{figures})")
    return 0


def register(sub) -> None:
    """Add ``compare`` to the ``captum-mambalrp`` sub-commands."""
    from ..evaluation.base import MethodOptions

    defaults = MethodOptions()
    p = sub.add_parser(
        "compare",
        help="compare attribution methods (faithfulness, cost, conservation, analyses)",
        description="Run a comparative attribution study; rerun the same command to resume.",
    )
    p.add_argument("--model", default=None, help="transformers checkpoint folder or hub id (default: the embedded model)")
    p.add_argument(
        "--data",
        default=None,
        help="a file (.txt TEXT;LABEL, .csv, .tsv, .jsonl, .json, .parquet), a folder with <split>.<ext> or a "
        "save_to_disk data set, or a Hugging Face datasets id (default: the package's 96-example Emotion demo sample)",
    )
    p.add_argument("--split", default="test", help="split of a folder or a datasets id (default: test)")
    p.add_argument(
        "--text-column", default=None, help="text column of csv/tsv/jsonl/parquet/datasets (default: text, sentence, ...)"
    )
    p.add_argument(
        "--label-column",
        default=None,
        help="label column (default: label, label_name, ...; names map through the model's id2label, integers are indices)",
    )
    p.add_argument(
        "--methods",
        default="all",
        help="comma list of methods or groups (lrp, ablations, captum, attention; all); ig = integrated_gradients",
    )
    p.add_argument("--out", default=None, help="output folder (resumes what is there)")
    p.add_argument(
        "--n",
        "--examples",
        dest="n",
        type=int,
        default=500,
        help="examples, a seeded random subset of the split (0: all); under torchrun write --examples "
        "(torchrun takes --n for itself)",
    )
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
    p.add_argument(
        "--reference",
        default=None,
        help="reference of IG, occlusion, KernelShap and SmoothGrad: zero, mean, token (--reference-token-id), token:ID, "
        "or matched (the same as --replacement); default: the reference token for IG/occlusion/KernelShap, zero for SmoothGrad",
    )
    p.add_argument(
        "--reference-table",
        action="store_true",
        help="run the study once per replacement (--replacements) with every reference (--references) of the methods "
        "that take one; writes reference_table.md/json in --out",
    )
    p.add_argument(
        "--references",
        default=None,
        help="comma list for --reference-table (default: zero,mean and the unknown and padding tokens as token:ID)",
    )
    p.add_argument("--replacements", default="token,zero,mean", help="comma list for --reference-table")
    p.add_argument("--ig-steps", type=int, default=50)
    p.add_argument("--smoothgrad-samples", type=int, default=20)
    p.add_argument("--smoothgrad-noise", type=float, default=0.15)
    p.add_argument("--kernelshap-samples", type=int, default=200)
    p.add_argument(
        "--ig-internal-batch",
        type=positive_int,
        default=None,
        metavar="N",
        help=f"Integrated Gradients rows per forward pass (default {defaults.ig_internal_batch_size}; lower it when "
        "the device runs out of memory: the same attributions, in more passes)",
    )
    p.add_argument(
        "--smoothgrad-per-pass",
        type=positive_int,
        default=None,
        metavar="N",
        help=f"SmoothGrad noise samples per forward pass (default {defaults.smoothgrad_samples_per_pass}; lower it "
        "when the device runs out of memory)",
    )
    p.add_argument("--no-layers", action="store_true", help="skip the per-layer relevance analysis")
    p.add_argument("--no-figures", action="store_true", help="write the tables only")
    p.add_argument("--device", default="cpu", help=DEVICE_HELP + "; under torchrun, cuda is each process's cuda:LOCAL_RANK")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--overwrite", action="store_true", help="discard results in --out made with other settings")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--list-methods", action="store_true", help="list the methods and exit")
    p.set_defaults(func=run)
