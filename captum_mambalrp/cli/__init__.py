"""``captum-mambalrp``: the command line. Each sub-command is a module of this package
with a ``register(subparsers)`` function."""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import List, Optional

SUBCOMMANDS = ["explain", "compare", "dashboard"]


def quiet_transformers() -> None:
    """No kernel fall-back warnings or loading bars in the command's output."""
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = argparse.ArgumentParser(prog="captum-mambalrp", description="MambaLRP explanations for Mamba models")
    parser.add_argument("--version", action="version", version=f"captum-mambalrp {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in SUBCOMMANDS:
        try:
            module = importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as err:
            if err.name == f"{__name__}.{name}":
                continue  # a sub-command this install does not have
            raise
        module.register(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
