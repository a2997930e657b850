"""``captum-mambalrp dashboard``: a local page comparing MambaLRP with Captum's methods."""

from __future__ import annotations

import argparse
import os
import sys
from typing import List

from . import quiet_transformers


def _examples(path: str) -> List[str]:
    with open(path, encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip()]


def run(args: argparse.Namespace) -> int:
    quiet_transformers()
    from ..dashboard import EXAMPLES, DashboardApp, Explainer, Limits, export_html, load_result_views, load_study, make_server
    from ..models import load_model_and_tokenizer

    saved = load_result_views(args.result) if args.result else []  # saved results (--result FILE), checked first
    model, tokenizer = load_model_and_tokenizer(args.model, device=args.device)
    source = args.model or "embedded default (Emotion classifier)"
    explainer = Explainer(
        model,
        tokenizer,
        source=source,
        composite=args.composite,
        limits=Limits(args.max_chars, args.max_tokens),
        ig_steps=args.ig_steps,
    )
    examples = _examples(args.examples) if args.examples else list(EXAMPLES)
    study = load_study(args.study) if args.study else None
    methods = [m for m in args.methods.split(",") if m]
    if args.export:
        texts = args.text or ([] if saved else examples)
        export_html(explainer, texts, args.export, target=args.target, methods=methods, study=study, results=saved)
        print(f"dashboard with {len(saved) + len(texts)} text(s) written to {os.path.abspath(args.export)} (opens offline)")
        return 0
    server = make_server(DashboardApp(explainer, examples, study, verbose=args.verbose, results=saved), args.host, args.port)
    host, port = server.server_address[:2]
    print(f"MambaLRP dashboard on http://{host}:{port}/  (model: {source}; Ctrl+C to stop)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("stopped", file=sys.stderr)
    finally:
        server.server_close()
    return 0


def register(sub) -> None:
    """Add ``dashboard`` to the ``captum-mambalrp`` sub-commands."""
    p = sub.add_parser("dashboard", help="serve (or export) a page comparing MambaLRP with Captum methods")
    p.add_argument("--model", default=None, help="transformers checkpoint folder or hub id (default: embedded)")
    p.add_argument("--study", default=None, help="a study folder (compare --out DIR): show its table and curves")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (0: any free port)")
    p.add_argument(
        "--export",
        default=None,
        metavar="FILE",
        help="write the view of --text (or the examples) to one self-contained HTML file, no server",
    )
    p.add_argument("--text", action="append", default=None, help="a text for --export (repeat for several)")
    p.add_argument(
        "--result",
        action="append",
        default=None,
        metavar="FILE",
        help="show the saved results of FILE (captum_mambalrp.results.save_results; repeat for several)",
    )
    p.add_argument("--examples", default=None, help="a file of example texts to pick from, one per line")
    p.add_argument("--target", default=None, help="class to explain for --export (default: predicted)")
    p.add_argument(
        "--methods",
        default="input_x_gradient,integrated_gradients,feature_ablation",
        help="methods shown next to MambaLRP, keys of the evaluation registry (compare --list-methods)",
    )
    p.add_argument("--composite", default="mambalrp", help="MambaLRP rule set")
    p.add_argument("--max-chars", type=int, default=2000, help="longest input accepted, in characters")
    p.add_argument("--max-tokens", type=int, default=256, help="longest input accepted, in tokens")
    p.add_argument("--ig-steps", type=int, default=50, help="Integrated Gradients steps")
    p.add_argument("--device", default="cpu")
    p.add_argument("--verbose", action="store_true", help="log each request")
    p.set_defaults(func=run)
