"""One forward and one backward pass with MambaLRP's rules in place.

Relevance at any tensor ``a`` of the forward pass is ``a * g`` where ``g`` is the
gradient of the explained score through the rewritten graph. :func:`relevance_pass`
computes it at several points at once (token embeddings, block outputs, ...), and
always restores the model, also when an error is raised.
"""

from __future__ import annotations

import functools
import inspect
import re
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Set, Tuple

import torch
from torch import Tensor, nn

from ..adapters import Installation, Patcher
from ..adapters.recompute import plan_for, planned
from ..scan.precision import compute_dtype
from .inputs import ForwardCall, caller_level
from .targets import output_scores

Selector = Callable[[Tensor], Tensor]  # scores -> the explained score per example [B]


@dataclass
class Capture:
    """Where relevance is read: a module's output (or input), or the given leaf tensor."""

    module: Optional[nn.Module] = None
    where: str = "output"
    leaf: Optional[Tensor] = None
    tensors: List[Tensor] = field(default_factory=list)

    #: the module ran in the forward pass (its output or input seen, tensors or not)
    ran: bool = False
    #: an input that came as several floating-point keywords, none ``hidden_states``: their names
    keywords: List[str] = field(default_factory=list)

    def _grab(self, value: Any) -> Any:
        """Make ``value`` (a tensor or a tuple holding tensors) part of the graph and keep it.
        A module inside a recomputed mixer runs again in the backward pass: that call makes the
        same graph node but is not kept (the forward pass's tensor is the one read)."""
        if isinstance(value, Tensor):
            # a fresh graph node: gradients reaching it come only from where the module's
            # output is used next, never from uses of the same tensor inside the module
            value = value.view_as(value) if value.requires_grad else value.detach().requires_grad_(True)
            if torch._C._current_graph_task_id() == -1:  # not a recomputation inside the backward pass
                self.tensors.append(value)
            return value
        if isinstance(value, tuple):
            return tuple(self._grab(v) if isinstance(v, Tensor) and v.is_floating_point() else v for v in value)
        raise TypeError(f"cannot read relevance at a {type(value).__name__}; the layer must pass tensors")

    def install(self, patcher: Patcher) -> None:
        if self.module is None:
            return
        if self.where == "output":
            hook = self.module.register_forward_hook(lambda m, args, out: self._seen(out))
        else:
            hook = self.module.register_forward_pre_hook(self._seen_input, with_kwargs=True)
        patcher.add_handle(hook)

    def _seen(self, value: Any) -> Any:
        self.ran = True
        return self._grab(value)

    def _seen_input(self, module: nn.Module, args: tuple, kwargs: dict) -> Tuple[tuple, dict]:
        """The module's input: its first positional argument (alone), else (a call such as
        ``mixer(hidden_states=...)``) its ``hidden_states`` keyword, or its one floating-point
        tensor keyword (with several and none named ``hidden_states``, nothing is read)."""
        if args:  # the first positional argument alone (others, such as a bias, are not the input)
            return self._seen(tuple(args[:1])) + tuple(args[1:]), kwargs
        floats = [k for k, v in kwargs.items() if isinstance(v, Tensor) and v.is_floating_point()]
        key = "hidden_states" if "hidden_states" in kwargs else (floats[0] if len(floats) == 1 else None)
        if key is None:
            self.ran = True
            self.keywords = floats
            return args, kwargs
        return args, {**kwargs, key: self._seen((kwargs[key],))[0]}

    def check_read(self, model: nn.Module, inst: Installation) -> None:
        """After the forward pass: relevance was read here, else say why not.

        Raises:
            ValueError: the module ran but its input (output) holds no floating-point tensor
                (an embedding's token ids), or the rules compute it inside a taken-over module
                without calling it.
            RuntimeError: it did not run.
        """
        if self.tensors or self.module is None:
            return
        kind = type(self.module).__name__
        if self.ran and self.keywords:
            raise ValueError(
                f"the input of {kind} came as keywords {self.keywords}, none named hidden_states: which one is the input "
                "is unclear; read relevance at the module's output (attribute_to_layer_input=False)"
            )
        if self.ran:
            other = "output (attribute_to_layer_input=False)" if self.where == "input" else "input"
            raise ValueError(
                f"the {self.where} of {kind} holds no floating-point tensor (token ids carry no relevance); "
                f"read it at the {other}"
            )
        name = next((n for n, m in model.named_modules() if m is self.module), "")
        owner = inst.owner(name)
        if owner is not None:
            raise ValueError(
                f"{name} ({kind}) did not run in MambaLRP's forward pass: inside {owner or 'the model'} the rules compute "
                "from weights without calling every module (nor may the model's own forward call this one), so "
                f"relevance cannot be read there; read it at {owner or 'the model'} or at a module that runs there "
                "(a mixer's in_proj, conv1d or out_proj)"
            )
        raise RuntimeError(f"{kind} did not run in the forward pass; cannot read relevance there")


#: the hooks a module holds: forward, forward-pre, backward and backward-pre
_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


def hooked_modules(model: nn.Module) -> Dict[int, str]:
    """``id -> name`` of the modules of ``model`` that hold a hook (before MambaLRP adds its own)."""
    return {id(m): n for n, m in model.named_modules() if any(getattr(m, d, None) for d in _HOOK_DICTS)}


@functools.cache
def _class_calls(cls: type, attr: str) -> bool:
    """Does the source of ``cls`` or a base class (not ``nn.Module``) call its child ``attr``?
    (``self.<attr>(``, ``self.<attr>[``, ``self.<attr>.forward(``, ``in self.<attr>``; read once per
    class and name.) True where a source cannot be read."""
    pattern = re.compile(rf"self\.{re.escape(attr)}\s*(\(|\[|\.forward\s*\()|\bin\s+self\.{re.escape(attr)}\b")
    found = False
    for base in cls.__mro__:
        if base in (nn.Module, object):
            continue
        try:
            source = inspect.getsource(base)
        except Exception:  # no file (a class made at run time), a file changed since: assume it calls
            return True
        found = found or pattern.search(source) is not None
    return found


def _model_code_calls(modules: Dict[str, nn.Module], name: str) -> bool:
    """Does the model's own code call module ``name``? Read from the source of its parent's class
    (:func:`_class_calls`; an entry of a ``ModuleList`` counts when its list is called). A call the
    source hides (``getattr``, a helper function, an alias) reads as none."""
    parent_name, _, attr = name.rpartition(".")
    parent = modules.get(parent_name)
    if parent is None:
        return True
    if attr.isdigit():  # an entry of a ModuleList / Sequential: called when its list is
        return _model_code_calls(modules, parent_name) if parent_name else True
    return _class_calls(type(parent), attr)  # type: ignore[arg-type]  # classes hash (mypy: type[Module] not Hashable)


def watch_skipped_hooks(model: nn.Module, hooked: Dict[int, str], inst: Installation, patcher: Patcher) -> Callable[[], None]:
    """Watch the hooked modules (:func:`hooked_modules`) inside taken-over ones; the returned check,
    run after the forward pass, warns of hooks whose modules did not run: the rules compute from
    weights without calling every module. Where the model's own code calls such a module (a Mamba2
    mixer's gated norm in transformers' torch path), its hook acts on ``model(...)`` but not on the
    explained output; modules the model's code never calls (a Mamba1 mixer's ``dt_proj``, read as
    a weight; :func:`_model_code_calls`) are left out. A path of the model's that reads the weight
    instead (transformers' Mamba2 on CUDA reads its norm's) still gets the warning, as a notice.

    Warns (the check):
        UserWarning: the first such module, where its computation is, and how many there are.
    """
    owners = {name: inst.owner(name) for name in hooked.values()}
    watched = {name: owner for name, owner in owners.items() if owner is not None}
    if not watched:  # the usual case: no hook, or none inside a taken-over module
        return lambda: None
    modules = dict(model.named_modules())
    # a module the model's own code never calls either (a Mamba1 mixer's dt_proj, read as a weight):
    # its hook would not run in model(...) either, nothing to say
    watched = {name: owner for name, owner in watched.items() if _model_code_calls(modules, name)}
    ran: Set[str] = set()
    for name in watched:
        patcher.add_handle(modules[name].register_forward_pre_hook(lambda m, args, n=name: ran.add(n)))

    def check() -> None:
        skipped = [name for name in watched if name not in ran]
        if skipped:
            name, owner = skipped[0], watched[skipped[0]] or "the model"
            more = f" (and {len(skipped) - 1} more hooked modules)" if len(skipped) > 1 else ""
            warnings.warn(
                f"{name} ({type(modules[name]).__name__}) has a hook{more} that did not run during attribution: inside "
                f"{owner} MambaLRP's rules compute from weights without calling every module, so the explained output "
                "leaves out whatever such a hook changes; to explain a changed output, hook "
                f"{owner} or a module that runs there (a mixer's in_proj, conv1d or out_proj)",
                stacklevel=caller_level(),
            )

    return check


def relevance_pass(
    model: nn.Module,
    install: Callable[[Patcher], Installation],
    call: ForwardCall,
    select: Selector,
    captures: Sequence[Capture],
    verbose: bool = False,
) -> Tuple[List[Tensor], Tensor]:
    """Relevance ``a * g`` (float32; float64 for a float64 model; padded positions zeroed) at each capture point and the
    explained score per example (``select(scores)``, e.g. a
    :class:`~captum_mambalrp.attribution.targets.TargetSelector`)."""
    patcher = Patcher()
    hooked = hooked_modules(model)  # the user's hooks, before the rules and captures add theirs
    try:
        patcher.freeze_parameters(model)
        patcher.load_offloaded(model)  # accelerate's offloaded weights, for the pass (see Patcher)
        inst = install(patcher)
        if verbose:
            print(inst.table())
        check_hooks = watch_skipped_hooks(model, hooked, inst, patcher)
        for c in captures:
            c.tensors.clear()
            c.ran, c.keywords = False, []
            if c.leaf is not None:
                c.tensors.append(c.leaf)
            c.install(patcher)
        # how recompute="auto" decides; "sequence" wraps the blocks around the mixers (undone by the patcher)
        plan = plan_for(
            model,
            inst.mixers,
            [c.module for c in captures],
            patcher=patcher,
            attention_names=inst.attention,
            layer_names=inst.recomputed_layers,
        )
        with torch.enable_grad(), planned(plan):
            scores = output_scores(call.run(model))
            check_hooks()
            explained = select(scores)
            for c in captures:
                c.check_read(model, inst)
            flat = [t for c in captures for t in c.tensors]
            grads = torch.autograd.grad(explained.sum(), flat, allow_unused=True)
    finally:
        patcher.restore()
    results, k = [], 0
    for c in captures:
        parts = []
        for t in c.tensors:
            g = grads[k]
            k += 1
            cd = compute_dtype(t)
            parts.append(t.detach().to(cd) * (torch.zeros_like(t, dtype=cd) if g is None else g.to(cd)))
        total = parts[0]
        for r in parts[1:]:
            total = total + r
        if call.mask is not None and total.dim() >= 2 and tuple(total.shape[:2]) == tuple(call.mask.shape):
            total = total * call.mask.to(total.dtype).reshape(*call.mask.shape, *([1] * (total.dim() - 2)))
        results.append(total)
    return results, explained.detach().to(compute_dtype(explained))
