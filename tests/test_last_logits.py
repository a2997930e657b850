"""A causal LM's output head runs at the explained position only (``logits_to_keep``), where
that is all the target explains: the same relevance, without the ``[B, L, vocab]`` logits."""

from __future__ import annotations

import pytest
import torch
from conftest import make_lm

from captum_mambalrp import LayerMambaLRP, MambaLRP
from captum_mambalrp.attribution.inputs import ForwardCall, last_logits_only


def head_shapes(model):
    """The output shapes of ``model``'s output head, as the pass runs it (a list filled by a hook)."""
    shapes = []
    handle = model.get_output_embeddings().register_forward_hook(lambda m, a, out: shapes.append(tuple(out.shape)))
    return shapes, handle


@pytest.fixture(scope="module")
def lm():
    return make_lm("mamba", seed=3, num_hidden_layers=2, vocab_size=96)


def ids(batch=2, length=12, seed=0):
    return torch.randint(1, 96, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(
    "target, mask_kind",
    [(5, None), (None, None), ([3, (-1, 7)], None), (torch.tensor([4, 9]), "left"), ((-1, 2), "left")],
)
def test_head_at_the_last_position_gives_the_same_relevance(lm, target, mask_kind):
    """Targets at the last real position (a class, the predicted one, ``(-1, class)``, per
    example; no padding or left padding): the head runs on one position, and relevance and
    delta equal those of a pass whose head runs everywhere (``logits_to_keep=0``, transformers'
    "all", passed by the caller, which the pass then leaves alone)."""
    x = ids()
    mask = None
    if mask_kind == "left":
        mask = torch.ones_like(x)
        mask[1, :4] = 0
    shapes, handle = head_shapes(lm)
    try:
        rel, delta = MambaLRP(lm).attribute(x, target=target, attention_mask=mask, return_convergence_delta=True)
        assert shapes == [(2, 1, 96)]
        full, full_delta = MambaLRP(lm).attribute(
            x, target=target, attention_mask=mask, return_convergence_delta=True, logits_to_keep=0
        )
        assert shapes[1] == (2, 12, 96)
    finally:
        handle.remove()
    torch.testing.assert_close(rel, full, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(delta, full_delta, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("case", ["earlier position", "right padding", "head read"])
def test_head_runs_everywhere_where_other_positions_matter(lm, case):
    """An earlier target position, right padding (the last real position differs per example)
    and relevance read at the head itself keep the full logits."""
    x = ids()
    mask, target = None, 5
    if case == "earlier position":
        target = (3, 5)
    if case == "right padding":
        mask = torch.ones_like(x)
        mask[0, -3:] = 0
    shapes, handle = head_shapes(lm)
    try:
        if case == "head read":
            rel = LayerMambaLRP(lm, lm.get_output_embeddings()).attribute(x, target=target)
            assert rel.shape == (2, 12, 96)
        else:
            MambaLRP(lm).attribute(x, target=target, attention_mask=mask)
    finally:
        handle.remove()
    assert shapes == [(2, 12, 96)]


def test_layer_relevance_inside_the_model_uses_the_last_position(lm):
    """``LayerMambaLRP`` at a block: the head runs at the last position, the block's relevance is
    that of the full head."""
    block = lm.backbone.layers[1]
    x = ids(seed=4)
    shapes, handle = head_shapes(lm)
    try:
        rel = LayerMambaLRP(lm, block).attribute(x, target=2)
        full = LayerMambaLRP(lm, block).attribute(x, target=2, logits_to_keep=0)
    finally:
        handle.remove()
    assert shapes == [(2, 1, 96), (2, 12, 96)]
    torch.testing.assert_close(rel, full, atol=1e-6, rtol=1e-5)


def test_mamba_ssm_lm_uses_num_last_tokens():
    """mamba-ssm's ``MambaLMHeadModel`` names it ``num_last_tokens``; a model whose forward
    names none of the keywords is called as before."""
    from test_mamba_ssm import make_ssm_lm

    model = make_ssm_lm("Mamba1")
    call = last_logits_only(model, ForwardCall((ids(),)), 3)
    assert call.kwargs == {"num_last_tokens": 1} and call.last_logits and call.target_mask is None
    plain = torch.nn.Sequential(torch.nn.Embedding(96, 8), torch.nn.Linear(8, 4))
    same = ForwardCall((ids(),))
    assert last_logits_only(plain, same, 3) is same
    x = ids(seed=5) % 64
    shapes = []
    handle = model.lm_head.register_forward_hook(lambda m, a, out: shapes.append(tuple(out.shape)))
    try:
        rel = MambaLRP(model).attribute(x, target=3)
        full = MambaLRP(model).attribute(x, target=3, num_last_tokens=0)
    finally:
        handle.remove()
    assert shapes == [(2, 1, 64), (2, 12, 64)]
    torch.testing.assert_close(rel, full, atol=1e-6, rtol=1e-5)


def _other_lm(kind):
    """``(model, output head, the keyword that keeps every position's logits)`` of each kind."""
    if kind == "mamba2":
        from test_mamba2 import make_mamba2

        model = make_mamba2(seed=3, num_hidden_layers=2, vocab_size=96)
    elif kind in ("bamba", "nemotron_h"):
        from test_hybrids import build

        model = build(kind, seed=3, vocab_size=96)
    else:
        from test_mamba3 import make_mamba3_lm

        model = make_mamba3_lm(mimo=kind == "mamba3_mimo", seed=3)
        return model, model.lm_head, "num_last_tokens"
    return model, model.get_output_embeddings(), "logits_to_keep"


@pytest.mark.parametrize("kind", ["mamba2", "bamba", "nemotron_h", "mamba3_siso", "mamba3_mimo"])
def test_other_lms_run_the_head_at_the_last_position_with_the_same_relevance(kind):
    """transformers' Mamba2, two hybrids (Bamba; Nemotron-H with attention, MLP and MoE layers,
    left padding) and mamba-ssm's language model with Mamba3 mixers (SISO, MIMO), per-example
    targets at the last position: the head runs on one position, and relevance and delta equal
    those of a pass whose head runs everywhere (``logits_to_keep=0`` / ``num_last_tokens=0``)."""
    model, head, keep_all = _other_lm(kind)
    vocab = head.out_features
    x = ids() % vocab
    call = {}
    if kind in ("mamba2", "bamba", "nemotron_h"):
        mask = torch.ones_like(x)
        mask[1, :4] = 0
        call["attention_mask"] = mask
    target = [3, (-1, 7)]
    shapes = []
    handle = head.register_forward_hook(lambda m, a, out: shapes.append(tuple(out.shape)))
    try:
        rel, delta = MambaLRP(model).attribute(x, target=target, return_convergence_delta=True, **call)
        full, full_delta = MambaLRP(model).attribute(x, target=target, return_convergence_delta=True, **call, **{keep_all: 0})
    finally:
        handle.remove()
    assert shapes == [(2, 1, vocab), (2, 12, vocab)], shapes
    assert (full.abs().sum(1) > 0).all()
    torch.testing.assert_close(rel, full, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(delta, full_delta, atol=1e-6, rtol=1e-5)
