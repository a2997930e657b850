"""The Captum-facing contract: inputs, targets, padding, batches, dtypes, errors, and the
model coming back unchanged."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import LastTokenClassifier, make_lm, zero_biases
from torch import nn

from captum_mambalrp import GradientRule, MambaLRP, UnsupportedModelError


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
