"""``captum-mambalrp dashboard``: a local page comparing MambaLRP with Captum's methods."""

from __future__ import annotations

import argparse
import errno
import os
import socket
import sys
from typing import List

from . import DEVICE_HELP, UsageError, quiet_transformers


def _examples(path: str) -> List[str]:
    if not os.path.isfile(path):
        raise UsageError(f"--examples: no such file: {path}")
    with open(path, encoding="utf-8") as f:
        examples = [line.strip() for line in f if line.strip()]
    if not examples:
        raise UsageError(f"--examples: {path} has no texts (one per line)")
    return examples


def check_port(host: str, port: int) -> None:
    """Fail early, before the model loads, when ``host:port`` cannot be bound.

    Raises:
        UsageError: the port is in use, needs privileges, or the address is not this machine's.
    """
    if port == 0:
        return
    if not 0 < port < 65536:
        raise UsageError(f"--port {port} is not a port number (1-65535, or 0 for any free port)")
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server does
            probe.bind((host, port))
    except OSError as err:
        raise UsageError(bind_error(err, host, port)) from None


def bind_error(err: OSError, host: str, port: int) -> str:
    """One line on why ``host:port`` cannot be bound, and what to do."""
    if err.errno == errno.EADDRINUSE:
        return f"port {port} on {host} is in use (another dashboard?): pick another with --port N, or --port 0 for any free port"
    if err.errno == errno.EACCES:
        return f"port {port} needs administrator rights: pick one above 1023 with --port N"
    return f"cannot listen on {host}:{port} ({err.strerror or err}): check --host and --port"


def _check_methods(methods: List[str]) -> None:
    from ..evaluation import METHODS

    for m in methods:
        if m not in METHODS:
            raise UsageError(f"unknown method {m!r} in --methods; choose among: {', '.join(METHODS)}")


def run(args: argparse.Namespace) -> int:
    from .explain import check_composite, check_output_path, make_lrp

    check_composite(args.composite)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    _check_methods(methods)
    if args.study and not os.path.isdir(args.study):
        raise UsageError(f"--study: no such folder: {args.study} (a folder written by compare --out DIR)")
    if args.export:
        check_output_path(args.export, "--export")
    else:
        check_port(args.host, args.port)
    given_examples = _examples(args.examples) if args.examples else None
    quiet_transformers()
    from ..dashboard import EXAMPLES, DashboardApp, Explainer, Limits, export_html, load_result_views, load_study, make_server
    from ..models import load_model_and_tokenizer

    saved = load_result_views(args.result) if args.result else []  # saved results (--result FILE), checked first
    model, tokenizer = load_model_and_tokenizer(args.model, device=args.device)
    make_lrp(model, args.model or "the model", args.composite)  # a model MambaLRP cannot explain: one line
    source = args.model or "embedded default (Emotion classifier)"
    explainer = Explainer(
        model,
        tokenizer,
        source=source,
        composite=args.composite,
        limits=Limits(args.max_chars, args.max_tokens),
        ig_steps=args.ig_steps,
    )
    examples = given_examples or list(EXAMPLES)
    study = load_study(args.study) if args.study else None
    if args.export:
        texts = args.text or ([] if saved else examples)
        export_html(explainer, texts, args.export, target=args.target, methods=methods, study=study, results=saved)
        print(f"dashboard with {len(saved) + len(texts)} text(s) written to {os.path.abspath(args.export)} (opens offline)")
        return 0
    try:
        server = make_server(DashboardApp(explainer, examples, study, verbose=args.verbose, results=saved), args.host, args.port)
    except OSError as err:  # taken between the check and now
        raise UsageError(bind_error(err, args.host, args.port)) from None
    host, port = server.server_address[:2]
    print(f"MambaLRP dashboard on http://{host!s}:{port}/  (model: {source}; Ctrl+C to stop)", flush=True)
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
    p.add_argument("--device", default="cpu", help=DEVICE_HELP)
    p.add_argument("--verbose", action="store_true", help="log each request")
    p.set_defaults(func=run)
