"""``recompute="auto"`` runs a batch whose kept tensors would not fit in parts that fit (each
pass keeping everything) and puts the relevance back together: the same as one pass."""

from __future__ import annotations

import pytest
import torch
from conftest import make_lm
from test_api import ids_for

from captum_mambalrp import LayerMambaLRP, MambaLRP
from captum_mambalrp.adapters import install_rules
from captum_mambalrp.adapters import recompute as rc
from captum_mambalrp.attribution.batching import bounds, call_part, target_part
from captum_mambalrp.attribution.inputs import ForwardCall
from captum_mambalrp.rules import composite


def keep_need(model, batch, length):
    """What keeping every tensor of ``batch`` sequences needs, by the pass's own estimate."""
    plan = rc.RecomputePlan([layer.mixer for layer in model.backbone.layers], budget=1e15)
    plan.choose(torch.zeros(batch, length, model.config.hidden_size))
    return plan.needed["keep"]


def passes(model, monkeypatch, budget):
    """Run with ``budget`` bytes available; returns a list that collects, per pass, the batch
    size the embedding saw and the mode the pass chose."""
    monkeypatch.setattr(rc, "available_memory", lambda device: budget / rc.AUTO_MEMORY_FRACTION)
    seen = []
    original = rc.RecomputePlan.choose

    def spy(self, hidden):
        mode = original(self, hidden)
        if not seen or seen[-1][2] is not self:
            seen.append((hidden.shape[0], mode, self))
        return mode

    monkeypatch.setattr(rc.RecomputePlan, "choose", spy)
    return seen


@pytest.fixture(scope="module")
def model():
    return make_lm("mamba", seed=7, num_hidden_layers=3, vocab_size=80)


def padded(batch=5, length=24):
    ids = ids_for(batch, length)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding
    mask[3, -4:] = 0  # right padding
    return ids, mask


@pytest.mark.parametrize("target", [[1, 2, (-1, 3), None, (4, 5)], torch.tensor([3, 1, 4, 1, 5]), 6])
def test_a_batch_over_the_budget_runs_in_parts_that_keep_everything(model, monkeypatch, target):
    """Keeping every tensor fits two sequences, not three: five run as 2 + 2 + 1, each pass
    without recomputation; relevance and delta equal one pass over the batch (per-example
    targets sliced with it, padding either side)."""
    ids, mask = padded()
    whole, whole_delta = MambaLRP(model, recompute=False).attribute(
        ids, target=target, attention_mask=mask, return_convergence_delta=True
    )
    seen = passes(model, monkeypatch, (keep_need(model, 2, 24) + keep_need(model, 3, 24)) / 2)
    rel, delta = MambaLRP(model).attribute(ids, target=target, attention_mask=mask, return_convergence_delta=True)
    assert [(b, m) for b, m, _ in seen] == [(2, False), (2, False), (1, False)]
    torch.testing.assert_close(rel, whole, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(delta, whole_delta, atol=1e-6, rtol=1e-5)


def test_one_pass_when_the_batch_fits_or_not_even_one_sequence_does(model, monkeypatch):
    """The whole batch fits: one pass keeping everything; not even one sequence fits: one pass
    over the batch that recomputes (parts would not spare it)."""
    ids, mask = padded()
    seen = passes(model, monkeypatch, keep_need(model, 5, 24) * 1.01)
    MambaLRP(model).attribute(ids, target=1, attention_mask=mask)
    assert [(b, m) for b, m, _ in seen] == [(5, False)]
    seen = passes(model, monkeypatch, keep_need(model, 1, 24) * 0.9)
    relevance = MambaLRP(model).attribute(ids, target=1, attention_mask=mask)
    assert len(seen) == 1 and seen[0][0] == 5 and seen[0][1] is not False
    kept = MambaLRP(model, recompute=False).attribute(ids, target=1, attention_mask=mask)
    torch.testing.assert_close(relevance, kept, atol=1e-6, rtol=1e-5)


def test_an_explicit_mode_and_embeddings_input(model, monkeypatch):
    """An explicit ``recompute`` runs the batch in one pass; embeddings ``[B, L, H]`` are split
    like token ids, and the relevance per entry equals one pass."""
    ids, mask = padded()
    budget = (keep_need(model, 2, 24) + keep_need(model, 3, 24)) / 2
    seen = passes(model, monkeypatch, budget)
    batches = []
    handle = model.get_input_embeddings().register_forward_hook(lambda m, a, out: batches.append(out.shape[0]))
    try:
        MambaLRP(model, recompute=True).attribute(ids, target=1, attention_mask=mask)
    finally:
        handle.remove()
    assert batches == [5] and not seen  # one pass; an explicit mode asks no plan
    embeds = model.get_input_embeddings()(ids).detach()
    seen.clear()
    rel = MambaLRP(model).attribute(embeds, target=2, attention_mask=mask)
    assert [b for b, _, _ in seen] == [2, 2, 1]
    torch.testing.assert_close(
        rel, MambaLRP(model, recompute=False).attribute(embeds, target=2, attention_mask=mask), atol=1e-6, rtol=1e-5
    )


def test_layer_relevance_in_parts(model, monkeypatch):
    """``LayerMambaLRP`` at several layers: the parts' relevances are joined per layer."""
    ids, mask = padded()
    layers = [model.backbone.embeddings, model.backbone.layers[1]]
    whole, deltas = LayerMambaLRP(model, layers, recompute=False).attribute(
        ids, target=3, attention_mask=mask, return_convergence_delta=True
    )
    seen = passes(model, monkeypatch, (keep_need(model, 2, 24) + keep_need(model, 3, 24)) / 2)
    parts, part_deltas = LayerMambaLRP(model, layers).attribute(ids, target=3, attention_mask=mask, return_convergence_delta=True)
    assert [b for b, _, _ in seen] == [2, 2, 1]
    for a, b, da, db in zip(whole, parts, deltas, part_deltas):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(db, da, atol=1e-6, rtol=1e-5)


def test_slicing_helpers():
    """Batch-first tensors (also inside tuples and lists) are sliced; scalars, other shapes and
    one target for all pass unchanged."""
    ids, other = torch.arange(10).reshape(5, 2), torch.zeros(3)
    call = ForwardCall((ids, (ids, 4)), {"mask": ids, "x": other, "n": 1}, ids, True, True)
    part = call_part(call, 5, 2, 4)
    assert torch.equal(part.args[0], ids[2:4]) and torch.equal(part.args[1][0], ids[2:4]) and part.args[1][1] == 4
    assert torch.equal(part.kwargs["mask"], ids[2:4]) and part.kwargs["x"] is other and part.kwargs["n"] == 1
    assert torch.equal(part.mask, ids[2:4]) and part.last_logits
    assert target_part([1, 2, 3, 4, 5], 5, 2, 4) == [3, 4] and target_part((0, 1), 5, 2, 4) == (0, 1)
    assert torch.equal(target_part(torch.tensor([1, 2, 3, 4, 5]), 5, 1, 2), torch.tensor([2]))
    assert bounds(4, 4) == [(0, 4)] and bounds(3, 1) == [(0, 1), (1, 2), (2, 3)]


def planned_keep(model, batch, length):
    """What keeping every tensor of ``batch`` sequences needs, by the plan ``MambaLRP`` sizes the
    parts with (its mixers, attention and recomputed layers: a hybrid's layers count too)."""
    inst = install_rules(model, composite("mambalrp"), recompute="auto")
    try:
        plan = rc.plan_for(model, inst.mixers, attention_names=inst.attention, layer_names=inst.recomputed_layers, budget=1e15)
    finally:
        inst.patcher.restore()
    width = next(m for m in model.modules() if isinstance(m, torch.nn.Embedding)).embedding_dim
    plan.choose(torch.zeros(batch, length, width))
    return plan.needed["keep"]


def _other_model(kind):
    """``(model, takes an attention mask)`` of each kind (tiny, random)."""
    if kind == "mamba2":
        from test_mamba2 import make_mamba2

        return make_mamba2(seed=7, num_hidden_layers=2), True
    if kind in ("bamba", "nemotron_h"):
        from test_hybrids import build

        return build(kind, seed=7), True
    if kind == "mamba_ssm_mamba1":
        from test_mamba_ssm import make_ssm_lm

        return make_ssm_lm("Mamba1", seed=7, d_model=16), False
    from test_mamba3 import make_mamba3_lm

    return make_mamba3_lm(mimo=kind == "mamba3_mimo", seed=7), False


@pytest.mark.parametrize("kind", ["mamba2", "bamba", "nemotron_h", "mamba_ssm_mamba1", "mamba3_siso", "mamba3_mimo"])
def test_other_models_run_in_parts_with_the_same_relevance(kind, monkeypatch):
    """transformers' Mamba2, two hybrids (Bamba; Nemotron-H with attention, MLP and MoE layers),
    mamba-ssm's Mamba1 language model and one with Mamba3 mixers (SISO, MIMO): five sequences
    where keeping fits two run as 2 + 2 + 1, each part keeping everything, and relevance and delta
    equal one pass with ``recompute=False`` (per-example targets; left and right padding where the
    model takes a mask)."""
    model, masked = _other_model(kind)
    ids, mask = padded()
    call = dict(attention_mask=mask) if masked else {}
    target = [1, 2, (-1, 3), None, (4, 5)]
    whole, whole_delta = MambaLRP(model, recompute=False).attribute(ids, target=target, return_convergence_delta=True, **call)
    seen = passes(model, monkeypatch, (planned_keep(model, 2, 24) + planned_keep(model, 3, 24)) / 2)
    rel, delta = MambaLRP(model).attribute(ids, target=target, return_convergence_delta=True, **call)
    assert [(b, m) for b, m, _ in seen] == [(2, False), (2, False), (1, False)]
    torch.testing.assert_close(rel, whole, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(delta, whole_delta, atol=1e-6, rtol=1e-5)
    assert (whole.abs().sum(1) > 0).all()
    if masked:
        assert (rel[mask == 0] == 0).all()
