"""``captum-mambalrp longrange``: needle-in-a-haystack inputs, the model's accuracy and the
needle's share of relevance by distance (:mod:`captum_mambalrp.evaluation.longrange`)."""

from __future__ import annotations

import argparse
import os
from typing import List

from . import quiet_transformers
from .bias import add_model_arguments, load_for, recompute_value


def int_list(text: str) -> List[int]:
    """``"128,512,2048"`` (also ``2K``, ``64k``) as integers.

    >>> int_list("128, 2K")
    [128, 2048]
    """
    out = []
    for part in text.split(","):
        part = part.strip().lower()
        if not part:
            continue
        scale = 1024 if part.endswith("k") else 1
        try:
            out.append(int(part.rstrip("k")) * scale)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a comma list of integers (e.g. 128,512,2K)") from None
    if not out:
        raise argparse.ArgumentTypeError("give at least one integer")
    return out


def run(args: argparse.Namespace) -> int:
    from ..evaluation.longrange import LongRangeConfig, LongRangeStudy

    quiet_transformers()
    config = LongRangeConfig(
        lengths=args.lengths,
        distances=args.distances,
        n_distances=args.n_distances,
        n_needles=args.needles,
        needle_max_tokens=args.needle_max_tokens,
        filler=args.filler,
        filler_token=args.filler_token,
        seed=args.seed,
        batch_size=args.batch_size,
        composite=args.composite,
        backend=args.backend,
        recompute=recompute_value(args.recompute),
        cuda_graph=args.cuda_graph,
    )
    config.check()
    model, tokenizer, texts, labels, names, meta = load_for(args, dtype=args.dtype)
    study = LongRangeStudy(
        model, tokenizer, texts, labels, config, args.out, class_names=names, meta=meta, overwrite=args.overwrite
    )
    study.run(progress=not args.no_progress, figures=not args.no_figures)
    with open(os.path.join(args.out, "longrange.md"), encoding="utf-8") as f:
        print(f.read())
    figures = "" if args.no_figures else ", longrange.png"
    print(f"results in {os.path.abspath(args.out)} (longrange.md, longrange.json, longrange.csv, per_input.csv{figures})")
    return 0


def register(sub) -> None:
    """Add ``longrange`` to the ``captum-mambalrp`` sub-commands."""
    p = sub.add_parser(
        "longrange",
        help="needle in a haystack: accuracy and relevance on the needle by its distance from the end",
        description=(
            "Place short correctly classified examples (needles) at controlled distances from the end of long "
            "filler text; report the model's accuracy and the needle's share of MambaLRP relevance by distance."
        ),
    )
    add_model_arguments(p)
    p.add_argument("--lengths", type=int_list, default=[256], help="input lengths in tokens, e.g. 128,512,2K (default 256)")
    p.add_argument(
        "--distances", type=int_list, default=None, help="needle distances from the end (default: 0 and a geometric grid)"
    )
    p.add_argument("--n-distances", type=int, default=8, help="points of the default distance grid")
    p.add_argument("--needles", type=int, default=32, help="needles (short examples classified correctly alone)")
    p.add_argument("--needle-max-tokens", type=int, default=24, help="the longest needle")
    p.add_argument(
        "--filler",
        default="other",
        choices=["other", "any", "token"],
        help="haystack: examples of other classes (default), any examples, or one repeated token",
    )
    p.add_argument("--filler-token", type=int, default=None, help="token id of --filler token (default: the unknown token)")
    p.add_argument("--batch-size", type=int, default=8, help="inputs per MambaLRP pass (1 for very long inputs)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"], help="model weights' dtype")
    p.add_argument("--cuda-graph", action="store_true", help="replay recorded CUDA graphs (GPU, repeated shapes)")
    p.set_defaults(func=run)
