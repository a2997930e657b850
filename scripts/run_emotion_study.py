#!/usr/bin/env python3
"""The Emotion faithfulness study of the MambaLRP paper, reproduced (resumable).

    nohup python3 scripts/run_emotion_study.py --model /tmp/train/default --out runs/emotion-study \
        --n 500 --threads 1 > runs/emotion-study.log 2>&1 &
    python3 scripts/run_emotion_study.py --model /tmp/train/default --out runs/emotion-study --n 500 --publish docs

Every option of ``captum-mambalrp compare`` is accepted (defaults: all methods, 500 examples, and
``--data ../shared/data/emotion`` beside the project: this script passes it explicitly, since
``compare`` without ``--data`` uses the package's 96-example demo sample).
``--reference-table`` runs the reference x replacement table instead of one study.
Rerun the same command after an interruption: finished (method, example) pairs are kept.
``--publish DIR`` copies the figures to ``DIR/img/emotion_*.png`` and writes
``DIR/img/emotion_summary.md`` (the study's summary with those image paths).

Options for a GPU (scripts/gpu_deep_study.sh): ``--perturbations-per-eval``,
``--ig-internal-batch``, ``--smoothgrad-per-pass`` (rows per forward of the perturbation
methods, IG and SmoothGrad: batching only, the same numbers), ``--model-forward`` (every
method and curve through the model's own implementation, e.g. mamba-ssm's kernels, instead
of the package's scan), ``--tf32`` (TF32 matrix products), ``--memory-fraction`` (a cap on
this process's share of the GPU's memory, for several processes on one GPU) and
``--finalize-partial`` (compute nothing: write the summary, or the reference table, of the
examples that every method has finished, e.g. after a run stopped by a time limit).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from captum_mambalrp.cli import build_parser, quiet_transformers  # noqa: E402
from captum_mambalrp.cli.compare import build_study, run_table  # noqa: E402
from captum_mambalrp.evaluation.records import ShardedLines  # noqa: E402

SHARED_EMOTION = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data", "emotion")


def publish(out: str, docs: str, figures: dict, markdown: str) -> None:
    """Copy the figures next to the docs and rewrite the summary's image links."""
    img = os.path.join(docs, "img")
    os.makedirs(img, exist_ok=True)
    for name in figures.values():
        shutil.copyfile(os.path.join(out, name), os.path.join(img, f"emotion_{name}"))
        markdown = markdown.replace(f"]({name})", f"](emotion_{name})")
    with open(os.path.join(img, "emotion_summary.md"), "w", encoding="utf-8") as f:
        f.write(markdown)
    print(f"published {len(figures)} figures and emotion_summary.md to {img}")


def complete_examples(folder: str, methods: list) -> list:
    """The example indices of ``folder``'s records that every one of ``methods`` has finished.

    >>> complete_examples("/nonexistent", ["mambalrp"])
    []
    """
    done: dict = {}
    for r in ShardedLines(folder, "results").read():
        done.setdefault(r["index"], set()).add(r["method"])
    want = set(methods)
    return sorted(i for i, ms in done.items() if want <= ms)


def finalize_partial(args, study) -> int:
    """``--finalize-partial``: summaries (and the reference table) of the finished examples only."""
    from dataclasses import replace

    from captum_mambalrp.evaluation.reference_table import (
        default_references,
        expand_methods,
        study_folder,
        write_reference_table,
    )
    from captum_mambalrp.evaluation.summary import summarize

    config = study.config
    if not args.reference_table:
        jobs = [(args.out, config.methods, config.perturbation)]
    else:
        refs = [r.strip() for r in args.references.split(",") if r.strip()] if args.references else None
        refs = refs or default_references(study.tokenizer)
        kinds = [r.strip() for r in args.replacements.split(",") if r.strip()]
        methods = expand_methods(config.methods, refs)
        jobs = [(study_folder(args.out, k), methods, replace(config.perturbation, replacement=k)) for k in kinds]
    written = []
    for folder, methods, perturbation in jobs:
        indices = complete_examples(folder, methods)
        if not indices:
            print(f"{folder}: no example finished by every method; nothing written")
            continue
        summarize(folder, methods, perturbation, {**study.meta, "partial": f"{len(indices)} examples"}, True, indices)
        written.append(perturbation.replacement)
        print(f"{folder}: summary of {len(indices)} examples finished by all {len(methods)} methods")
    if args.reference_table and written:
        write_reference_table(args.out, written, refs, config.perturbation)
    return 0


def main(argv=None) -> int:
    extra = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    extra.add_argument("--publish", default=None, help="docs folder to copy the figures and summary to")
    extra.add_argument("--perturbations-per-eval", type=int, default=None, help="occlusion/KernelShap rows per forward")
    extra.add_argument("--ig-internal-batch", type=int, default=None, help="Integrated Gradients rows per forward")
    extra.add_argument("--smoothgrad-per-pass", type=int, default=None, help="SmoothGrad noise samples per forward")
    extra.add_argument("--model-forward", action="store_true", help="run methods and curves through the model's own forward")
    extra.add_argument("--tf32", action="store_true", help="TF32 matrix products on the GPU")
    extra.add_argument("--memory-fraction", type=float, default=None, help="cap on this process's share of GPU memory")
    extra.add_argument("--finalize-partial", action="store_true", help="summarize the finished examples; compute nothing")
    known, rest = extra.parse_known_args(argv)
    if not any(a == "--data" or a.startswith("--data=") for a in rest):
        rest = ["--data", SHARED_EMOTION, *rest]
    args = build_parser().parse_args(["compare", *rest])
    if not args.out:
        raise SystemExit("--out DIR is required")
    quiet_transformers()
    import torch

    if known.tf32:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if known.memory_fraction and args.device.startswith("cuda") and torch.cuda.is_available():
        from captum_mambalrp.evaluation.distributed import local_device

        device = torch.device(local_device(args.device))  # 'cuda' alone (one process) has no index
        index = device.index if device.index is not None else torch.cuda.current_device()
        torch.cuda.set_per_process_memory_fraction(known.memory_fraction, index)
    overwrite, args.overwrite = args.overwrite, True  # built without the settings check: it follows the changes below
    study = build_study(args)
    args.overwrite = study.overwrite = overwrite
    batching = {
        "perturbations_per_eval": known.perturbations_per_eval,
        "ig_internal_batch_size": known.ig_internal_batch,
        "smoothgrad_samples_per_pass": known.smoothgrad_per_pass,
    }
    from dataclasses import replace

    study.config.options = replace(study.config.options, **{k: v for k, v in batching.items() if v})
    if known.model_forward:
        study.config.package_scan = False
    study._saved_methods = study._check_config()  # config.json records the settings as changed here
    if known.finalize_partial:
        return finalize_partial(args, study)
    if args.reference_table:
        return run_table(args, study)
    summary = study.run(progress=not args.no_progress, figures=not args.no_figures)
    with open(os.path.join(args.out, "summary.md"), encoding="utf-8") as f:
        markdown = f.read()
    print(markdown)
    if known.publish:
        publish(args.out, known.publish, summary.get("figures", {}), markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
