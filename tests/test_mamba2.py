"""transformers' Mamba2 (and Codestral-style configurations): conservation, references, padding,
and the model-unchanged guarantees (the hybrids built on Mamba2-like mixers: tests/test_hybrids.py)."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import LastTokenClassifier, randomize, relative_delta
from mamba2_reference import reference_relevance
from test_api import assert_unchanged, snapshot
from test_scan import sequential_ssd
from transformers import Mamba2Config, Mamba2ForCausalLM

from captum_mambalrp import MambaLRP
from captum_mambalrp.adapters import install_rules
from captum_mambalrp.rules import composite
from captum_mambalrp.scan import ssd_scan


def zero_relevance_biases(model):
    """Zero every bias that carries relevance (``dt_bias`` is a scan parameter)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") and not name.endswith("dt_bias"):
                p.zero_()
    return model


def make_mamba2(seed: int = 0, bias_free: bool = True, **overrides):
    from transformers import Mamba2Config, Mamba2ForCausalLM

    cfg = dict(
        vocab_size=64,
        hidden_size=16,
        state_size=4,
        num_hidden_layers=2,
        expand=2,
        num_heads=4,
        head_dim=8,
        n_groups=2,
        chunk_size=8,
        conv_kernel=4,
        use_bias=False,
        use_conv_bias=True,
    )
    cfg.update(overrides)
    torch.manual_seed(seed)
    model = Mamba2ForCausalLM(Mamba2Config(**cfg)).eval()
    randomize(model, seed)
    return zero_relevance_biases(model) if bias_free else model


def ids_for(batch, length, seed=0):
    return torch.randint(1, 64, (batch, length), generator=torch.Generator().manual_seed(seed))


# layers, hidden, expand, heads, head_dim, groups, state, chunk, conv, length, batch, dt limit
SHAPES = [
    (1, 8, 2, 2, 8, 1, 2, 4, 2, 1, 1, (0.0, math.inf)),
    (2, 16, 2, 4, 8, 2, 4, 8, 4, 37, 3, (0.0, math.inf)),
    (2, 32, 2, 8, 8, 4, 8, 16, 4, 130, 2, (0.0, math.inf)),
    (3, 24, 1, 6, 4, 3, 4, 32, 3, 75, 2, (0.0, 0.05)),
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "L{}h{}e{}H{}P{}g{}n{}c{}k{}len{}b{}".format(*s[:11]))
def test_conservation_bias_free(shape):
    layers, hidden, expand, heads, head_dim, groups, state, chunk, conv, length, batch, limit = shape
    model = make_mamba2(
        seed=length,
        num_hidden_layers=layers,
        hidden_size=hidden,
        expand=expand,
        num_heads=heads,
        head_dim=head_dim,
        n_groups=groups,
        state_size=state,
        chunk_size=chunk,
        conv_kernel=conv,
        time_step_limit=limit,
    )
    ids = ids_for(batch, length, seed=length)
    relevance, delta = MambaLRP(model).attribute(ids, target=5, return_convergence_delta=True)
    logits = model(ids).logits[:, -1, 5].detach()
    assert relevance.shape == (batch, length)
    assert torch.allclose(relevance.sum(1) + delta, logits, atol=1e-5, rtol=1e-5)
    assert (relative_delta(delta, logits) <= 1e-5).all(), (delta, logits)


def test_rule_table_names_the_mamba2_components():
    table = MambaLRP(make_mamba2()).rule_table()
    mixer = "backbone.layers.0.mixer"
    assert table[f"{mixer}.ssm"] == "ConstantSSMRule()" and table[f"{mixer}.gate"] == "HalfGateRule()"
    assert table[f"{mixer}.norm"] == "ConstantNormRule()" and table["backbone.norm_f"] == "ConstantNormRule()"
    assert table[f"{mixer}.conv_act"].startswith("IdentityActivationRule")
    assert {f"{mixer}.in_proj", f"{mixer}.conv1d", f"{mixer}.out_proj"} <= set(table)


@pytest.mark.parametrize("groups,chunk,length", [(1, 4, 9), (2, 8, 23), (4, 8, 30)])
def test_relevance_matches_independent_reference(groups, chunk, length):
    model = make_mamba2(seed=groups, n_groups=groups, chunk_size=chunk, num_heads=4)
    ids = ids_for(2, length, seed=groups)
    expected, logit = reference_relevance(model, ids, position=length - 1, cls=7)
    relevance, delta = MambaLRP(model).attribute(ids, target=7, return_convergence_delta=True)
    assert torch.allclose(relevance, expected, atol=1e-5, rtol=1e-4), (relevance - expected).abs().max()
    assert torch.allclose(relevance.sum(1) + delta, logit, atol=1e-5)


@pytest.mark.parametrize("name", ["mambalrp", "gradient"])
def test_takeover_forward_equals_transformers_chunked_forward(name):
    """With the rules in place the model computes what transformers' chunked SSD path computes."""
    model = make_mamba2(seed=3, bias_free=False, n_groups=2, chunk_size=8, time_step_limit=(0.0, 0.08))
    ids = ids_for(2, 29, seed=3)
    with torch.no_grad():
        expected = model(ids).logits
        inst = install_rules(model, composite(name))
        try:
            got = model(ids).logits
        finally:
            inst.patcher.restore()
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-5), (got - expected).abs().max()


@pytest.mark.parametrize(
    "groups,chunk,length,limit", [(1, 4, 10, (0.0, math.inf)), (2, 8, 37, (0.0, 0.04)), (4, 16, 64, (0.01, 0.2))]
)
def test_ssd_scan_agrees_with_transformers_chunked_scan_and_sequential_recurrence(groups, chunk, length, limit):
    """The scan used for relevance (``ssd_scan``), transformers' chunked SSD (``mamba2_chunk_scan``,
    what the model runs) and a plain sequential recurrence, on the same constant parameters."""
    from transformers.models.mamba2.modeling_mamba2 import mamba2_chunk_scan

    g = torch.Generator().manual_seed(length)
    b, heads, p, n = 2, 4, 3, 5
    x = torch.randn(b, length, heads, p, generator=g)
    dt_raw, dt_bias = torch.randn(b, length, heads, generator=g), torch.randn(heads, generator=g) - 2
    A = -torch.rand(heads, generator=g) * 2
    B, C = torch.randn(b, length, groups, n, generator=g), torch.randn(b, length, groups, n, generator=g)
    D = torch.randn(heads, generator=g)
    dt = torch.nn.functional.softplus(dt_raw + dt_bias).clamp(*limit)
    chunked = mamba2_chunk_scan(x, dt_raw, A, B, C, chunk_size=chunk, D=D, dt_bias=dt_bias, dt_softplus=True, dt_limit=limit)
    ours = ssd_scan(x, dt, A, B, C, D)
    sequential = sequential_ssd(x.double(), dt.double(), A.double(), B.double(), C.double(), D.double())
    assert torch.allclose(ours.double(), sequential, atol=1e-5, rtol=1e-4)
    assert torch.allclose(chunked.double(), sequential, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_invariance_and_zero_relevance_on_pads(side):
    model = make_mamba2(seed=4, bias_free=False)
    lengths = [9, 14, 5]
    seqs = [ids_for(1, n, seed=n)[0] for n in lengths]
    L = max(lengths)
    ids, mask = torch.zeros(3, L, dtype=torch.long), torch.zeros(3, L, dtype=torch.long)
    for i, s in enumerate(seqs):
        sl = slice(L - len(s), L) if side == "left" else slice(0, len(s))
        ids[i, sl], mask[i, sl] = s, 1
    lrp = MambaLRP(model)
    batched = lrp.attribute(ids, target=[3, 4, 5], attention_mask=mask)
    assert (batched[mask == 0] == 0).all()
    for i, s in enumerate(seqs):
        alone = lrp.attribute(s[None], target=3 + i)[0]
        assert torch.allclose(batched[i][mask[i] == 1], alone, atol=1e-6, rtol=1e-4)


def test_batch_equals_single_examples_and_classifier_head():
    model = make_mamba2(seed=5)
    ids = ids_for(3, 19, seed=5)
    lrp = MambaLRP(model)
    batched = lrp.attribute(ids, target=(-4, 6))
    for i in range(3):
        assert torch.allclose(batched[i], lrp.attribute(ids[i : i + 1], target=(-4, 6))[0], atol=1e-6, rtol=1e-4)
    embeds = model.backbone.embeddings(ids).detach()
    assert torch.allclose(lrp.attribute(embeds, target=(-4, 6)).sum(-1), batched, atol=1e-6, rtol=1e-4)
    clf = LastTokenClassifier(model.backbone, n_classes=3).eval()
    rel, delta = MambaLRP(clf).attribute(ids, target=[0, 1, 2], return_convergence_delta=True)
    logits = clf(ids)[torch.arange(3), -1, torch.tensor([0, 1, 2])].detach()
    assert (relative_delta(delta, logits) <= 1e-5).all()


def test_model_comes_back_unchanged():
    model = make_mamba2(seed=6, bias_free=False)
    model.lm_head.weight.grad = torch.randn_like(model.lm_head.weight)
    before = snapshot(model)
    with torch.no_grad():
        logits = model(ids_for(2, 11)).logits
    MambaLRP(model).attribute(ids_for(2, 11), target=1)
    MambaLRP(model, composite="gradient").attribute(ids_for(2, 11), target=1)
    assert_unchanged(model, before)
    with torch.no_grad():
        assert torch.equal(model(ids_for(2, 11)).logits, logits)


def test_gradient_x_input_does_not_conserve():
    model = make_mamba2(seed=7, num_hidden_layers=3)
    ids = ids_for(4, 40, seed=7)
    emb = model.backbone.embeddings(ids).detach().requires_grad_(True)
    logit = model(inputs_embeds=emb).logits[:, -1, 5]
    (grad,) = torch.autograd.grad(logit.sum(), emb)
    gxi = (emb * grad).sum((1, 2)).detach()
    assert (relative_delta(logit.detach() - gxi, logit.detach()) > 1e-2).all()
    # the "gradient" composite through the takeover is exactly that plain Gradient x Input
    relevance = MambaLRP(model, composite="gradient").attribute(ids, target=5)
    assert torch.allclose(relevance.sum(1), gxi, atol=1e-5, rtol=1e-4)
    # and each MambaLRP rule matters: dropping the norm rule (now also the grouped norm) breaks it
    _, delta = MambaLRP(model, composite="no_norm_rule").attribute(ids, target=5, return_convergence_delta=True)
    assert (relative_delta(delta, logit.detach()) > 1e-3).any()


def test_half_precision_model():
    """A bf16 model: float32 relevance, conserved to bf16's precision, and near the relevance of
    the same weights in float32 (the bf16 rounding of weights and activations apart)."""
    model = make_mamba2(seed=8)
    ids = ids_for(2, 12)
    full = MambaLRP(model).attribute(ids, target=3)
    model = model.to(torch.bfloat16)
    relevance, delta = MambaLRP(model).attribute(ids, target=3, return_convergence_delta=True)
    assert relevance.dtype == torch.float32 and torch.isfinite(relevance).all()
    explained = relevance.sum(1) + delta
    assert (delta.abs() <= 5e-2 * explained.abs().clamp_min(1e-2)).all()
    assert float((relevance - full).norm() / full.norm()) <= 0.05  # 0.018-0.021 over seeds 8-10
    assert torch.equal(relevance.abs().argmax(1), full.abs().argmax(1))  # the same most relevant token


def test_gated_norm_without_group_size_normalises_all_channels():
    """transformers releases before the grouped norm (5.17 on the GPU machine) have a
    ``MambaRMSNormGated`` without ``group_size``: one group over all channels."""
    from captum_mambalrp.adapters.hf_mamba2 import hf_mamba2_parts

    model = Mamba2ForCausalLM(
        Mamba2Config(
            vocab_size=32,
            hidden_size=16,
            num_hidden_layers=1,
            expand=2,
            head_dim=8,
            state_size=4,
            n_groups=2,
            chunk_size=8,
            num_heads=4,
        )
    ).eval()
    norm = model.backbone.layers[0].mixer.norm
    assert hf_mamba2_parts(model.backbone.layers[0].mixer).norm.group_size == norm.group_size
    del norm.group_size
    assert hf_mamba2_parts(model.backbone.layers[0].mixer).norm.group_size == norm.weight.shape[-1]
