"""Fault injection: an attribution interrupted anywhere leaves nothing behind.

Faults (drawn by hypothesis over a fixed, derandomized budget): an exception raised in the
forward of a random module (a forward hook raising), in the backward of a random module (a
custom autograd Function on its output raising in ``backward``), in a mixer's submodule
whose forward is patched to raise, a ``KeyboardInterrupt``, a simulated out-of-memory error
(``torch.OutOfMemoryError``, forward or backward), with or without recompute (where a
forward fault then fires inside the backward's recomputation). After each:

- the model is bit-identical: state_dict tensors (``torch.equal``), parameter objects,
  forward methods in each instance ``__dict__``, every hook dict, train/eval modes,
  ``requires_grad``, grads, ``module.rule``;
- no global state leaks: grad mode, inference mode, autocast, default dtype, torch's global
  module hooks, saved-tensor hooks, the package's registries (adapters, composites, the
  backend recorders), Captum's global state;
- the next attribution works and gives the same relevance as before the fault (``torch.equal``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict

import pytest
import torch
from conftest import make_lm, zero_biases
from test_api import assert_unchanged, snapshot
from torch import nn

from captum_mambalrp import LayerMambaLRP, MambaLRP

hypothesis = pytest.importorskip("hypothesis", reason="pip install hypothesis (the test extra installs it)")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

FAULTS = ("forward", "backward", "submodule", "keyboard_interrupt", "oom_forward", "oom_backward")
INJECTED: Dict[str, int] = {}


class Boom(RuntimeError):
    """The injected error."""


def oom_error() -> BaseException:
    cls = getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError
    return cls("CUDA out of memory. Tried to allocate 20.00 GiB (simulated)")


class _RaiseInBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, error):
        ctx.error = error
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        raise ctx.error


def full_snapshot(model: nn.Module) -> Dict[str, Any]:
    """test_api's snapshot, plus each module's instance __dict__ keys and forward, parameter objects
    and every hook dict torch keeps."""
    snap = snapshot(model)
    snap["dict"] = {n: sorted(m.__dict__) for n, m in model.named_modules()}
    snap["params"] = {n: id(p) for n, p in model.named_parameters()}
    snap["all_hooks"] = {
        n: tuple(
            dict(getattr(m, attr, {}))
            for attr in (
                "_forward_hooks",
                "_forward_hooks_with_kwargs",
                "_forward_hooks_always_called",
                "_forward_pre_hooks",
                "_forward_pre_hooks_with_kwargs",
                "_backward_hooks",
                "_backward_pre_hooks",
                "_state_dict_hooks",
                "_load_state_dict_pre_hooks",
            )
        )
        for n, m in model.named_modules()
    }
    return snap


def assert_same(model: nn.Module, before: Dict[str, Any]) -> None:
    assert_unchanged(model, before)
    after = full_snapshot(model)
    for key in ("dict", "params", "all_hooks"):
        assert after[key] == before[key], key


def _autocast_state() -> tuple:
    try:
        return (torch.is_autocast_enabled("cpu"), torch.is_autocast_enabled("cuda"))
    except TypeError:  # torch < 2.4
        return (torch.is_autocast_cpu_enabled(), torch.is_autocast_enabled())


def global_state() -> Dict[str, Any]:
    import captum_mambalrp.scan as scan
    from captum_mambalrp.adapters import ADAPTERS
    from captum_mambalrp.rules.composites import COMPOSITES

    module_globals = torch.nn.modules.module
    state = {
        "grad": torch.is_grad_enabled(),
        "inference": torch.is_inference_mode_enabled(),
        "autocast": _autocast_state(),
        "default_dtype": torch.get_default_dtype(),
        "anomaly": torch.is_anomaly_enabled(),
        "deterministic": torch.are_deterministic_algorithms_enabled(),
        "adapters": [id(a) for a in ADAPTERS],
        "composites": {k: id(v) for k, v in COMPOSITES.items()},
        "recorders": len(getattr(scan, "_RECORDERS", [])),
    }
    for name in dir(module_globals):
        if name.startswith("_global_") and isinstance(getattr(module_globals, name), dict):
            state[name] = dict(getattr(module_globals, name))
    try:  # saved-tensor hooks left pushed (checkpointing) would change every later backward
        with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
            pass
        state["saved_tensor_hooks"] = torch._C._autograd._top_saved_tensors_default_hooks(False)
    except (AttributeError, TypeError):
        pass
    return state


@dataclasses.dataclass
class Fault:
    kind: str
    module: int  # index into the model's modules that run in the forward
    recompute: bool
    layer_api: bool  # LayerMambaLRP instead of MambaLRP


@st.composite
def faults(draw) -> Fault:
    return Fault(
        kind=draw(st.sampled_from(FAULTS)),
        module=draw(st.integers(0, 10_000)),
        recompute=draw(st.booleans()),
        layer_api=draw(st.booleans()),
    )


@pytest.fixture(scope="module")
def setting():
    model = zero_biases(make_lm("mamba", seed=21, num_hidden_layers=3))
    ids = torch.randint(1, 64, (2, 6), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    model.backbone.layers[0].mixer.x_proj.weight.requires_grad_(False)  # a user's own choices, kept
    model.lm_head.weight.grad = torch.randn_like(model.lm_head.weight)
    model.backbone.norm_f.register_forward_hook(lambda *a: None)
    # where a fault fires: the modules that run in the attribution's forward, and (per API) those
    # whose output the backward reaches (MambaLRP's rules detach some, e.g. the scan's dt, B, C)
    forward_modules, backward_modules = {}, {False: {}, True: {}}
    for layer_api in (False, True):

        def record(module, args, out, layer_api=layer_api):
            forward_modules[module] = None
            t = _main_tensor(out)
            if t is not None and t.requires_grad:
                t.register_hook(lambda g: backward_modules[layer_api].setdefault(module))

        handles = [m.register_forward_hook(record) for m in model.modules()]
        try:
            attribute(model, Fault("none", 0, False, layer_api), ids, mask)
        finally:
            for h in handles:
                h.remove()
    candidates = {"forward": list(forward_modules), "backward": {k: list(v) for k, v in backward_modules.items()}}
    # a mixer's submodules that MambaLRP's mixer forward calls (dt_proj's weight is read, the module not called)
    called = ("in_proj", "conv1d", "x_proj", "out_proj")
    submodules = [m for n, m in model.named_modules() if ".mixer." in n and n.rsplit(".", 1)[-1] in called]
    return model, ids, mask, candidates, submodules


def _main_tensor(out):
    """The tensor a module passes on: the output itself, the first of a tuple, ``.logits`` or ``.last_hidden_state``."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, tuple) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    for name in ("logits", "last_hidden_state"):
        if isinstance(getattr(out, name, None), torch.Tensor):
            return getattr(out, name)
    return None


def attribute(model, fault: Fault, ids, mask):
    if fault.layer_api:
        return LayerMambaLRP(model, model.backbone.layers[-1], recompute=fault.recompute).attribute(
            ids, target=4, attention_mask=mask
        )
    return MambaLRP(model, recompute=fault.recompute).attribute(ids, target=4, attention_mask=mask)


def inject(fault: Fault, candidates, submodules):
    """Put the fault in place; returns (the exception type expected, how to take the fault out)."""
    if fault.kind == "submodule":
        target = submodules[fault.module % len(submodules)]

        def broken(*args, **kwargs):
            raise Boom("patched submodule")

        target.forward = broken
        return Boom, lambda: target.__dict__.pop("forward")
    backward = fault.kind in ("backward", "oom_backward")
    pool = candidates["backward"][fault.layer_api] if backward else candidates["forward"]
    target = pool[fault.module % len(pool)]
    error: BaseException = {
        "forward": Boom("forward hook"),
        "backward": Boom("backward"),
        "keyboard_interrupt": KeyboardInterrupt(),
        "oom_forward": oom_error(),
        "oom_backward": oom_error(),
    }[fault.kind]
    if backward:

        def hook(module, args, out):
            t = _main_tensor(out)
            wrapped = _RaiseInBackward.apply(t, error)
            if isinstance(out, torch.Tensor):
                return wrapped
            if isinstance(out, tuple):
                return (wrapped, *out[1:])
            setattr(out, "logits" if getattr(out, "logits", None) is t else "last_hidden_state", wrapped)
            return out

    else:

        def hook(module, args, out):
            raise error

    handle = target.register_forward_hook(hook)
    return type(error), handle.remove


def test_fault_injection(setting):
    model, ids, mask, candidates, submodules = setting
    reference = {False: MambaLRP(model).attribute(ids, target=4, attention_mask=mask)}
    reference[True] = LayerMambaLRP(model, model.backbone.layers[-1]).attribute(ids, target=4, attention_mask=mask)
    clean = full_snapshot(model)
    globals_before = global_state()
    INJECTED.clear()

    @settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
    @given(fault=faults())
    def run(fault):
        expected, take_out = inject(fault, candidates, submodules)
        with_fault = full_snapshot(model)
        try:
            with pytest.raises(expected):
                attribute(model, fault, ids, mask)
            INJECTED[fault.kind] = INJECTED.get(fault.kind, 0) + 1
            assert_same(model, with_fault)
        finally:
            take_out()
        assert_same(model, clean)
        assert global_state() == globals_before
        assert torch.equal(attribute(model, dataclasses.replace(fault, kind="none"), ids, mask), reference[fault.layer_api])

    run()
    total = sum(INJECTED.values())
    print(f"faults injected: {total} ({dict(sorted(INJECTED.items()))})")
    assert set(INJECTED) == set(FAULTS) and total >= 60
