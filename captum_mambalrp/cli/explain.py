"""``captum-mambalrp explain``: a prediction's token relevance, in colour and as HTML."""

from __future__ import annotations

import argparse
import json
import os
import sys

from . import quiet_transformers


def run(args: argparse.Namespace) -> int:
    import torch

    quiet_transformers()
    from ..attribution import MambaLRP
    from ..models import load_model_and_tokenizer
    from ..text import explain_texts, records
    from ..visualization import captum_html, terminal_heatmap

    model, tokenizer = load_model_and_tokenizer(args.model, device=args.device)
    lrp = MambaLRP(model, composite=args.composite)
    target = int(args.target) if args.target is not None and args.target.lstrip("-").isdigit() else args.target
    explanations = explain_texts(model, tokenizer, args.text, target=target, lrp=lrp)
    color = not args.no_color and (sys.stdout.isatty() or args.color)
    source = args.model or "embedded default (Emotion classifier)"
    print(f"model: {source}   rules: {args.composite}")
    for e in explanations:
        print()
        print(f"text:       {e.text}")
        print(f"prediction: {e.pred_label} (p={e.pred_prob:.3f})")
        print(
            f"explained:  logit of {e.target_label!r} at position {e.position} = {e.explained:.4f}"
            f"   sum of relevance = {float(e.relevance.sum()):.4f}   delta = {e.delta:.2e}"
        )
        print(terminal_heatmap(e.tokens, e.relevance, color=color))
        top = torch.argsort(e.relevance.abs(), descending=True)[: args.top]
        print("most relevant: " + ", ".join(f"{e.tokens[i]} {float(e.relevance[i]):+.3f}" for i in top))
    if args.html:
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
    ex = sub.add_parser("explain", help="explain the prediction for one or more texts")
    ex.add_argument("text", nargs="+", help="text(s) to explain")
    ex.add_argument("--model", default=None, help="transformers checkpoint folder or hub id (default: embedded)")
    ex.add_argument("--target", default=None, help="class name, class index or token to explain (default: predicted)")
    ex.add_argument("--composite", default="mambalrp", help="rule set: mambalrp, gradient, ln_only, no_<kind>_rule")
    ex.add_argument("--html", default="mambalrp_explanation.html", help="write Captum's HTML view here ('' to skip)")
    ex.add_argument("--json", default=None, help="also write the relevance as JSON")
    ex.add_argument("--top", type=int, default=5, help="list this many most relevant tokens")
    ex.add_argument("--device", default="cpu")
    ex.add_argument("--color", action="store_true", help="colour even when not writing to a terminal")
    ex.add_argument("--no-color", action="store_true")
    ex.set_defaults(func=run)
