"""recompute="auto" decides from memory (the estimate against a budget), and every
memory-saving path gives the same relevance as keeping everything."""

from __future__ import annotations

import pytest
import torch
from conftest import make_lm
from test_api import assert_unchanged, snapshot
from test_mamba2 import ids_for, make_mamba2
from torch.utils._python_dispatch import TorchDispatchMode

from captum_mambalrp import MambaLRP
from captum_mambalrp.adapters import recompute as rc

PRODUCTS = (torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default)


def projections(model):
    """The mixers' projection weights, by ``(name, layer)``, ``name`` ``"in_proj"`` or ``"out_proj"``."""
    return {
        (name, i): getattr(layer.mixer, name).weight
        for i, layer in enumerate(model.backbone.layers)
        for name in ("in_proj", "out_proj")
    }


class Products(TorchDispatchMode):
    """How often the forward product of each of ``weights`` (``{key: weight}``) runs inside the
    block (``self.counts[key]``), told by the weight's memory: a product whose last operand is
    the weight transposed (``F.linear``'s ``weight.t()``; for ``bmm`` expanded over the batch).
    The backward pass's product for the input's gradient reads the weight untransposed and is
    not counted; every product with none of these weights is counted in ``self.others``."""

    def __init__(self, weights):
        super().__init__()
        self.weights = weights
        self.counts = dict.fromkeys(self.weights, 0)
        self.others = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in PRODUCTS:
            operand = args[-1]
            key = next(
                (
                    k
                    for k, w in self.weights.items()
                    if operand.data_ptr() == w.data_ptr() and tuple(operand.shape[-2:]) == tuple(w.t().shape)
                ),
                None,
            )
            if key is None:
                self.others += 1
            else:
                self.counts[key] += 1
        return func(*args, **(kwargs or {}))

    def runs(self, name):
        """How often each layer's ``name`` product ran, in the order the layers are called
        (keys ``(name, layer)``, :func:`projections`)."""
        return [n for (part, _), n in sorted(self.counts.items(), key=lambda kv: kv[0][1]) if part == name]


def spy_plans(monkeypatch):
    """The plans ``recompute="auto"`` decides with, in order (a list filled as passes run)."""
    plans = []
    original = rc.RecomputePlan.choose

    def spy(self, hidden):
        plans.append(self)
        return original(self, hidden)

    monkeypatch.setattr(rc.RecomputePlan, "choose", spy)
    return plans


def _modes_seen(model, ids, monkeypatch, budget):
    """The modes the mixers of one pass ran in, with ``budget`` bytes available."""
    seen = []
    original = rc.RecomputePlan.choose

    def spy(self, hidden):
        mode = original(self, hidden)
        seen.append(mode)
        return mode

    monkeypatch.setattr(rc.RecomputePlan, "choose", spy)
    monkeypatch.setattr(rc, "available_memory", lambda device: budget / rc.AUTO_MEMORY_FRACTION)
    relevance = MambaLRP(model).attribute(ids, target=1)
    return set(seen), relevance


def _thresholds(model, ids, projection=False):
    """Bytes needed to keep everything / to recompute (and, with ``projection``, to recompute
    keeping the input projections), by the documented estimate."""
    mixers = [layer.mixer for layer in model.backbone.layers]
    tokens = ids.numel()
    dtype = next(model.parameters()).dtype
    per = [rc.mixer_bytes_per_token(m, dtype) for m in mixers]
    working = max(p["kept"] for p in per) * tokens
    # with recomputation a mixer's backward pass holds its recomputed tensors and its gradients
    need = [
        sum(p[k] for p in per) * tokens + working * (1 if k == "kept" else rc.RECOMPUTE_WORKING)
        for k in ("kept", "input", "projection")
    ]
    return tuple(need) if projection else tuple(need[:2])


@pytest.mark.parametrize("arch", ["mamba", "mamba2"])
def test_auto_flips_where_the_estimate_meets_the_budget(arch, monkeypatch):
    model = make_lm("mamba", num_hidden_layers=3) if arch == "mamba" else make_mamba2(num_hidden_layers=3)
    ids = ids_for(1, 34)  # one sequence: a batch over the budget would run in parts
    keep, recompute, projection = _thresholds(model, ids, projection=True)
    assert recompute < projection < keep
    modes, kept = _modes_seen(model, ids, monkeypatch, budget=keep * 1.001)
    assert modes == {False}
    modes, kept_projection = _modes_seen(model, ids, monkeypatch, budget=keep * 0.999)
    assert modes == {"projection"}
    modes, partly = _modes_seen(model, ids, monkeypatch, budget=projection * 0.999)
    assert modes == {"projection"}  # all keep out_proj's output, all but one in_proj's
    modes, again = _modes_seen(model, ids, monkeypatch, budget=recompute * 1.0001)
    assert modes == {True}
    modes, below = _modes_seen(model, ids, monkeypatch, budget=recompute * 0.999)
    # on the CPU the host memory is the budget: nothing to offload to; pieces of the sequence and
    # blocks recomputed from sparse checkpoints (Mamba2: blocks only, its mixers recomputed whole)
    assert modes == {"sequence"}
    with pytest.warns(ResourceWarning, match="expect to run out of memory"):
        _modes_seen(model, ids, monkeypatch, budget=1.0)
    torch.testing.assert_close(kept, kept_projection, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(kept, again, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(kept, partly, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(kept, below, atol=1e-6, rtol=1e-5)


def test_auto_scales_with_tokens(monkeypatch):
    """The same budget keeps a short batch and recomputes (or runs in pieces) a long one."""
    model = make_lm("mamba", num_hidden_layers=2)
    short, long = ids_for(1, 8), ids_for(1, 64)
    keep_short, _ = _thresholds(model, short)
    assert _modes_seen(model, short, monkeypatch, budget=keep_short * 1.5)[0] == {False}
    long_modes = _modes_seen(model, long, monkeypatch, budget=keep_short * 1.5)[0]
    assert long_modes and long_modes <= {True, "sequence"}, long_modes
    _, recompute_long, projection_long = _thresholds(model, long, projection=True)
    assert _modes_seen(model, long, monkeypatch, budget=recompute_long * 1.01)[0] == {True}
    assert _modes_seen(model, long, monkeypatch, budget=projection_long * 1.01)[0] == {"projection"}


def test_estimate_counts_dtype():
    model = make_lm("mamba", num_hidden_layers=1)
    mixer = model.backbone.layers[0].mixer
    f32, bf16, f64 = (rc.mixer_bytes_per_token(mixer, d) for d in (torch.float32, torch.bfloat16, torch.float64))
    width, d_model = mixer.in_proj.out_features, mixer.in_proj.in_features
    out = mixer.out_proj.out_features
    assert f32 == {
        "kept": width * (3 * 4 + 2.75 * 4),
        "input": d_model * 4,
        "projection": (d_model + width + out) * 4,
        "output": (d_model + out) * 4,
    }
    assert bf16 == {  # the conv output kept in float32 (CAPTUM_MAMBALRP_CONV_OUTPUT=compute, the default)
        "kept": width * (3 * 2 + 2.75 * 4) + 2 * mixer.conv1d.out_channels,
        "input": d_model * 2,
        "projection": (d_model + width + out) * 2,
        "output": (d_model + out) * 2,
    }
    assert f64["kept"] == 2 * f32["kept"]
    with pytest.MonkeyPatch.context() as mp:  # the conv output rounded to bf16: the fitted constants alone
        mp.setenv("CAPTUM_MAMBALRP_CONV_OUTPUT", "model")
        assert rc.mixer_bytes_per_token(mixer, torch.bfloat16)["kept"] == width * (3 * 2 + 2.75 * 4)


def test_estimate_with_the_fused_kernels(monkeypatch):
    """On CUDA with the fused kernels the kept bytes follow the constants fitted to the H200's
    peaks (Mamba1 and Mamba2 mixers; others, a Mamba3-like mixer here), without them the unfused
    ones; the recomputation's figures do not depend on it."""
    mamba1 = make_lm("mamba", num_hidden_layers=1).backbone.layers[0].mixer
    mamba2 = make_mamba2(num_hidden_layers=1).backbone.layers[0].mixer
    monkeypatch.setattr("captum_mambalrp.kernels.triton_installed", lambda: True)
    # mamba-ssm's Mamba3 as adapters.mamba3.is_mamba3 knows it; its gate is not fused
    Mamba3 = type("Mamba3", (torch.nn.Module,), {"__module__": "mamba_ssm.modules.mamba3"})
    other = Mamba3()
    other.in_proj, other.dt_bias = torch.nn.Linear(8, 40), torch.nn.Parameter(torch.zeros(2))
    monkeypatch.setenv("CAPTUM_MAMBALRP_CONV_OUTPUT", "model")  # the constants' fit (the float32 conv output: above)
    for mixer, (a, b) in ((mamba1, rc.KEPT_FUSED), (mamba2, rc.KEPT_FUSED), (other, rc.KEPT_FUSED_OTHER)):
        width = mixer.in_proj.out_features
        on, off = rc.mixer_bytes_per_token(mixer, torch.bfloat16, "cuda"), rc.mixer_bytes_per_token(mixer, torch.bfloat16)
        assert on["kept"] == width * (a * 2 + b * 4) and off["kept"] == width * (3 * 2 + 2.75 * 4)
        assert on["kept"] < off["kept"] and all(on[k] == off[k] for k in ("input", "projection", "output"))
        monkeypatch.setenv("CAPTUM_MAMBALRP_FUSED", "0")
        assert rc.mixer_bytes_per_token(mixer, torch.bfloat16, "cuda") == off
        monkeypatch.delenv("CAPTUM_MAMBALRP_FUSED")


@pytest.mark.parametrize("arch", ["mamba", "falcon", "mamba2"])
def test_every_memory_saving_path_gives_the_same_relevance(arch):
    """Keep, recompute, recompute keeping the input projections, offload (the offload path runs
    on the CPU too: the input is parked in host memory), and the env-var budget that forces auto
    to recompute."""
    model = make_mamba2(num_hidden_layers=3) if arch == "mamba2" else make_lm(arch, seed=13, num_hidden_layers=3)
    ids = ids_for(2, 30)
    before = snapshot(model)
    kept = MambaLRP(model, recompute=False).attribute(ids, target=4)
    for mode in (True, "projection", "offload"):
        again = MambaLRP(model, recompute=mode).attribute(ids, target=4)
        torch.testing.assert_close(kept, again, atol=1e-6, rtol=1e-5)
    assert_unchanged(model, before)


def _make(arch, layers):
    """A model whose vocabulary differs from every projection's width."""
    if arch == "mamba2":
        return make_mamba2(num_hidden_layers=layers, vocab_size=80)
    return make_lm(arch, seed=5, num_hidden_layers=layers, vocab_size=80)


@pytest.mark.parametrize("arch", ["falcon", "mamba2"])
def test_auto_keeps_as_many_products_as_fit(arch, monkeypatch):
    """Between the budgets of recomputing and of keeping both projections' outputs, ``auto``
    gives out_proj's output to as many mixers as fit (the first ones called), then in_proj's to
    as many as the rest holds, and recomputes the rest: a kept product runs once, another twice;
    relevance unchanged; recompute (``True``) when not even one out_proj output fits."""
    layers = 4
    model = _make(arch, layers)
    ids = ids_for(1, 48)  # one sequence: a batch over the budget would run in parts
    _, recompute, projection = _thresholds(model, ids, projection=True)
    per = rc.mixer_bytes_per_token(model.backbone.layers[0].mixer, torch.float32)
    out_bytes = (per["output"] - per["input"]) * ids.numel()  # one mixer's out_proj output
    in_bytes = (per["projection"] - per["output"]) * ids.numel()  # one mixer's in_proj output
    assert out_bytes < in_bytes and projection == pytest.approx(recompute + layers * (out_bytes + in_bytes))
    kept = MambaLRP(model, recompute=False).attribute(ids, target=4)
    plans = spy_plans(monkeypatch)
    # (room beyond recomputing, mixers keeping out_proj's output, in_proj's): None = all
    cases = [
        (layers * out_bytes + 1.5 * in_bytes, None, 1),  # every output and one in_proj
        (layers * out_bytes + (layers - 0.5) * in_bytes, None, layers - 1),
        (2.5 * out_bytes, 2, 0),  # two outputs only
    ]
    for room, outputs, inputs in cases:
        budget = (recompute + room) / rc.AUTO_MEMORY_FRACTION
        monkeypatch.setattr(rc, "available_memory", lambda device, budget=budget: budget)
        with Products(projections(model)) as seen:
            relevance = MambaLRP(model).attribute(ids, target=4)
        plan = plans[-1]
        assert plan.mode == "projection" and (plan.output_mixers, plan.projection_mixers) == (outputs, inputs)
        n_out = layers if outputs is None else outputs
        assert plan.needed["projection_partial"] == pytest.approx(recompute + n_out * out_bytes + inputs * in_bytes)
        # kept: once (the recomputation reads it); recomputed: twice
        assert seen.runs("out_proj") == [1] * n_out + [2] * (layers - n_out)
        assert seen.runs("in_proj") == [1] * inputs + [2] * (layers - inputs)
        torch.testing.assert_close(relevance, kept, atol=1e-6, rtol=1e-5)
    monkeypatch.setattr(rc, "available_memory", lambda device: (recompute + 0.5 * out_bytes) / rc.AUTO_MEMORY_FRACTION)
    with Products(projections(model)) as seen:
        MambaLRP(model).attribute(ids, target=4)
    assert plans[-1].mode is True and (plans[-1].output_mixers, plans[-1].projection_mixers) == (None, None)
    assert "projection_partial" not in plans[-1].needed
    assert seen.runs("out_proj") == seen.runs("in_proj") == [2] * layers


@pytest.mark.parametrize("arch", ["falcon", "mamba2"])
def test_projection_mode_skips_both_projections_in_the_recomputation(arch):
    """``recompute="projection"`` runs each mixer's in_proj and out_proj products once, as
    keeping does (the recomputation reads their saved outputs), where ``recompute=True`` runs
    each twice; the other matrix products run as often as with ``True``; the relevance is the
    same."""
    model = _make(arch, 2)
    ids = ids_for(2, 24)
    layers = len(model.backbone.layers)
    runs = {}
    for mode in (False, True, "projection"):
        with Products(projections(model)) as seen:
            relevance = MambaLRP(model, recompute=mode).attribute(ids, target=4)
        runs[mode] = (seen, relevance)
    for name in ("in_proj", "out_proj"):
        assert runs[False][0].runs(name) == runs["projection"][0].runs(name) == [1] * layers
        assert runs[True][0].runs(name) == [2] * layers
    assert runs["projection"][0].others == runs[True][0].others  # the other products as with True
    torch.testing.assert_close(runs["projection"][1], runs[False][1], atol=1e-6, rtol=1e-5)


def test_kept_products_are_told_by_the_weight():
    """The selective-checkpoint policy saves a product by its weight operand (``weight.t()``, a
    view; expanded for ``bmm``), not its width: 2D and 3D inputs, contiguous or not, with and
    without bias, with a weight that needs a gradient or not; a product of the same width with
    another weight is recomputed."""
    from functools import partial

    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)
    for bias in (True, False):
        for grad in (True, False):
            kept, other = torch.nn.Linear(8, 12, bias=bias), torch.nn.Linear(8, 12, bias=bias)
            kept.requires_grad_(grad), other.requires_grad_(grad)
            for x in (torch.randn(5, 8), torch.randn(2, 5, 8), torch.randn(2, 8, 5).transpose(1, 2)):
                x = x.detach().requires_grad_(True)

                def f(h, kept=kept, other=other):
                    return torch.tanh(kept(h)) * torch.sigmoid(other(h))

                (expected,) = torch.autograd.grad(f(x).sum(), x)
                with Products({"kept": kept.weight, "other": other.weight}) as seen:
                    y = checkpoint(f, x, use_reentrant=False, context_fn=partial(rc._keep_products, [kept.weight]))
                    forward = dict(seen.counts)
                    (got,) = torch.autograd.grad(y.sum(), x)
                # the backward pass: `other`'s product again (recomputed), `kept`'s read from the
                # forward's; and x's gradient, through both weights untransposed
                assert forward == {"kept": 1, "other": 1}, (bias, grad, x.shape)
                assert (seen.counts, seen.others) == ({"kept": 1, "other": 2}, 2), (bias, grad, x.shape)
                torch.testing.assert_close(got, expected, atol=0, rtol=0)


def test_offload_keeps_no_mixer_tensors_for_backward():
    """With "offload", a mixer's output node holds no saved tensors on the graph (its input
    is in host memory): elements saved during the forward pass (not the recomputations in the
    backward pass), counted with saved-tensor hooks."""
    model = make_lm("mamba", num_hidden_layers=2)
    ids = ids_for(1, 40)
    counts = {}
    for mode in (False, True, "offload"):
        n = [0]

        def pack(t, n=n):
            if torch._C._current_graph_task_id() == -1:  # not inside the backward pass
                n[0] += t.numel()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            MambaLRP(model, recompute=mode).attribute(ids, target=1)
        counts[mode] = n[0]
    assert counts["offload"] < counts[True] < counts[False], counts


def test_bad_mode_is_named():
    with pytest.raises(ValueError, match="recompute must be True, False, 'auto', 'projection', 'offload', 'sequence' or a Seq"):
        MambaLRP(make_lm("mamba"), recompute="sometimes")


def test_offload_with_relevance_read_inside_a_mixer_keeps_the_graph():
    """Reading relevance at a module inside a mixer: "offload" recomputes with the input kept
    (an offloaded mixer runs without a graph), so the layer's relevance is that of keeping."""
    from captum_mambalrp import LayerMambaLRP

    model = make_lm("mamba", seed=3, num_hidden_layers=2)
    ids = ids_for(1, 20)
    layer = model.backbone.layers[1].mixer.out_proj
    kept = LayerMambaLRP(model, layer, recompute=False).attribute(ids, target=2)
    offloaded = LayerMambaLRP(model, layer, recompute="offload").attribute(ids, target=2)
    assert kept.abs().sum() > 0
    torch.testing.assert_close(kept, offloaded, atol=1e-6, rtol=1e-5)
    plan = rc.plan_for(model, ["backbone.layers.0.mixer", "backbone.layers.1.mixer"], read_at=[layer])
    assert not plan.allow_offload
    assert rc.plan_for(model, ["backbone.layers.0.mixer"], read_at=[model.backbone.embeddings]).allow_offload


@pytest.mark.parametrize("part", ["in_proj", "conv1d", "out_proj"])
def test_relevance_read_inside_a_recomputed_mixer(part):
    """A module inside a mixer that the backward pass recomputes (``True``, ``"projection"``) runs
    twice; relevance is read at its forward-pass call, as when the mixer keeps its tensors (the
    recomputed call used to be captured too, and the pass failed with an IndexError)."""
    from captum_mambalrp import LayerMambaLRP

    model = make_lm("mamba", seed=3, num_hidden_layers=2)
    ids = ids_for(1, 20)
    layer = getattr(model.backbone.layers[1].mixer, part)
    kept = LayerMambaLRP(model, layer, recompute=False).attribute(ids, target=2)
    assert kept.abs().sum() > 0
    for mode in (True, "projection"):
        again = LayerMambaLRP(model, layer, recompute=mode).attribute(ids, target=2)
        torch.testing.assert_close(again, kept, atol=1e-6, rtol=1e-5)


def test_cuda_decision_offloads_only_where_the_host_can_take_the_inputs(monkeypatch):
    """The CUDA branch of the decision (a stand-in for a CUDA tensor: only its shape, dtype and
    device are read): keep, recompute, offload as the device budget shrinks, and recompute when
    the parked inputs would not fit the host's memory."""
    from types import SimpleNamespace

    model = make_lm("mamba", num_hidden_layers=3)
    mixers = [layer.mixer for layer in model.backbone.layers]
    hidden = SimpleNamespace(shape=(2, 4096, 16), dtype=torch.bfloat16, device=torch.device("cuda"))
    per = [rc.mixer_bytes_per_token(m, torch.bfloat16, "cuda") for m in mixers]
    tokens = 2 * 4096
    keep = sum(p["kept"] for p in per) * tokens + per[0]["kept"] * tokens
    working = rc.RECOMPUTE_WORKING * per[0]["kept"] * tokens  # a recomputed mixer's and its gradients
    inputs = sum(p["input"] for p in per) * tokens + working
    host = {"cpu": 1e12}
    monkeypatch.setattr(rc, "available_memory", lambda device: host[device.type] if device.type == "cpu" else 0.0)

    def mode(budget):
        return rc.RecomputePlan(mixers, budget=budget).choose(hidden)

    projection = sum(p["projection"] for p in per) * tokens + working
    assert mode(keep * 1.01) is False
    assert mode(keep * 0.99) == "projection"
    plan = rc.RecomputePlan(mixers, budget=projection * 0.99)
    assert plan.choose(hidden) == "projection"  # every out_proj output, two of the three in_proj's
    assert (plan.output_mixers, plan.projection_mixers) == (None, 2)
    assert mode(inputs * 1.001) is True
    assert mode(inputs * 1.01) is True
    assert mode(inputs * 0.99) == "offload"
    host["cpu"] = (inputs - working) * 0.99 / rc.AUTO_MEMORY_FRACTION
    assert mode(inputs * 0.99) is True  # no mode fits: without piece functions or blocks, recompute
    assert rc.RecomputePlan(mixers, budget=inputs * 0.99, allow_offload=False).choose(hidden) is True
    # mixers that run in pieces, blocks to recompute: "sequence"; its settings from the budget
    plan = rc.RecomputePlan(mixers, budget=inputs * 0.99, pieces=True, chain_blocks=3)
    assert plan.choose(hidden) == "sequence" and plan.sequence is not None
    assert plan.needed["sequence"] <= inputs * 0.99 and plan.sequence.stride == 2 and plan.sequence.host
    host["cpu"] = 0.0  # the kept block inputs stay on the device when the host cannot take them
    plan = rc.RecomputePlan(mixers, budget=inputs * 0.99, pieces=True, chain_blocks=3)
    assert plan.choose(hidden) == "sequence" and not plan.sequence.host
    # where one mixer's working set alone is over the budget, offload is no way out (goal 2's case)
    host["cpu"] = 1e12
    plan = rc.RecomputePlan(mixers, budget=working * 0.9, pieces=True, chain_blocks=3)
    assert plan.choose(hidden) == "sequence" and plan.sequence.host  # the kept block inputs fit the host
    # relevance read inside a mixer: nothing that runs mixers without a graph
    assert rc.RecomputePlan(mixers, budget=inputs * 0.99, allow_offload=False, pieces=True, chain_blocks=3).choose(hidden) is True


def _memory_estimate():
    """``benchmarks/memory_estimate.py`` (its hybrid shapes and its saved-bytes count)."""
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "memory_estimate.py")
    spec = importlib.util.spec_from_file_location("memory_estimate_for_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


HYBRID_SHAPES = _memory_estimate().SHAPES


@pytest.mark.parametrize("family", sorted(HYBRID_SHAPES))
def test_hybrid_layers_are_recomputed_and_the_estimate_follows(family):
    """With recomputation a hybrid's attention, MLP and expert layers keep only their inputs
    (they run again in the backward pass, as the mixers do): the saved tensors (saved-tensor
    hooks, CPU, 256 tokens) are a fraction of what keeping those layers' tensors would add, the
    estimate of what the forward pass keeps lies within 0.5-1.5 times them, and the mixers'
    inputs alone would be a small part."""
    r = _memory_estimate().compare(family)
    measured, estimate, inputs = r["measured"], r["estimate"], r["inputs"]
    assert 0.5 <= estimate / measured <= 1.5, (family, estimate, measured)
    assert r["kept_estimate"] > 3 * measured  # the layers' own tensors are no longer kept
    assert inputs < 0.2 * measured


@pytest.mark.parametrize("family", ["nemotron_h", "jamba"])
def test_recomputed_hybrid_layers_give_the_same_relevance_and_keep_less(family):
    """``recompute=True`` against ``False`` on a hybrid: the same relevance (to rounding), and
    the forward pass keeps less than half of the bytes (saved-tensor hooks); the model comes
    back unchanged."""
    from test_hybrids import build

    bench = _memory_estimate()
    model = build(family, **HYBRID_SHAPES[family])
    before = snapshot(model)
    ids = torch.randint(1, model.config.vocab_size, (2, 48), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding
    kept = MambaLRP(model, recompute=False).attribute(ids, target=1, attention_mask=mask)
    again = MambaLRP(model, recompute=True).attribute(ids, target=1, attention_mask=mask)
    torch.testing.assert_close(again, kept, atol=1e-5, rtol=1e-4)
    assert bench.saved_bytes(model, ids[:1], True) < 0.5 * bench.saved_bytes(model, ids[:1], False)
    assert_unchanged(model, before)


def test_auto_recomputes_a_hybrid_whose_other_layers_do_not_fit(monkeypatch):
    """A budget that holds the mixers' kept tensors but not those plus the MLPs' and experts':
    ``auto`` no longer keeps everything (it did when it counted the mixers only), and the
    relevance equals keeping everything."""
    from test_hybrids import build, mixers_of

    model = build("granite", **HYBRID_SHAPES["granite"])
    ids = torch.randint(1, model.config.vocab_size, (1, 64), generator=torch.Generator().manual_seed(1))
    mixers = mixers_of(model, "granite")
    tokens = ids.numel()
    per = [rc.mixer_bytes_per_token(m, torch.float32) for m in mixers]
    mixers_only = sum(p["kept"] for p in per) * tokens + max(p["kept"] for p in per) * tokens
    plan = rc.plan_for(model, [n for n, m in model.named_modules() if m in mixers], attention_names=[])
    assert plan.others > 0
    full_keep = mixers_only + (plan.others + plan.others_per_length * 64) * tokens
    assert full_keep > 2 * mixers_only
    seen, relevance = _modes_seen(model, ids, monkeypatch, budget=1.5 * mixers_only)
    assert False not in seen, seen
    kept = MambaLRP(model, recompute=False).attribute(ids, target=1)
    torch.testing.assert_close(relevance, kept, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("shape", ["nemotron_h_8b", "granite_4h_tiny"])
def test_hybrid_benchmark_estimate_runs_without_weights(shape, capsys):
    """``benchmarks/gpu_hybrids.py --estimate``: the full-size shapes built on the meta device,
    auto's estimate per mode; the other layers are a large share of keeping everything."""
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "gpu_hybrids.py")
    spec = importlib.util.spec_from_file_location("gpu_hybrids_for_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    needed = module.print_estimate(shape, 0, 8192)
    # keeping everything: the layers around the mixers are a large share; recomputed with the
    # mixers, they keep their inputs only
    assert needed["keep"] > needed["others_kept"] > 0.3 * needed["keep"]
    assert needed["recompute"] > needed["others"] and needed["others"] < 0.3 * needed["others_kept"]
    assert "auto chooses recompute=False" in capsys.readouterr().out  # fits the H200, as measured there


def test_pure_models_have_no_other_layers_to_count():
    """Pure Mamba models, transformers' and mamba-ssm's (whose lm_head is a plain linear layer
    onto the vocabulary), have nothing outside their mixers but the head: nothing is added."""
    from test_mamba_ssm import make_ssm_lm

    model = make_lm("mamba", num_hidden_layers=2)
    mixers = [layer.mixer for layer in model.backbone.layers]
    assert rc.others_bytes_per_token(model, mixers, [], torch.float32) == (0.0, 0.0)
    ssm = make_ssm_lm("Mamba1")
    ssm_mixers = [layer.mixer for layer in ssm.backbone.layers]
    assert rc.others_bytes_per_token(ssm, ssm_mixers, [], torch.float32) == (0.0, 0.0)


def test_relevance_read_inside_a_recomputed_layer():
    """``LayerMambaLRP`` at a module inside a recomputed MLP or attention layer (and at the MLP
    itself) reads the same relevance as without recomputation."""
    from test_hybrids import build

    from captum_mambalrp import LayerMambaLRP

    model = build("bamba", **HYBRID_SHAPES["bamba"])
    ids = torch.randint(1, model.config.vocab_size, (1, 32), generator=torch.Generator().manual_seed(3))
    for name in ("model.layers.0.feed_forward.down_proj", "model.layers.1.self_attn.o_proj", "model.layers.1.feed_forward"):
        layer = model.get_submodule(name)
        kept = LayerMambaLRP(model, layer, recompute=False).attribute(ids, target=1)
        again = LayerMambaLRP(model, layer, recompute=True).attribute(ids, target=1)
        assert kept.abs().max() > 0
        torch.testing.assert_close(again, kept, atol=1e-6, rtol=1e-5, msg=name)


def _recomputed_layers(model):
    """Names of the layers a pass recomputes whole with the mixers, and of the attention layers
    among them, as installed (``recompute="auto"``); the model restored after."""
    from captum_mambalrp.adapters.install import install_rules
    from captum_mambalrp.rules.composites import composite

    inst = install_rules(model, composite("mambalrp"), recompute="auto")
    inst.patcher.restore()
    return list(inst.recomputed_layers), list(inst.attention), list(inst.mixers)


def _layer_weights(model, names):
    """``{(linear name, layer position in call order): weight}`` for every linear layer inside
    the layers ``names`` (the recomputed attention, MLP and expert layers)."""
    return {
        (f"{name}.{sub}", i): m.weight
        for i, name in enumerate(names)
        for sub, m in model.get_submodule(name).named_modules()
        if isinstance(m, torch.nn.Linear)
    }


class AttentionCalls(Products):
    """:class:`Products`, and how often a fused attention operator (``rc.ATTENTION_OPS``) runs."""

    def __init__(self, weights):
        super().__init__(weights)
        self.attention = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in rc.ATTENTION_OPS:
            self.attention += 1
        return super().__torch_dispatch__(func, types, args, kwargs)


def test_projection_mode_keeps_the_hybrid_layers_products():
    """``recompute="projection"`` on a hybrid (tiny Nemotron-H: Mamba2, attention, MLP, MoE):
    the recomputed attention, MLP and expert layers run the products of their linear layers
    once, as keeping does (the recomputation reads the saved outputs), and the attention's fused
    kernel once; ``recompute=True`` runs both twice; the relevance is the same."""
    from test_hybrids import build

    model = build("nemotron_h", **HYBRID_SHAPES["nemotron_h"])
    layers, attention, _ = _recomputed_layers(model)
    assert attention and set(attention) <= set(layers)
    weights = _layer_weights(model, layers)
    ids = torch.randint(1, model.config.vocab_size, (1, 40), generator=torch.Generator().manual_seed(4))
    runs = {}
    for mode in (False, True, "projection"):
        with AttentionCalls(weights) as seen:
            relevance = MambaLRP(model, recompute=mode).attribute(ids, target=1)
        runs[mode] = (seen, relevance)
    once = runs[False][0].counts
    assert sum(once.values()) >= 4 and runs[False][0].attention == len(attention)
    assert runs[True][0].counts == {k: 2 * n for k, n in once.items()} and runs[True][0].attention == 2 * len(attention)
    assert runs["projection"][0].counts == once and runs["projection"][0].attention == len(attention)
    torch.testing.assert_close(runs["projection"][1], runs[False][1], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(runs[True][1], runs[False][1], atol=1e-5, rtol=1e-4)


def test_partial_plan_fills_out_proj_then_layers_then_in_proj():
    """The room between recomputing and keeping every product goes, in this order, to the
    mixers' ``out_proj`` outputs, the recomputed layers' products, the mixers' ``in_proj``
    outputs (each group in call order); the full ``"projection"`` estimate counts the layers'
    products; the layers called first keep theirs."""
    mixers = []
    for _ in range(2):
        m = torch.nn.Module()
        m.in_proj, m.out_proj = torch.nn.Linear(8, 32), torch.nn.Linear(16, 8)
        mixers.append(m)
    hidden = torch.zeros(1, 10, 8)
    tokens = 10
    layer = 100.0  # bytes per token of each of three layers' products
    out, inp = (x * tokens for x in reversed(rc._product_bytes(rc.mixer_bytes_per_token(mixers[0], torch.float32))))
    probe = rc.RecomputePlan(mixers, budget=1e12, layer_products=[layer] * 3)
    assert probe.choose(hidden) is False
    recompute, projection = probe.needed["recompute"], probe.needed["projection"]
    assert projection - recompute == pytest.approx(2 * (out + inp) + 3 * layer * tokens)
    cases = [  # room beyond recomputing -> (output_mixers, product_layers, projection_mixers)
        (1.5 * out, (1, 0, 0)),
        (2 * out + 1.5 * layer * tokens, (None, 1, 0)),
        (2 * out + 3 * layer * tokens + 1.2 * inp, (None, None, 1)),
        (projection - recompute, (None, None, None)),
    ]
    for room, expected in cases:
        plan = rc.RecomputePlan(mixers, budget=recompute + room, layer_products=[layer] * 3)
        assert plan.choose(hidden) == "projection"
        assert (plan.output_mixers, plan.product_layers, plan.projection_mixers) == expected, room
        n_layers = 3 if expected[1] is None else expected[1]
        assert [plan.keeps_layer_products() for _ in range(3)] == [True] * n_layers + [False] * (3 - n_layers)
    plan = rc.RecomputePlan(mixers, budget=recompute + 0.5 * out, layer_products=[layer] * 3)
    assert plan.choose(hidden) is True


def test_auto_gives_the_first_hybrid_layers_their_products(monkeypatch):
    """A budget that holds recomputing, every ``out_proj`` output and the products of the first
    recomputed layer only: that layer's products run once, the later layers' twice, the
    mixers' ``in_proj`` twice; relevance as keeping everything."""
    from test_hybrids import build

    model = build("nemotron_h", **HYBRID_SHAPES["nemotron_h"])
    layers, attention, mixer_names = _recomputed_layers(model)
    ids = torch.randint(1, model.config.vocab_size, (1, 40), generator=torch.Generator().manual_seed(5))
    probe = rc.plan_for(model, mixer_names, attention_names=attention, layer_names=layers, budget=1e12)
    probe.choose(torch.zeros(1, 40, model.config.hidden_size))
    per = [rc.mixer_bytes_per_token(model.get_submodule(n), torch.float32) for n in mixer_names]
    outputs = sum(rc._product_bytes(p)[1] for p in per) * 40
    first = probe.layer_products[0] * 40
    assert first > 0 and len(probe.layer_products) == len(layers) >= 2
    room = outputs + 1.5 * first if probe.layer_products[1] > first / 2 else outputs + first * 1.01
    budget = probe.needed["recompute"] + room
    monkeypatch.setattr(rc, "available_memory", lambda device: budget / rc.AUTO_MEMORY_FRACTION)
    plans = spy_plans(monkeypatch)
    weights = _layer_weights(model, layers)
    mixer_weights = {("in_proj", i): model.get_submodule(n).in_proj.weight for i, n in enumerate(mixer_names)}
    with Products({**weights, **mixer_weights}) as seen:
        relevance = MambaLRP(model).attribute(ids, target=1)
    plan = plans[-1]
    assert plan.mode == "projection" and (plan.output_mixers, plan.product_layers, plan.projection_mixers) == (None, 1, 0)
    for (name, i), n in seen.counts.items():
        if name == "in_proj":
            assert n == 2, name
        elif n:  # products that ran (an expert no token was routed to did not)
            assert n == (1 if i == 0 else 2), (name, i, n)
    kept = MambaLRP(model, recompute=False).attribute(ids, target=1)
    torch.testing.assert_close(relevance, kept, atol=1e-5, rtol=1e-4)


class ExpertProducts(TorchDispatchMode):
    """How often the forward ``grouped_mm`` of each fused experts weight runs (its operand the
    weight transposed, a non-contiguous view; the backward pass reads it untransposed)."""

    def __init__(self, weights):
        super().__init__()
        self.weights = weights
        self.counts = dict.fromkeys(weights, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._grouped_mm.default:
            operand = args[1]
            for key, w in self.weights.items():
                if operand.data_ptr() == w.data_ptr() and not operand.is_contiguous():
                    self.counts[key] += 1
        return func(*args, **(kwargs or {}))


def test_projection_mode_keeps_the_fused_experts_products():
    """A recomputed MoE layer whose experts run as ``grouped_mm`` (tiny Nemotron-H on the CPU,
    aligned): with ``"projection"`` each fused weight's product runs once, as keeping does;
    ``True`` runs it twice; the estimate counts ``top_k`` rows of each weight's output per token;
    the relevance is the same."""
    from test_hybrids import build

    from captum_mambalrp.adapters import moe

    model = build("nemotron_h", **HYBRID_SHAPES["nemotron_h"])
    experts = next(m for m in model.modules() if type(m).__name__.endswith("Experts"))
    weights = {n: w for n, w in experts.named_parameters() if w.dim() == 3}
    assert weights and moe.grouped_mm_usable(torch.zeros(4, experts.down_proj.shape[2]), experts.down_proj)
    ids = torch.randint(1, model.config.vocab_size, (1, 40), generator=torch.Generator().manual_seed(6))
    runs = {}
    for mode in (False, True, "projection"):
        with ExpertProducts(weights) as seen:
            relevance = MambaLRP(model, recompute=mode).attribute(ids, target=1)
        runs[mode] = (dict(seen.counts), relevance)
    once = runs[False][0]
    assert all(n == 1 for n in once.values()), once
    assert runs[True][0] == {k: 2 for k in once} and runs["projection"][0] == once
    torch.testing.assert_close(runs["projection"][1], runs[False][1], atol=1e-5, rtol=1e-4)
    top_k = rc._top_k(model, experts, int(experts.down_proj.shape[0]))
    expected = sum(top_k * w.shape[1] * 4 for w in weights.values())
    assert rc.layer_product_bytes(experts, torch.float32, top_k=top_k) == expected
