"""Reversible, per-instance changes to a model (never to its classes or modules)."""

from __future__ import annotations

from typing import Callable, List

from torch import nn
from torch.utils.hooks import RemovableHandle

_MISSING = object()


class Patcher:
    """Records every change made to a model so that :meth:`restore` undoes all of them.

    Only instances are touched: a forward method is replaced by setting the instance
    attribute ``forward`` (the class keeps its own), hooks are registered through
    handles, and ``requires_grad`` flags are saved before they change. ``restore``
    runs in reverse order and is safe to call twice.
    """

    def __init__(self) -> None:
        self._undo: List[Callable[[], None]] = []

    def replace_forward(self, module: nn.Module, forward: Callable) -> None:
        previous = module.__dict__.get("forward", _MISSING)
        module.forward = forward  # type: ignore[method-assign]

        def undo() -> None:
            if previous is _MISSING:
                module.__dict__.pop("forward", None)
            else:
                module.forward = previous  # type: ignore[method-assign]

        self._undo.append(undo)

    def add_handle(self, handle: RemovableHandle) -> None:
        self._undo.append(handle.remove)

    def add_undo(self, undo: Callable[[], None]) -> None:
        """Run ``undo`` on :meth:`restore` (in reverse order with the other changes)."""
        self._undo.append(undo)

    def freeze_parameters(self, model: nn.Module) -> None:
        """Turn off ``requires_grad`` on every parameter (relevance needs no weight grads)."""
        saved = [(p, p.requires_grad) for p in model.parameters()]
        for p, _ in saved:
            p.requires_grad_(False)

        def undo() -> None:
            for p, flag in saved:
                p.requires_grad_(flag)

        self._undo.append(undo)

    def restore(self) -> None:
        while self._undo:
            self._undo.pop()()
