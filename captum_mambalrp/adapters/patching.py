"""Reversible, per-instance changes to a model (never to its classes or modules).

The changes compose with accelerate's hooks (``accelerate.hooks.add_hook_to_module``, used by
``dispatch_model``, ``cpu_offload`` and ``device_map=...`` loading), which also wrap a
module's ``forward``: they keep the module's own forward as the instance attribute
``_old_forward`` and set ``forward`` to a wrapper that runs the hook around it (moving
inputs and weights to the execution device, loading offloaded weights). On such a module
:meth:`Patcher.replace_forward` replaces ``_old_forward``, so the hook keeps running around
MambaLRP's forward, and puts it back exactly.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Tuple

import torch  # noqa: F401  (the doctest)
from torch import nn
from torch.utils.hooks import RemovableHandle

_MISSING = object()
_Slot = Tuple[nn.Module, str, Any]  # where a tensor lives: owner module, "_parameters"/"_buffers", the tensor


def forward_attribute(module: nn.Module) -> str:
    """The instance attribute that holds ``module``'s own forward: ``"_old_forward"`` under an
    accelerate hook, else ``"forward"``.

    >>> forward_attribute(nn.Linear(2, 2))
    'forward'
    """
    hooked = "_hf_hook" in module.__dict__ and "_old_forward" in module.__dict__
    return "_old_forward" if hooked else "forward"


def _align_hooks(module: nn.Module) -> List[Any]:
    """accelerate's ``AlignDevicesHook``s on ``module`` (inside a ``SequentialHook`` too) that offload weights."""
    hook = module.__dict__.get("_hf_hook")
    if hook is None:
        return []
    hooks = list(getattr(hook, "hooks", [hook]))
    return [h for h in hooks if type(h).__name__ == "AlignDevicesHook" and getattr(h, "offload", False)]


class Patcher:
    """Records every change made to a model so that :meth:`restore` undoes all of them.

    Only instances are touched: a forward method is replaced by setting the instance
    attribute ``forward`` (``_old_forward`` under an accelerate hook; the class keeps its
    own), hooks are registered through handles, and ``requires_grad`` flags are saved
    before they change. ``restore`` runs in reverse order and is safe to call twice.

    >>> layer = nn.Linear(2, 2)
    >>> patcher = Patcher()
    >>> patcher.replace_forward(layer, lambda x: 2 * x)
    >>> float(layer(torch.ones(1, 2)).sum())
    4.0
    >>> patcher.restore()
    >>> "forward" in layer.__dict__
    False
    """

    def __init__(self) -> None:
        self._undo: List[Callable[[], None]] = []

    def inner_forward(self, module: nn.Module) -> Callable:
        """The module's forward without accelerate's hook around it (``module.forward`` when it has none)."""
        return getattr(module, forward_attribute(module))

    def replace_forward(self, module: nn.Module, forward: Callable) -> None:
        """Make ``forward`` the module's forward (inside accelerate's hook, when it has one)."""
        attr = forward_attribute(module)
        previous = module.__dict__.get(attr, _MISSING)
        setattr(module, attr, forward)

        def undo() -> None:
            if previous is _MISSING:
                module.__dict__.pop(attr, None)
            else:
                setattr(module, attr, previous)

        self._undo.append(undo)

    def wrap_forward(self, module: nn.Module, wrap: Callable[[Callable], Callable]) -> None:
        """Replace the module's (inner) forward ``f`` by ``wrap(f)``."""
        self.replace_forward(module, wrap(self.inner_forward(module)))

    def load_offloaded(self, model: nn.Module) -> int:
        """Load the weights that accelerate offloads (``cpu_offload``, ``disk_offload``,
        ``dispatch_model`` with ``"cpu"``/``"disk"`` entries) onto their execution device until
        :meth:`restore`; returns how many modules had offloaded weights.

        An offloading hook loads a module's weights before its forward and drops them after;
        MambaLRP's forwards read weights directly (not only through module calls) and the
        backward pass needs every layer's weights again, which autograd keeps alive anyway:
        so the weights are loaded once for the whole pass (the peak memory of a forward and
        backward with the weights loaded layer by layer is the same). :meth:`restore` drops
        them (back to the ``meta`` device, the hooks' own way) and puts back the very tensor
        objects the model had.
        """
        count = 0
        for module in model.modules():
            for hook in _align_hooks(module):
                from accelerate.utils import named_module_tensors

                names = [
                    n
                    for n, _ in named_module_tensors(
                        module, include_buffers=hook.offload_buffers, recurse=hook.place_submodules, remove_non_persistent=True
                    )
                ]
                saved = {n: _get_tensor(module, n) for n in names}
                input_device = hook.__dict__.get("input_device", _MISSING)
                hook.pre_forward(module)
                hook.offload = False

                self._undo.append(_offload_again(module, hook, saved, input_device))
                count += 1
        return count

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


def _get_tensor(module: nn.Module, name: str) -> _Slot:
    """``(owner module, "_parameters" or "_buffers", the tensor object)`` of a dotted tensor name."""
    *path, leaf = name.split(".")
    owner = module.get_submodule(".".join(path)) if path else module
    kind = "_parameters" if leaf in owner._parameters else "_buffers"
    return owner, kind, getattr(owner, kind)[leaf]


def _offload_again(
    module: nn.Module, hook: Any, saved: Dict[str, Tuple[nn.Module, str, Any]], input_device: Any
) -> Callable[[], None]:
    """The undo of :meth:`Patcher.load_offloaded` for one hook: offload as the hook does, then put
    back the tensor objects (and the hook's ``input_device``) the module had."""

    def undo() -> None:
        hook.offload = True
        hook.post_forward(module, None)
        for name, (owner, kind, tensor) in saved.items():
            getattr(owner, kind)[name.rsplit(".", 1)[-1]] = tensor
        if input_device is _MISSING:
            hook.__dict__.pop("input_device", None)
        else:
            hook.input_device = input_device

    return undo
