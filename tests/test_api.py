"""The Captum-facing contract: inputs, targets, padding, batches, dtypes, errors, and the
model coming back unchanged."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import LastTokenClassifier, make_lm, zero_biases
from torch import nn

from captum_mambalrp import GradientRule, LayerMambaLRP, MambaLRP, UnsupportedModelError


def ids_for(batch, length, seed=0):
    return torch.randint(1, 64, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("arch", ["mamba", "falcon"])
def test_padding_invariance_and_zero_relevance_on_pads(side, arch):
    model = make_lm(arch, seed=1)
    lengths = [9, 14, 5]
    seqs = [ids_for(1, n, seed=n)[0] for n in lengths]
    L = max(lengths)
    ids = torch.zeros(3, L, dtype=torch.long)
    mask = torch.zeros(3, L, dtype=torch.long)
    for i, s in enumerate(seqs):
        sl = slice(L - len(s), L) if side == "left" else slice(0, len(s))
        ids[i, sl], mask[i, sl] = s, 1
    lrp = MambaLRP(model)
    batched = lrp.attribute(ids, target=[3, 4, 5], attention_mask=mask)
    via_args = lrp.attribute(ids, target=[3, 4, 5], additional_forward_args=(mask,))
    assert torch.equal(batched, via_args)
    assert (batched[mask == 0] == 0).all()
    for i, s in enumerate(seqs):
        alone = lrp.attribute(s[None], target=3 + i)[0]
        assert torch.allclose(batched[i][mask[i] == 1], alone, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("arch", ["mamba", "falcon", "mamba2"])
def test_low_precision_padding_gives_finite_relevance_and_zero_on_pads(arch, dtype):
    """A bf16 / fp16 model with left padding: relevance finite everywhere, zero on the pads, and
    conserved to the dtype's rounding. (fp16 rounds LRP-epsilon's default 1e-9 to zero, which once
    gave ``0 / 0`` at a padded token's zero outputs: NaN relevance there.)"""
    if arch == "mamba2":
        from test_mamba2 import make_mamba2

        model = make_mamba2(seed=3)
    else:
        model = make_lm(arch, seed=3)
    model = model.to(dtype)
    ids = ids_for(2, 12, seed=4)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    relevance, delta = MambaLRP(model).attribute(ids, target=3, attention_mask=mask, return_convergence_delta=True)
    r = relevance.float()
    assert torch.isfinite(r).all() and (r[mask == 0] == 0).all()
    explained = r.sum(tuple(range(1, r.dim()))) + delta.float()
    assert (delta.float().abs() <= 2e-2 * r.abs().sum(tuple(range(1, r.dim())))).all(), (delta, explained)


def test_batch_equals_single_examples():
    model = make_lm("mamba", seed=2)
    ids = ids_for(4, 17, seed=2)
    lrp = MambaLRP(model)
    batched = lrp.attribute(ids, target=(-3, 6))
    for i in range(4):
        assert torch.allclose(batched[i], lrp.attribute(ids[i : i + 1], target=(-3, 6))[0], atol=1e-6, rtol=1e-4)


def snapshot(model: nn.Module):
    return {
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "training": {n: m.training for n, m in model.named_modules()},
        "forward": {n: m.__dict__.get("forward") for n, m in model.named_modules()},
        "hooks": {
            n: (dict(m._forward_hooks), dict(m._forward_pre_hooks), dict(m._backward_hooks)) for n, m in model.named_modules()
        },
        "grad": {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()},
        "rule": {n: getattr(m, "rule", "none") for n, m in model.named_modules()},
    }


def assert_unchanged(model, before):
    after = snapshot(model)
    for key in before["state"]:
        assert torch.equal(before["state"][key], after["state"][key]), key
    for field in ("requires_grad", "training", "forward", "hooks", "rule"):
        assert before[field] == after[field], field
    for n, g in before["grad"].items():
        assert (g is None and after["grad"][n] is None) or torch.equal(g, after["grad"][n]), n


def test_model_comes_back_unchanged():
    model = make_lm("mamba", seed=3)
    model.backbone.layers[0].mixer.x_proj.weight.requires_grad_(False)  # a user's own choice
    model.lm_head.weight.grad = torch.randn_like(model.lm_head.weight)
    user_hook = model.backbone.norm_f.register_forward_hook(lambda *a: None)
    before = snapshot(model)
    with torch.no_grad():
        logits_before = model(ids_for(2, 8)).logits
    lrp = MambaLRP(model)
    for _ in range(2):
        lrp.attribute(ids_for(2, 8), target=1)
    assert_unchanged(model, before)
    with torch.no_grad():
        assert torch.equal(model(ids_for(2, 8)).logits, logits_before)
    user_hook.remove()


def test_model_restored_when_an_exception_is_raised_midway():
    model = make_lm("mamba", seed=4)
    before = snapshot(model)

    def explode(module, args, out):
        raise RuntimeError("boom inside the forward")

    handle = model.backbone.layers[1].mixer.out_proj.register_forward_hook(explode)
    before_with_hook = snapshot(model)
    with pytest.raises(RuntimeError, match="boom"):
        MambaLRP(model).attribute(ids_for(1, 6), target=0)
    assert_unchanged(model, before_with_hook)
    handle.remove()
    assert_unchanged(model, before)
    with pytest.raises(IndexError):  # and after a validation error
        MambaLRP(model).attribute(ids_for(1, 6), target=10_000)
    assert_unchanged(model, before)


def test_train_mode_no_grad_and_repeated_calls():
    model = zero_biases(make_lm("mamba", seed=5))
    ids = ids_for(2, 10)
    lrp = MambaLRP(model)
    ref = lrp.attribute(ids, target=2)
    model.train()
    try:
        with torch.no_grad():
            in_train = lrp.attribute(ids, target=2)
        assert model.training
    finally:
        model.eval()
    assert torch.allclose(ref, in_train, atol=1e-6)
    assert torch.equal(lrp.attribute(ids, target=2), lrp.attribute(ids, target=2))


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 5e-2), (torch.float16, 1e-2)])
def test_half_precision_models(dtype, tol):
    try:
        torch.ones(2, 2, dtype=dtype) @ torch.ones(2, 2, dtype=dtype)
    except RuntimeError as err:  # torch 2.1 has no float16 matrix product on the CPU
        pytest.skip(f"this torch cannot compute in {dtype} on the CPU: {err}")
    model = zero_biases(make_lm("mamba", seed=6)).to(dtype)
    ids = ids_for(2, 12)
    relevance, delta = MambaLRP(model).attribute(ids, target=3, return_convergence_delta=True)
    assert relevance.dtype == torch.float32 and torch.isfinite(relevance).all()
    explained = relevance.sum(1) + delta
    assert (delta.abs() <= tol * explained.abs().clamp_min(1e-2)).all(), (delta, explained)
    fp32 = MambaLRP(zero_biases(make_lm("mamba", seed=6))).attribute(ids, target=3)
    assert torch.corrcoef(torch.stack([relevance.flatten(), fp32.flatten()]))[0, 1] > 0.98


def test_model_output_forms():
    """Tensor, tuple and ModelOutput outputs; [B, C] and [B] outputs with Captum's targets."""
    backbone = zero_biases(make_lm("mamba", seed=7)).backbone

    class Pooled(nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone, self.head = backbone, nn.Linear(16, 4, bias=False)

        def forward(self, input_ids):
            return (self.head(self.backbone(input_ids).last_hidden_state[:, -1]),)

    class Scalar(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids):
            return self.inner(input_ids)[0][:, 2]

    ids = ids_for(3, 7)
    pooled = Pooled().eval()
    rel, delta = MambaLRP(pooled).attribute(ids, target=torch.tensor([0, 1, 3]), return_convergence_delta=True)
    assert (delta.abs() < 1e-5).all()
    none_rel = MambaLRP(pooled).attribute(ids)  # None: the predicted class
    pred = pooled(ids)[0].argmax(-1)
    assert torch.allclose(none_rel, MambaLRP(pooled).attribute(ids, target=pred))
    scalar_rel = MambaLRP(Scalar(pooled).eval()).attribute(ids)
    assert torch.allclose(scalar_rel, MambaLRP(pooled).attribute(ids, target=2))
    with pytest.raises(ValueError, match="target=None"):
        MambaLRP(Scalar(pooled).eval()).attribute(ids, target=1)


def test_tuple_inputs_give_tuple_output():
    model = make_lm("mamba")
    out = MambaLRP(model).attribute((ids_for(1, 5),), target=0)
    assert isinstance(out, tuple) and out[0].shape == (1, 5)


ERRORS = [
    (lambda ids: dict(inputs=ids, target=64), IndexError, "out of range.*64 output classes"),
    (lambda ids: dict(inputs=ids, target=(20, 1)), IndexError, "position 20 is out of range"),
    (lambda ids: dict(inputs=ids.float(), target=1), TypeError, "token ids are expected"),
    (lambda ids: dict(inputs=ids[:, :0], target=1), ValueError, "empty sequence"),
    (lambda ids: dict(inputs=ids, target=1, attention_mask=torch.ones(2, 5)), ValueError, "attention_mask has shape"),
    (lambda ids: dict(inputs=ids, target=1, attention_mask=torch.zeros(2, 8)), ValueError, "no real token"),
    (
        lambda ids: dict(inputs=ids, target=1, attention_mask=torch.tensor([[1] * 8, [1, 1, 0, 1, 1, 1, 1, 0]])),
        ValueError,
        r"row 1 has padding between real tokens \(\[1, 1, 0, 1, 1, 1, 1, 0\]\): padding must be contiguous",
    ),
    (lambda ids: dict(inputs=ids + 100, target=1), IndexError, "ids must lie in"),
    (lambda ids: dict(inputs=ids, target=[1, 2, 3]), ValueError, "3 entries for a batch of 2"),
    (lambda ids: dict(inputs=torch.randn(2, 8, 5), target=1), ValueError, "hidden size 5"),
]


@pytest.mark.parametrize("make,exc,match", ERRORS, ids=[e[2] for e in ERRORS])
def test_clear_errors(make, exc, match):
    model = make_lm("mamba")
    with pytest.raises(exc, match=match):
        MambaLRP(model).attribute(**make(ids_for(2, 8)))


def test_models_without_mamba_blocks_or_with_attention_are_refused():
    with pytest.raises(UnsupportedModelError, match="contains no supported Mamba mixer"):
        MambaLRP(nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 2)))

    class SelfAttention(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k = nn.Linear(16, 16), nn.Linear(16, 16)

        def forward(self, h):
            return torch.softmax(self.q(h) @ self.k(h).transpose(1, 2), -1) @ h

    class Hybrid(nn.Module):
        def __init__(self):
            super().__init__()
            self.mamba = make_lm("mamba").backbone
            self.attn = SelfAttention()

        def forward(self, input_ids):
            return self.attn(self.mamba(input_ids).last_hidden_state)

    with pytest.raises(UnsupportedModelError, match="'attn' \\(SelfAttention\\).*attention"):
        MambaLRP(Hybrid())
    hybrid = Hybrid()
    hybrid.attn.rule = GradientRule()  # explicit opt-in: plain gradient through attention
    MambaLRP(hybrid).attribute(ids_for(1, 4), target=(-1, 0))

    class Weird(nn.Module):
        def forward(self, x):
            return x

    model = make_lm("mamba")
    model.backbone.extra = Weird()
    with pytest.raises(UnsupportedModelError, match="unknown layer type"):
        MambaLRP(model)


def test_from_pretrained_roundtrip(tmp_path):
    from transformers import AutoModelForCausalLM

    model = make_lm("falcon", seed=9)
    model.save_pretrained(tmp_path / "ckpt")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt").eval()
    ids = ids_for(1, 11)
    assert torch.allclose(MambaLRP(loaded).attribute(ids, target=2), MambaLRP(model).attribute(ids, target=2))


def test_mamba_model_without_head_and_classifier():
    backbone = zero_biases(make_lm("mamba", seed=10)).backbone
    # MambaModel returns hidden states [B, L, H]: a target (position, unit) explains one unit
    rel, delta = MambaLRP(backbone).attribute(ids_for(1, 6), target=(-1, 3), return_convergence_delta=True)
    assert delta.abs().max() < 1e-5
    clf = LastTokenClassifier(copy.deepcopy(backbone)).eval()
    rel, delta = MambaLRP(clf).attribute(ids_for(2, 6), target=1, return_convergence_delta=True)
    assert delta.abs().max() < 1e-5


@pytest.mark.skipif(not hasattr(nn, "RMSNorm"), reason="torch.nn.RMSNorm needs torch >= 2.4")
def test_head_with_layernorm_rmsnorm_and_activation_conserves():
    """Norms and activations outside the mixers get the norm and identity rules too."""
    backbone = zero_biases(make_lm("mamba", seed=12)).backbone

    class Head(nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = backbone
            self.ln, self.act, self.rms = nn.LayerNorm(16, bias=False), nn.Tanh(), nn.RMSNorm(16)
            self.out = nn.Linear(16, 3, bias=False)

        def forward(self, input_ids):
            h = self.backbone(input_ids).last_hidden_state[:, -1]
            return self.out(self.rms(self.act(self.ln(h))))

    model = Head().eval()
    with torch.no_grad():
        model.ln.weight.normal_()
        model.rms.weight.normal_()
    rel, delta = MambaLRP(model).attribute(ids_for(2, 9), target=1, return_convergence_delta=True)
    logit = model(ids_for(2, 9))[:, 1].detach()
    assert (delta.abs() <= 1e-5 * logit.abs().clamp_min(1e-3)).all(), (delta, logit)
    table = MambaLRP(model).rule_table()
    assert table["ln"] == table["rms"] == "ConstantNormRule()" and table["act"].startswith("IdentityActivationRule")


@pytest.mark.parametrize("arch", ["mamba", "falcon"])
def test_recompute_gives_the_same_relevance(arch):
    """Mixers recomputed in the backward pass (activation checkpointing): same numbers."""
    model = make_lm(arch, seed=13, num_hidden_layers=3)
    ids = ids_for(2, 30)
    before = snapshot(model)
    kept = MambaLRP(model, recompute=False).attribute(ids, target=4)
    again = MambaLRP(model, recompute=True).attribute(ids, target=4)
    assert torch.allclose(kept, again, atol=1e-6, rtol=1e-5)
    assert_unchanged(model, before)
    with pytest.raises(ValueError, match="recompute"):
        MambaLRP(model, recompute="sometimes")


def test_padding_on_both_ends_is_one_block_of_real_tokens():
    """Padding at both ends (one block of real tokens) is accepted and is padding invariant; a hole is not."""
    model = make_lm("mamba", seed=14)
    seq = ids_for(1, 5, seed=5)
    ids = torch.cat([torch.zeros(1, 2, dtype=torch.long), seq, torch.zeros(1, 3, dtype=torch.long)], dim=1)
    mask = (torch.arange(10) >= 2) & (torch.arange(10) < 7)
    lrp = MambaLRP(model)
    both = lrp.attribute(ids, target=2, attention_mask=mask.long()[None])
    assert (both[0, ~mask] == 0).all()
    assert torch.allclose(both[0, mask], lrp.attribute(seq, target=2)[0], atol=1e-6, rtol=1e-4)
    holed = mask.clone()
    holed[4] = False
    with pytest.raises(ValueError, match="padding between real tokens"):
        lrp.attribute(ids, target=2, attention_mask=holed.long()[None])
    with pytest.raises(ValueError, match="padding between real tokens"):
        LayerMambaLRP(model, model.backbone.layers[0]).attribute(ids, target=2, attention_mask=holed.long()[None])


def _layer(model, **options):
    return LayerMambaLRP(model, model.backbone.layers[-1], **options)


FRONT_END_ERRORS = [
    (lambda m: dict(backend="cuda"), ValueError, "unknown backend 'cuda'"),
    (lambda m: dict(cuda_graph="yes"), TypeError, "cuda_graph must be True or False"),
    (lambda m: dict(recompute="sometimes"), ValueError, "recompute"),
    (lambda m: dict(composite="no_such_composite"), ValueError, "unknown composite 'no_such_composite'"),
    (lambda m: dict(rules={"*.no_such_module": GradientRule()}), KeyError, "no_such_module"),
    (lambda m: dict(embedding=m.lm_head), TypeError, "embedding must be the model's token embedding"),
    (lambda m: dict(embedding=nn.Embedding(64, 16)), ValueError, "embedding is not a module of the model"),
]


@pytest.mark.parametrize("make,exc,match", FRONT_END_ERRORS, ids=[e[2] for e in FRONT_END_ERRORS])
@pytest.mark.parametrize("cls", ["MambaLRP", "LayerMambaLRP"])
def test_one_front_end_checks_the_same_options(cls, make, exc, match):
    """MambaLRP and LayerMambaLRP share their options and checks (at construction)."""
    model = make_lm("mamba", seed=15)
    build = MambaLRP if cls == "MambaLRP" else _layer
    with pytest.raises(exc, match=match):
        build(model, **make(model))


def test_layer_mambalrp_fails_at_construction_and_checks_its_layers():
    with pytest.raises(UnsupportedModelError, match="contains no supported Mamba mixer"):
        model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 2))
        LayerMambaLRP(model, model[1])
    model = make_lm("mamba", seed=16)
    with pytest.raises(ValueError, match="not a module of the model"):
        LayerMambaLRP(model, copy.deepcopy(model.backbone.layers[0]))
    with pytest.raises(ValueError, match="at least one layer"):
        LayerMambaLRP(model, [])
    with pytest.raises(TypeError, match="needs an nn.Module"):
        LayerMambaLRP(lambda x: x, model.backbone.layers[0])


def test_layer_mambalrp_embedding_option():
    """``embedding=`` names the input embedding of a model with several (ids are checked against it), as in MambaLRP."""

    class TwoTables(nn.Module):  # no get_input_embeddings(), two nn.Embedding: none is guessed
        def __init__(self):
            super().__init__()
            self.backbone = make_lm("mamba", seed=17).backbone
            self.side_table = nn.Embedding(8, 16)
            self.lm_head = nn.Linear(16, 3, bias=False)

        def forward(self, input_ids=None, attention_mask=None):
            return self.lm_head(self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state)

    model = TwoTables()
    emb, block, ids = model.backbone.embeddings, model.backbone.layers[1], ids_for(2, 6)
    assert LayerMambaLRP(model, block).embedding is None
    with pytest.raises(ValueError, match="cannot find the model's token embedding.*embedding="):
        MambaLRP(model).attribute(ids, target=1)
    layer = LayerMambaLRP(model, block, embedding=emb)
    assert layer.embedding is emb
    with pytest.raises(IndexError, match="ids must lie in"):
        layer.attribute(ids + 64, target=1)
    assert torch.equal(layer.attribute(ids, target=1), LayerMambaLRP(model, block).attribute(ids, target=1))
    # and at the embedding itself it is MambaLRP's relevance with the same embedding=
    at_embedding = LayerMambaLRP(model, emb, embedding=emb).attribute(ids, target=1).sum(-1)
    assert torch.allclose(at_embedding, MambaLRP(model, embedding=emb).attribute(ids, target=1), atol=1e-6)


def test_layer_mambalrp_cuda_graph_path_equals_eager():
    """cuda_graph=True: ignored for CPU inputs (same numbers); the pass the CUDA-graph cache records
    (the layers' relevances packed into one tensor, split again) gives the eager relevances, checked
    here by running the cache's pass eagerly (the replay itself: tests/test_cuda_graphs.py on a GPU)."""
    from captum_mambalrp.attribution.targets import TargetSelector

    model = zero_biases(make_lm("falcon", seed=18, num_hidden_layers=3))
    ids = ids_for(2, 7)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    layers = [model.backbone.embeddings, *model.backbone.layers]
    eager, deltas = LayerMambaLRP(model, layers).attribute(ids, target=3, attention_mask=mask, return_convergence_delta=True)
    graphed = LayerMambaLRP(model, layers, cuda_graph=True)
    same = graphed.attribute(ids, target=3, attention_mask=mask)
    assert all(torch.equal(a, b) for a, b in zip(eager, same)) and len(graphed.cuda_graphs) == 0

    class EagerCache:  # what GraphCache.relevance computes on its first (eager) call
        calls = 0

        def relevance(self, call, target, run, state):
            EagerCache.calls += 1
            return run(call, TargetSelector(target, call.target_mask))

    graphed.cuda_graphs = EagerCache()
    graphed._use_graph = lambda inputs: True
    packed, packed_deltas = graphed.attribute(
        ids, target=3, attention_mask=mask, return_convergence_delta=True, attribute_to_layer_input=False
    )
    assert EagerCache.calls == 1
    for a, b, da, db in zip(eager, packed, deltas, packed_deltas):
        assert a.shape == b.shape and torch.equal(a, b) and torch.equal(da, db)
    single = LayerMambaLRP(model, layers[2], cuda_graph=True)
    single.cuda_graphs, single._use_graph = EagerCache(), lambda inputs: True
    assert torch.equal(
        single.attribute(ids, target=3, attention_mask=mask, attribute_to_layer_input=True),
        LayerMambaLRP(model, layers[2]).attribute(ids, target=3, attention_mask=mask, attribute_to_layer_input=True),
    )


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_layer_mambalrp_cuda_graph_replay_on_gpu():
    model = zero_biases(make_lm("mamba", seed=19, num_hidden_layers=2)).cuda()
    layers = list(model.backbone.layers)
    eager = LayerMambaLRP(model, layers).attribute(ids_for(2, 64).cuda(), target=3)
    graphed = LayerMambaLRP(model, layers, cuda_graph=True)
    for _ in range(3):  # record, then replay twice
        replayed = graphed.attribute(ids_for(2, 64).cuda(), target=3)
        for a, b in zip(eager, replayed):
            assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)
    assert graphed.cuda_graphs.captures == 1 and graphed.cuda_graphs.replays == 2
