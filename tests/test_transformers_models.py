"""Pure attention stacks (transformers Llama and Qwen3): conservation with CP-LRP, AttnLRP's
loss through the softmax, every target form, padding, GQA/MQA, sliding windows, every
attn_implementation, the model restored bit for bit, unsupported attention refused."""

from __future__ import annotations

import pytest
import torch
from conftest import relative_delta
from torch import nn

from captum_mambalrp import MambaLRP
from captum_mambalrp.adapters import UnsupportedModelError
from captum_mambalrp.adapters.attention import active_modules

IMPLEMENTATIONS = ["eager", "sdpa"]


def randomize_norms(model: nn.Module, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
    return model


def make_transformer(arch: str = "llama", seed: int = 0, attn: str = "sdpa", **overrides) -> nn.Module:
    """A tiny random bias-free ``LlamaForCausalLM`` (GQA, 2 key/value heads) or
    ``Qwen3ForCausalLM`` (MQA, per-head q/k norms)."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

    base = dict(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        attention_bias=False,
        attn_implementation=attn,
    )
    if arch == "llama":
        cfg, cls = LlamaConfig(**{**base, "num_key_value_heads": 2, "mlp_bias": False, **overrides}), LlamaForCausalLM
    else:
        cfg, cls = Qwen3Config(**{**base, "num_key_value_heads": 1, "head_dim": 8, **overrides}), Qwen3ForCausalLM
    torch.manual_seed(seed)
    return randomize_norms(cls(cfg).eval(), seed)


def left_padded(batch: int, length: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 64, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    for i in range(1, batch):
        mask[i, : min(2 * i, length - 1)] = 0
    return ids, mask


def bound(explained: torch.Tensor) -> torch.Tensor:
    return 1e-5 * explained.abs().clamp_min(0.1)


@pytest.mark.parametrize("attn", IMPLEMENTATIONS)
@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_conservative_composite_conserves_with_left_padding(arch, attn):
    model = make_transformer(arch, seed=1, attn=attn)
    ids, mask = left_padded(3, 9, seed=2)
    logits = model(ids, attention_mask=mask).logits[:, -1, 5].detach()
    relevance, delta = MambaLRP(model, composite="conservative").attribute(
        ids, target=5, attention_mask=mask, return_convergence_delta=True
    )
    explained = relevance.sum(1) + delta
    assert torch.allclose(explained, logits, atol=1e-5, rtol=1e-4)  # the forward under the rules is the model's
    assert (delta.abs() <= bound(explained)).all(), (delta, explained)
    assert (relevance[mask == 0] == 0).all()
    assert model.config._attn_implementation == attn


# target -> (position, class) per example for a batch of 2 unpadded sequences of length 10
TARGETS = [
    (None, None),
    (7, [(9, 7), (9, 7)]),
    ((0, 3), [(0, 3), (0, 3)]),
    ((-2, 1), [(8, 1), (8, 1)]),
    ([1, 2], [(9, 1), (9, 2)]),
    (torch.tensor([4, 5]), [(9, 4), (9, 5)]),
    ([(1, 2), (-1, 0)], [(1, 2), (9, 0)]),
]


@pytest.mark.parametrize("target,expected", TARGETS, ids=[repr(t[0]) for t in TARGETS])
def test_conservative_every_target_form(target, expected):
    model = make_transformer("llama", seed=3)
    ids = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(1))
    logits = model(ids).logits.detach()
    if expected is None:
        expected = [(9, int(logits[i, 9].argmax())) for i in range(2)]
    explained = torch.stack([logits[i, p, c] for i, (p, c) in enumerate(expected)])
    relevance, delta = MambaLRP(model, composite="conservative").attribute(ids, target=target, return_convergence_delta=True)
    assert torch.allclose(relevance.sum(1) + delta, explained, atol=1e-5)
    assert (delta.abs() <= bound(explained)).all()


def test_attnlrp_default_lets_relevance_go_and_differs_from_cp_lrp():
    model = make_transformer("qwen3", seed=4)
    ids, mask = left_padded(2, 8, seed=5)
    rel, delta = MambaLRP(model).attribute(ids, target=3, attention_mask=mask, return_convergence_delta=True)
    rel_cp, delta_cp = MambaLRP(model, composite="conservative").attribute(
        ids, target=3, attention_mask=mask, return_convergence_delta=True
    )
    assert torch.allclose(rel.sum(1) + delta, rel_cp.sum(1) + delta_cp, atol=1e-6)  # the same explained logit
    assert (relative_delta(delta, rel.sum(1) + delta) > 1e-3).any()  # the softmax's share is reported
    assert not torch.allclose(rel, rel_cp, atol=1e-4)


def test_sliding_window_and_mqa():
    layers = ["sliding_attention", "full_attention"]
    model = make_transformer("qwen3", seed=6, attn="eager", use_sliding_window=True, sliding_window=3, layer_types=layers)
    ids, mask = left_padded(2, 9, seed=7)
    logits = model(ids, attention_mask=mask).logits[:, -1, 2].detach()
    relevance, delta = MambaLRP(model, composite="conservative").attribute(
        ids, target=2, attention_mask=mask, return_convergence_delta=True
    )
    assert torch.allclose(relevance.sum(1) + delta, logits, atol=1e-5, rtol=1e-4)
    assert (delta.abs() <= bound(logits)).all()


def test_base_model_and_embeddings():
    from transformers import LlamaModel

    lm = make_transformer("llama", seed=8)
    backbone: LlamaModel = lm.model

    class Head(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.backbone = backbone
            self.head = nn.Linear(32, 3, bias=False)

        def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None):
            h = self.backbone(input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask).last_hidden_state
            return self.head(h)

    model = Head().eval()
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(3))
    lrp = MambaLRP(model, composite="conservative")
    rel_ids, delta = lrp.attribute(ids, target=[0, 2], return_convergence_delta=True)
    rel_emb = lrp.attribute(backbone.embed_tokens(ids).detach(), target=[0, 2])
    assert torch.allclose(rel_emb.sum(-1), rel_ids, atol=1e-6)
    assert (delta.abs() <= bound(rel_ids.sum(1) + delta)).all()


def snapshot(model: nn.Module):
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        model.config._attn_implementation,
        repr(sorted(model.config.__dict__.items())),
        [sorted(m.__dict__.get("_forward_hooks", {})) for m in model.modules()],
        [("forward" in m.__dict__) for m in model.modules()],
        [p.requires_grad for p in model.parameters()],
    )


def same(a, b) -> bool:
    return all(torch.equal(a[0][k], b[0][k]) for k in a[0]) and a[1:] == b[1:]


@pytest.mark.parametrize("attn", IMPLEMENTATIONS)
def test_model_comes_back_unchanged_also_after_an_error(attn):
    model = make_transformer("llama", seed=9, attn=attn)
    before = snapshot(model)
    ids, mask = left_padded(2, 6, seed=1)
    out_before = model(ids, attention_mask=mask).logits
    lrp = MambaLRP(model)
    lrp.attribute(ids, target=1, attention_mask=mask)
    assert same(before, snapshot(model)) and not active_modules()
    assert torch.equal(model(ids, attention_mask=mask).logits, out_before)

    def boom(module, args, out):
        raise RuntimeError("boom")

    handle = model.model.layers[1].mlp.register_forward_hook(boom)
    with pytest.raises(RuntimeError, match="boom"):
        lrp.attribute(ids, target=1, attention_mask=mask)
    handle.remove()
    assert same(before, snapshot(model)) and not active_modules()
    assert model.config._attn_implementation_internal == attn


def test_unsupported_attention_class_is_refused_and_model_unchanged():
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    cfg = MistralConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2
    )
    model = MistralForCausalLM(cfg).eval()
    before = snapshot(model)
    with pytest.raises(UnsupportedModelError, match=r"'model\.layers\.0\.self_attn' \(MistralAttention\)") as refused:
        MambaLRP(model)
    assert "MistralMLP (e.g. 'model.layers.0.mlp')" in str(refused.value)  # a gated MLP no adapter reads
    assert same(before, snapshot(model))


def test_layer_relevance_is_conserved_at_every_decoder_layer():
    from captum_mambalrp import LayerMambaLRP

    model = make_transformer("llama", seed=1)
    ids, mask = left_padded(2, 7, seed=2)
    layers = list(model.model.layers)
    per_layer = LayerMambaLRP(model, layers, composite="conservative").attribute(ids, target=5, attention_mask=mask)
    tokens = MambaLRP(model, composite="conservative").attribute(ids, target=5, attention_mask=mask)
    for relevance in per_layer:
        assert relevance.shape == (2, 7, 32)
        assert torch.allclose(relevance.sum(dim=(1, 2)), tokens.sum(1), atol=1e-6)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_bare_model_hidden_unit_is_explained_and_conserved(arch):
    """``LlamaModel`` / ``Qwen3Model``: the explained score is a hidden unit of the last real token."""
    model = make_transformer(arch, seed=7).model
    ids, mask = left_padded(2, 6, seed=2)
    hidden = model(ids, attention_mask=mask).last_hidden_state[:, -1, 3].detach()
    relevance, delta = MambaLRP(model, composite="conservative").attribute(
        ids, target=3, attention_mask=mask, return_convergence_delta=True
    )
    assert torch.allclose(relevance.sum(1) + delta, hidden, atol=1e-5)
    assert (delta.abs() <= bound(hidden)).all(), (delta, hidden)
