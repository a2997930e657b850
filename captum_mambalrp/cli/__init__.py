"""``captum-mambalrp``: the command line. Each sub-command is a module of this package
with a ``register(subparsers)`` function.

Errors: a mistake in what the user gave (an empty text, a missing file, an unknown
method, label or composite, a model that is not a Mamba model, a port in use) prints one
line ``captum-mambalrp: error: ...`` and exits with status 2; a failure while running
(out of memory, a bug) prints its cause in one line and exits with status 1. ``--debug``
(anywhere on the command line) prints the traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback
from typing import List, NoReturn, Optional

SUBCOMMANDS = ["explain", "compare", "dashboard", "bias", "longrange"]
PROG = "captum-mambalrp"


class UsageError(Exception):
    """A mistake in the command's input: the CLI prints its message in one line and exits 2.

    >>> str(UsageError("no such file: x.csv"))
    'no such file: x.csv'
    """


DEVICE_HELP = "where the model runs: cpu (default), cuda, cuda:N or mps (a GPU needs a torch built for it)"


def check_device(device: str) -> None:
    """``--device`` names a device this torch can use (else a user error naming the fix), checked
    before any model is loaded.

    Raises:
        UsageError: not a device name, or a device this torch or this machine does not have.

    >>> check_device("cpu")
    """
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise UsageError(f"--device {device!r} is not a device; give cpu, cuda, cuda:N or mps") from None
    build = f"torch {torch.__version__}"
    if dev.type == "cpu":
        return
    if dev.type == "cuda":
        if torch.version.cuda is None and getattr(torch.version, "hip", None) is None:
            raise UsageError(
                f"--device {device}: this torch has no CUDA ({build}); use --device cpu, or install a CUDA build of torch"
            )
        if not torch.cuda.is_available():
            raise UsageError(
                f"--device {device}: {build} finds no CUDA GPU (no driver, or CUDA_VISIBLE_DEVICES hides them); use --device cpu"
            )
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise UsageError(f"--device {device}: this machine has {count} CUDA GPU(s), cuda:0..cuda:{count - 1}")
        return
    backend = getattr(torch.backends, dev.type, None) if dev.type == "mps" else getattr(torch, dev.type, None)
    available = getattr(backend, "is_available", None)
    if not callable(available):
        raise UsageError(f"--device {device}: the commands run on cpu, cuda, cuda:N or mps, not {dev.type}")
    if not available():
        raise UsageError(f"--device {device}: this torch cannot use {dev.type} here ({build}); use --device cpu")


def user_errors() -> tuple:
    """The exceptions the library raises for bad input (a wrong value, a missing file, a model
    MambaLRP has no rule for): reported as user errors (exit 2); anything else is a runtime
    failure (exit 1)."""
    from ..adapters import UnsupportedModelError

    return (
        UsageError,
        UnsupportedModelError,
        ValueError,
        IndexError,
        KeyError,
        FileNotFoundError,
        NotADirectoryError,
        IsADirectoryError,
        PermissionError,
    )


class Parser(argparse.ArgumentParser):
    """``argparse`` with one-line errors (``captum-mambalrp: error: ...``, exit 2)."""

    def error(self, message: str) -> NoReturn:
        hint = f" (see {self.prog} --help)"
        fail(f"{message}{hint}", 2)


def one_line(message: object) -> str:
    """The message with its whitespace (newlines included) collapsed to single spaces.

    >>> one_line("a\\n  b")
    'a b'
    """
    return " ".join(str(message).split())


def fail(message: str, code: int) -> NoReturn:
    """Print ``captum-mambalrp: error: MESSAGE`` on stderr and exit with ``code``."""
    print(f"{PROG}: error: {one_line(message)}", file=sys.stderr, flush=True)
    sys.exit(code)


def quiet_transformers() -> None:
    """No kernel fall-back warnings or loading bars in the command's output."""
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    except ImportError:  # pragma: no cover - older huggingface_hub
        pass


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = Parser(prog=PROG, description="MambaLRP explanations for Mamba models")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for name in SUBCOMMANDS:
        try:
            module = importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as err:
            if err.name == f"{__name__}.{name}":
                continue  # a sub-command this install does not have
            raise
        module.register(sub)
        # --debug after the sub-command too; SUPPRESS keeps a --debug given before it
        sub.choices[name].add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return parser


def describe(err: BaseException) -> str:
    """``Type: message`` for a runtime failure (the type tells what broke)."""
    text = one_line(err)
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def main(argv: Optional[List[str]] = None) -> int:
    """Run ``captum-mambalrp ARGS``; returns the exit status (0 when it worked)."""
    args = build_parser().parse_args(argv)
    debug = bool(getattr(args, "debug", False))
    try:
        if getattr(args, "device", None) is not None:
            check_device(args.device)  # every sub-command with --device: before any model is loaded
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        if debug:
            traceback.print_exc()
        fail("interrupted", 130)
    except Exception as err:
        if debug:
            traceback.print_exc()
        if isinstance(err, user_errors()):
            message = one_line(err.args[0]) if isinstance(err, KeyError) and err.args else one_line(err)
            fail(message or type(err).__name__, 2)
        fail(f"{describe(err)} (run again with --debug for the traceback)", 1)  # a runtime failure: its cause


if __name__ == "__main__":
    sys.exit(main())
