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
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from captum_mambalrp.cli import build_parser, quiet_transformers  # noqa: E402
from captum_mambalrp.cli.compare import build_study, run_table  # noqa: E402

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


def main(argv=None) -> int:
    extra = argparse.ArgumentParser(add_help=False)
    extra.add_argument("--publish", default=None, help="docs folder to copy the figures and summary to")
    known, rest = extra.parse_known_args(argv)
    if not any(a == "--data" or a.startswith("--data=") for a in rest):
        rest = ["--data", SHARED_EMOTION, *rest]
    args = build_parser().parse_args(["compare", *rest])
    if not args.out:
        raise SystemExit("--out DIR is required")
    quiet_transformers()
    study = build_study(args)
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
