"""transformers' torch path for a model that is not on CUDA, also where mamba-ssm is installed.

transformers 5.2x binds its Mamba kernels at import: a modeling module's scan, conv and decode
functions (``use_kernel_func_from_hub_with_fallback``) call mamba-ssm's or causal-conv1d's CUDA
functions whenever those packages are installed, whatever the device of the tensors. So on a
machine with mamba-ssm, a CPU copy of a transformers Mamba, Mamba2 or FalconMamba model fails in
its own forward (``Expected u.is_cuda() to be true``; a Mamba2 model: ``Pointer argument ...
cannot be accessed from Triton``). That forward is what Captum's perturbation methods, the
explained scores of :mod:`captum_mambalrp.llm` and a CPU reference on a GPU machine run.

:func:`torch_path` swaps each such function of the given modeling modules for the torch
definition it wraps (kept as ``__wrapped__`` by ``functools.wraps``) and turns older releases'
fast-path switches off, then puts everything back; :func:`off_cuda` does so for the modules of one
model when its weights are not on CUDA. The swap changes module attributes for the whole process
while it lasts (blocks in several threads share it: the last to leave restores), so a CUDA model
of the same family running at that moment in another thread would take the torch path too
(slower, same values).

Decision: transformers has no device check there, so the package makes its own model calls take
the torch path off CUDA (docs/compatibility.md, "A CPU model on a machine with mamba-ssm").
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import sys
import threading
import types
from typing import Dict, Iterable, Iterator, List, Optional, Tuple

from torch import nn

#: transformers' fast-path switches and kernel entry points of the releases before the wrappers
KERNEL_NAMES = (
    "is_fast_path_available",
    "causal_conv1d_fn",
    "causal_conv1d_update",
    "mamba_chunk_scan_combined",
    "mamba_split_conv1d_scan_combined",
    "selective_scan_fn",
    "mamba_inner_fn",
    "selective_state_update",
)

#: the modules :func:`torch_path` takes when given none
MAMBA_MODULES = ("mamba", "mamba2", "falcon_mamba")


def kernel_wrapped(value: object, module: types.ModuleType) -> bool:
    """Is ``value`` a function of ``module`` that transformers wrapped to call a kernel package
    when installed (its torch definition kept as ``__wrapped__``)? Deliberately broad: in a few
    other model families it also matches a cached or script-if-tracing helper, which runs
    undecorated for the block (same values)."""
    return callable(value) and hasattr(value, "__wrapped__") and getattr(value, "__module__", None) == module.__name__


def modeling_modules(model: nn.Module) -> List[types.ModuleType]:
    """The transformers modeling modules that define ``model``'s submodules (``modeling_mamba``,
    ``modeling_nemotron_h``, ...), each once."""
    names = {type(m).__module__ for m in model.modules()}
    return [sys.modules[n] for n in sorted(names) if n.startswith("transformers.models.") and n in sys.modules]


#: the modules on the torch path now: name -> (blocks inside, the attributes as they were)
_HELD: Dict[str, Tuple[int, List[Tuple[str, object]]]] = {}
_LOCK = threading.Lock()


def _swap(mod: types.ModuleType) -> List[Tuple[str, object]]:
    """Point ``mod``'s kernel wrappers at their torch definitions; the attributes as they were."""
    saved: List[Tuple[str, object]] = []
    for attr, value in list(vars(mod).items()):
        if kernel_wrapped(value, mod):
            saved.append((attr, value))
            setattr(mod, attr, inspect.unwrap(value))  # type: ignore[arg-type]
    for attr in KERNEL_NAMES:  # older releases: a switch, and kernel functions imported as such
        value = getattr(mod, attr, None)
        if any(a == attr for a, _ in saved) or not value:
            continue
        if attr != "is_fast_path_available" and str(getattr(value, "__module__", "")).startswith("transformers"):
            continue  # transformers' own definition: a torch path already
        saved.append((attr, value))
        setattr(mod, attr, False if attr == "is_fast_path_available" else None)
    return saved


def _enter(mod: types.ModuleType) -> int:
    with _LOCK:
        count, saved = _HELD.get(mod.__name__, (0, []))
        if count == 0:
            saved = _swap(mod)
        _HELD[mod.__name__] = (count + 1, saved)
        return len(saved)


def _leave(mod: types.ModuleType) -> None:
    with _LOCK:
        count, saved = _HELD.pop(mod.__name__)
        if count > 1:
            _HELD[mod.__name__] = (count - 1, saved)
            return
        for attr, value in reversed(saved):
            setattr(mod, attr, value)


@contextlib.contextmanager
def torch_path(modules: Optional[Iterable[types.ModuleType]] = None) -> Iterator[int]:
    """Within the block, ``modules`` (default: transformers' Mamba, Mamba2 and FalconMamba
    modeling modules) call their torch definitions instead of kernel packages; yields how many
    attributes are swapped. Restored on exit, also after an exception. Blocks may nest and
    overlap across threads: a module is swapped by the first block that enters it and restored
    by the last that leaves it.

    >>> import transformers.models.mamba.modeling_mamba as m
    >>> with torch_path([m]) as swapped:
    ...     swapped > 0
    True
    """
    if modules is None:
        found = []
        for name in MAMBA_MODULES:
            try:
                found.append(importlib.import_module(f"transformers.models.{name}.modeling_{name}"))
            except ImportError:
                continue
        modules = found
    entered: List[types.ModuleType] = []
    swapped = 0
    try:
        for mod in modules:
            swapped += _enter(mod)
            entered.append(mod)
        yield swapped
    finally:
        for mod in reversed(entered):
            _leave(mod)


def _on_cuda(model: nn.Module) -> bool:
    first = next(model.parameters(), None)
    return first is not None and first.device.type == "cuda"


@contextlib.contextmanager
def off_cuda(model: nn.Module) -> Iterator[bool]:
    """:func:`torch_path` for ``model``'s modeling modules when its weights are not on CUDA (a
    no-op on CUDA, where the kernels are the fast path); yields whether it swapped anything."""
    if _on_cuda(model):
        yield False
        return
    modules = modeling_modules(model)
    if not modules:
        yield False
        return
    with torch_path(modules) as swapped:
        yield swapped > 0


def call_off_cuda(model: nn.Module, *args, **kwargs):
    """``model(*args, **kwargs)``, on transformers' torch path when ``model`` is not on CUDA."""
    with off_cuda(model):
        return model(*args, **kwargs)


__all__ = ["KERNEL_NAMES", "call_off_cuda", "kernel_wrapped", "modeling_modules", "off_cuda", "torch_path"]
