"""transformers' hybrid models (Jamba, Bamba, Zamba2, NemotronH, GraniteMoeHybrid, FalconH1).

Two levels:

- each family's SSM mixer, built from the real config class with tiny sizes, in a host model
  ``embedding -> mixer -> linear head``: its taken-over forward equals the original, its
  relevance equals an independent step-by-step MambaLRP (``tests/mamba2_reference.py``,
  ``tests/reference_mambalrp.py``, and Falcon-H1's multipliers and norm variants written out
  below), and left padding changes nothing for the real tokens;
- the full models (attention, MLP, MoE, norms included) with ``composite="conservative"``,
  all biases zero, left padding and every target form: ``|sum R - logit| <= 1e-5 max(|logit|, 0.1)``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import transformers
from mamba2_reference import _mixer as mamba2_reference_mixer
from reference_mambalrp import _mixer as mamba1_reference_mixer
from test_api import assert_unchanged, snapshot
from torch import nn

from captum_mambalrp import MambaLRP, UnsupportedModelError
from captum_mambalrp.adapters import install_rules
from captum_mambalrp.rules import composite

VOCAB = 64


def _common(**overrides):
    base = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        intermediate_size=32,
        pad_token_id=0,
    )
    base.update(overrides)
    return base


_MAMBA2 = dict(mamba_n_heads=4, mamba_d_head=16, mamba_n_groups=2, mamba_d_state=8, mamba_chunk_size=4)
# family -> (model class, config class, config kwargs, mixer class)
FAMILIES = {
    "jamba": (
        "JambaForCausalLM",
        "JambaConfig",
        dict(
            attn_layer_period=2,
            attn_layer_offset=1,
            expert_layer_period=2,
            expert_layer_offset=1,
            num_experts=2,
            num_experts_per_tok=1,
            mamba_d_state=4,
            mamba_dt_rank=4,
            mamba_d_conv=3,
        ),
        "JambaMambaMixer",
    ),
    "bamba": (
        "BambaForCausalLM",
        "BambaConfig",
        dict(attn_layer_indices=[1], **_MAMBA2),
        "BambaMixer",
    ),
    "zamba2": (
        "Zamba2ForCausalLM",
        "Zamba2Config",
        dict(
            mamba_d_state=8,
            mamba_headdim=16,
            n_mamba_heads=4,
            mamba_ngroups=2,
            chunk_size=4,
            layers_block_type=["mamba", "hybrid", "mamba", "hybrid"],
            num_hidden_layers=4,
            num_mem_blocks=1,
            adapter_rank=4,
        ),
        "Zamba2MambaMixer",
    ),
    "nemotron_h": (
        "NemotronHForCausalLM",
        "NemotronHConfig",
        dict(
            hybrid_override_pattern="M*M-E",  # Mamba2, attention, Mamba2, MLP, MoE
            num_hidden_layers=5,
            n_routed_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=16,
            moe_shared_expert_intermediate_size=16,
            n_group=1,
            topk_group=1,
            mamba_num_heads=4,
            mamba_head_dim=16,
            ssm_state_size=8,
            n_groups=2,
            chunk_size=4,
            head_dim=16,
        ),
        "NemotronHMamba2Mixer",
    ),
    "granite": (
        "GraniteMoeHybridForCausalLM",
        "GraniteMoeHybridConfig",
        dict(
            layer_types=["mamba", "attention"],
            num_local_experts=2,
            num_experts_per_tok=1,
            **_MAMBA2,
        ),
        "GraniteMoeHybridMambaLayer",
    ),
    "falcon_h1": (
        "FalconH1ForCausalLM",
        "FalconH1Config",
        dict(
            mamba_d_ssm=64,
            head_dim=16,
            mamba_rms_norm=True,
            mamba_norm_before_gate=False,
            ssm_multipliers=[0.5, 1.5, 0.75, 1.25, 2.0],
            ssm_in_multiplier=0.8,
            ssm_out_multiplier=1.1,
            attention_in_multiplier=0.9,
            attention_out_multiplier=1.2,
            mlp_multipliers=[0.7, 1.3],
            embedding_multiplier=1.5,
            lm_head_multiplier=0.6,
            **_MAMBA2,
        ),
        "FalconH1Mixer",
    ),
}


def zero_relevance_biases(model: nn.Module) -> nn.Module:
    """Zero every bias that carries relevance (``dt_bias`` and ``dt_proj.bias`` are scan parameters)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") and not name.endswith("dt_bias") and "dt_proj" not in name:
                p.zero_()
    return model


def randomize(model: nn.Module, seed: int) -> nn.Module:
    """Non-trivial norm weights, D, dt biases and A (so every rule and parameter matters), and
    matrices of scale ``1 / sqrt(fan_in)`` (transformers' 0.02 makes every score tiny, where the
    epsilon rule's stabiliser is no longer negligible)."""
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if leaf == "weight" and p.dim() == 2 and "norm" not in name:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)
            elif "norm" in name and leaf == "weight":
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
            elif leaf in ("D", "dt_bias"):
                p.copy_(torch.randn(p.shape, generator=g))
            elif leaf == "A_log":
                p.copy_(torch.rand(p.shape, generator=g) * 2 - 1)
    return model


def build(family: str, seed: int = 0, **overrides) -> nn.Module:
    model_cls, config_cls, kwargs, _ = FAMILIES[family]
    if not hasattr(transformers, model_cls):
        pytest.skip(f"{model_cls} is not in this transformers")
    config = getattr(transformers, config_cls)(**_common(**{**kwargs, **overrides}))
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config).eval()
    return zero_relevance_biases(randomize(model, seed))


def mixers_of(model: nn.Module, family: str):
    cls = FAMILIES[family][3]
    found = [m for m in model.modules() if type(m).__name__ == cls]
    assert found, f"no {cls} in {type(model).__name__}"
    return found


def ids_for(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(1, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def left_padded(batch: int, length: int, pads, seed: int = 0):
    ids = ids_for(batch, length, seed)
    mask = torch.ones(batch, length, dtype=torch.long)
    for row, n in enumerate(pads):
        mask[row, :n] = 0
        ids[row, :n] = 0
    return ids, mask


class MixerHost(nn.Module):
    """``embedding -> mixer -> linear head``: one SSM mixer of a hybrid, alone."""

    def __init__(self, mixer: nn.Module, hidden: int, classes: int = 5, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(VOCAB, hidden)
        self.mixer = mixer
        self.head = nn.Linear(hidden, classes, bias=False)
        nn.init.normal_(self.head.weight, std=hidden**-0.5)

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None):
        h = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
        return self.head(self.mixer(h, attention_mask=attention_mask))


# ---------------------------------------------------------------- independent references


def _silu_identity(x):
    return x * torch.sigmoid(x).detach()


def falcon_h1_reference_mixer(m, hidden, mask):
    """Falcon-H1's mixer with MambaLRP's rules, step by step: the muP multipliers scale the
    input projection, the SSD recurrence runs as a Python loop with dt, A, B, C detached, the
    gate ``y * silu(z)`` is halved in the gradient, the grouped norm (before or after the gate,
    or none) has its ``rsqrt`` detached."""
    b, l, _ = hidden.shape
    d, H, P, G, N = m.intermediate_size, m.num_heads, m.head_dim, m.n_groups, m.ssm_state_size
    masked = hidden if mask is None else hidden * mask[:, :, None]
    proj = m.in_proj(masked * m.ssm_in_multiplier) * m.mup_vector
    z, xBC, dt = proj.split([d, m.conv_dim, H], dim=-1)
    xBC = _silu_identity(m.conv1d(xBC.transpose(1, 2))[..., :l]).transpose(1, 2)
    xBC = xBC if mask is None else xBC * mask[:, :, None]
    x, B, C = xBC.split([d, G * N, G * N], dim=-1)
    dt = F.softplus(dt + m.dt_bias).clamp(*m.time_step_limit).detach()
    A = -torch.exp(m.A_log).detach()
    x = x.reshape(b, l, H, P)
    B = B.reshape(b, l, G, N).repeat_interleave(H // G, dim=2).detach()
    C = C.reshape(b, l, G, N).repeat_interleave(H // G, dim=2).detach()
    state = torch.zeros(b, H, P, N)
    ys = []
    for t in range(l):
        state = torch.exp(dt[:, t] * A)[:, :, None, None] * state + (dt[:, t, :, None] * x[:, t])[..., None] * B[:, t, :, None, :]
        ys.append((state * C[:, t, :, None, :]).sum(-1) + m.D[None, :, None] * x[:, t])
    y = torch.stack(ys, dim=1).reshape(b, l, d)

    def gate(v):
        out = v * _silu_identity(z)
        return out / 2.0 + (out / 2.0).detach()

    def norm(v):
        groups = v.reshape(b, l, G, d // G)
        groups = groups * torch.rsqrt(groups.pow(2).mean(-1, keepdim=True) + m.norm.variance_epsilon).detach()
        return m.norm.weight * groups.reshape(b, l, d)

    if not m.mamba_rms_norm:
        y = gate(y)
    elif m.norm.norm_before_gate:
        y = gate(norm(y))
    else:
        y = norm(gate(y))
    return m.out_proj(y)


def reference_mixer(family: str, mixer, hidden, mask):
    if family == "jamba":
        assert mask is None  # the Mamba1 reference has no padding; padding is checked by invariance
        return mamba1_reference_mixer(mixer, hidden)
    if family == "falcon_h1":
        return falcon_h1_reference_mixer(mixer, hidden, mask)
    return mamba2_reference_mixer(mixer, hidden, mask)


def reference_relevance(family, host, ids, mask, position, cls):
    emb = host.embed(ids).detach().requires_grad_(True)
    score = host.head(reference_mixer(family, host.mixer, emb, None if mask is None else mask.float()))[:, position, cls]
    (grad,) = torch.autograd.grad(score.sum(), emb)
    return (emb * grad).sum(-1), score.detach()


# ---------------------------------------------------------------- mixers


MIXER_FAMILIES = list(FAMILIES)


@pytest.mark.parametrize("family", MIXER_FAMILIES)
def test_mixer_forward_unchanged_by_takeover(family):
    model = build(family, seed=1)
    host = MixerHost(mixers_of(model, family)[0], model.config.hidden_size)
    ids, mask = left_padded(3, 9, [0, 2, 5], seed=1)
    with torch.no_grad():
        before = host(ids, attention_mask=mask)
        inst = install_rules(host, composite("mambalrp"))
        try:
            during = host(ids, attention_mask=mask)
        finally:
            inst.patcher.restore()
    assert torch.allclose(during, before, atol=1e-5, rtol=1e-4), (during - before).abs().max()
    assert [c.kind for c in inst.components if c.name.startswith("mixer.")].count("ssm") == 1


@pytest.mark.parametrize("family", MIXER_FAMILIES)
def test_mixer_relevance_equals_step_by_step_reference(family):
    model = build(family, seed=2)
    host = MixerHost(mixers_of(model, family)[0], model.config.hidden_size, seed=2)
    ids = ids_for(2, 11, seed=2)
    mask = None if family == "jamba" else torch.ones_like(ids)
    relevance, delta = MambaLRP(host, backend="torch").attribute(
        ids, target=(6, 3), attention_mask=mask, return_convergence_delta=True
    )
    ref, score = reference_relevance(family, host, ids, mask, 6, 3)
    scale = float(ref.detach().abs().max())
    assert torch.allclose(relevance, ref, atol=1e-4 * scale, rtol=1e-4), (relevance - ref).abs().max() / scale
    assert (delta.abs() <= 1e-5 * score.abs().clamp_min(0.1)).all(), delta


@pytest.mark.parametrize("family", MIXER_FAMILIES)
def test_mixer_left_padding_changes_nothing_for_real_tokens(family):
    """Left-padded rows explain as the same sequence alone (padding zeroed where transformers
    zeroes it); padded positions get zero relevance."""
    model = build(family, seed=3)
    host = MixerHost(mixers_of(model, family)[0], model.config.hidden_size, seed=3)
    ids, mask = left_padded(2, 10, [0, 4], seed=3)
    lrp = MambaLRP(host, backend="torch")
    batched = lrp.attribute(ids, target=[2, (-1, 4)], attention_mask=mask)
    alone = lrp.attribute(ids[1:, 4:], target=(-1, 4))
    assert torch.allclose(batched[1, 4:], alone[0], atol=1e-5 * float(alone.abs().max()), rtol=1e-4)
    assert (batched[1, :4] == 0).all()


@pytest.mark.parametrize(
    "variant",
    [dict(mamba_rms_norm=True, mamba_norm_before_gate=True), dict(mamba_rms_norm=False)],
    ids=["norm_before_gate", "no_norm"],
)
def test_falcon_h1_norm_variants_equal_reference(variant):
    model = build("falcon_h1", seed=4, **variant)
    host = MixerHost(mixers_of(model, "falcon_h1")[0], model.config.hidden_size, seed=4)
    ids, mask = left_padded(2, 8, [0, 3], seed=4)
    relevance = MambaLRP(host, backend="torch").attribute(ids, target=(-1, 1), attention_mask=mask)
    # position -1 counts real tokens only, so it is the last position of both rows here
    ref, _ = reference_relevance("falcon_h1", host, ids, mask, -1, 1)
    assert torch.allclose(relevance, ref, atol=1e-4 * float(ref.detach().abs().max()), rtol=1e-4)


def test_jamba_mixer_gate_is_silu_whatever_the_conv_activation():
    """Jamba's scan gates with ``silu(z)`` while the conv uses ``hidden_act``: the takeover keeps both."""
    model = build("jamba", seed=5, hidden_act="gelu")
    host = MixerHost(mixers_of(model, "jamba")[0], model.config.hidden_size, seed=5)
    ids = ids_for(2, 7, seed=5)
    with torch.no_grad():
        before = host(ids)
        inst = install_rules(host, composite("mambalrp"))
        try:
            during = host(ids)
        finally:
            inst.patcher.restore()
    assert torch.allclose(during, before, atol=1e-5, rtol=1e-4)


def test_packed_batches_and_four_d_masks_are_refused_with_the_fix():
    model = build("bamba", seed=6)
    host = MixerHost(mixers_of(model, "bamba")[0], model.config.hidden_size)
    ids = ids_for(1, 5)
    inst = install_rules(host, composite("mambalrp"))
    try:
        with pytest.raises(ValueError, match="packed"):
            host.mixer(host.embed(ids), seq_idx=torch.zeros(1, 5, dtype=torch.int32))
        with pytest.raises(ValueError, match="2-D"):
            host.mixer(host.embed(ids), attention_mask=torch.ones(1, 1, 5, 5))

        class FilledCache:  # a decoding cache that holds this layer's state already
            def has_previous_state(self, layer_idx=None, state_idx=None):
                return layer_idx == host.mixer.layer_idx

        with pytest.raises(ValueError, match="filled cache"):
            host.mixer(host.embed(ids), cache=FilledCache())
    finally:
        inst.patcher.restore()


@pytest.mark.parametrize("family", ["jamba", "zamba2", "falcon_h1"])
def test_recompute_and_a_fresh_cache_give_the_same_relevance(family):
    model = build(family, seed=7)
    ids, mask = left_padded(2, 9, [0, 3], seed=7)
    plain = MambaLRP(model, composite="conservative").attribute(ids, target=2, attention_mask=mask)
    recomputed = MambaLRP(model, composite="conservative", recompute=True).attribute(ids, target=2, attention_mask=mask)
    projection = MambaLRP(model, composite="conservative", recompute="projection").attribute(ids, target=2, attention_mask=mask)
    cached = MambaLRP(model, composite="conservative").attribute(ids, target=2, attention_mask=mask, use_cache=True)
    assert torch.equal(plain, recomputed) and torch.equal(plain, projection)
    assert torch.allclose(plain, cached, atol=1e-7)


# ---------------------------------------------------------------- full models


def explained_scores(logits: torch.Tensor, mask: torch.Tensor, targets) -> torch.Tensor:
    """The score each target form names, computed here from the logits (positions count real
    tokens only; ``None`` is the predicted class at the last real token)."""
    scores = []
    for row, target in enumerate(targets):
        position, cls = target if isinstance(target, tuple) else (-1, target)
        t = int(mask[row].nonzero().flatten()[position])
        scores.append(logits[row, t, int(logits[row, t].argmax()) if cls is None else cls])
    return torch.stack(scores)


TARGET_FORMS = {
    "int": 3,
    "position_class": (1, 5),
    "none": None,
    "per_example": [7, (0, 2), None],
}


def _full_families():
    return [pytest.param(f, id=f) for f in FAMILIES]


@pytest.mark.parametrize("family", _full_families())
def test_full_model_conserves_with_left_padding_and_every_target_form(family):
    model = build(family, seed=11)
    before = snapshot(model)
    ids, mask = left_padded(3, 8, [0, 2, 5], seed=11)
    with torch.no_grad():
        logits = model(ids, attention_mask=mask).logits
    lrp = MambaLRP(model, composite="conservative", backend="torch")
    for form, target in TARGET_FORMS.items():
        relevance, delta = lrp.attribute(ids, target=target, attention_mask=mask, return_convergence_delta=True)
        targets = target if isinstance(target, list) else [target] * 3
        score = explained_scores(logits, mask, targets)
        assert torch.allclose(relevance.sum(1) + delta, score, atol=1e-5, rtol=1e-5), (form, relevance.sum(1) + delta, score)
        gap = (relevance.sum(1) - score).abs()
        assert (gap <= 1e-5 * score.abs().clamp_min(0.1)).all(), (form, gap, score)
        assert (relevance[mask == 0] == 0).all(), form
    assert_unchanged(model, before)


def test_full_model_mixers_are_taken_over_by_the_hybrid_adapters():
    """Every SSM mixer of each family is installed with the SSM rule (none left to plain gradient)."""
    for family in FAMILIES:
        model = build(family, seed=12)
        inst = install_rules(model, composite("conservative"))
        inst.patcher.restore()
        ssm = {c.name.rsplit(".", 1)[0] for c in inst.components if c.kind == "ssm"}
        names = {n for n, m in model.named_modules() if type(m).__name__ == FAMILIES[family][3]}
        assert ssm == names, family


def test_zamba2_shared_block_called_at_several_depths():
    """Zamba2's shared transformer block as one module instance at two depths: its hooks and
    taken-over forwards run twice per forward, and relevance is still conserved."""
    model = build("zamba2", seed=13)
    layers = model.model.layers
    layers[3].shared_transformer = layers[1].shared_transformer
    ids, mask = left_padded(2, 7, [0, 3], seed=13)
    with torch.no_grad():
        logits = model(ids, attention_mask=mask).logits
    before = snapshot(model)
    relevance, delta = MambaLRP(model, composite="conservative").attribute(
        ids, target=4, attention_mask=mask, return_convergence_delta=True
    )
    score = logits[:, -1, 4]
    assert ((relevance.sum(1) - score).abs() <= 1e-5 * score.abs().clamp_min(0.1)).all()
    assert_unchanged(model, before)


class NewMixer(nn.Module):
    """A mixer type no adapter knows."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.proj = nn.Linear(hidden, hidden, bias=False)

    def forward(self, hidden_states, *args, **kwargs):
        return self.proj(hidden_states).cumsum(1)


class CustomAttention(nn.Module):
    """An attention implementation no adapter knows."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.qkv = nn.Linear(hidden, 3 * hidden, bias=False)

    def forward(self, hidden_states, *args, **kwargs):
        q, k, v = self.qkv(hidden_states).chunk(3, dim=-1)
        return torch.softmax(q @ k.transpose(1, 2), -1) @ v, None


def test_uncovered_mixer_and_attention_are_refused_naming_module_and_class():
    model = build("bamba", seed=14)
    model.model.layers[0].mamba = NewMixer(model.config.hidden_size)
    model.model.layers[1].self_attn = CustomAttention(model.config.hidden_size)
    before = snapshot(model)
    with pytest.raises(UnsupportedModelError) as err:
        MambaLRP(model, composite="conservative")
    message = str(err.value)
    assert "'model.layers.0.mamba' (NewMixer)" in message, message
    assert "CustomAttention" in message and "model.layers.1.self_attn" in message, message
    assert_unchanged(model, before)


def test_error_mid_attribution_leaves_the_model_unchanged():
    model = build("nemotron_h", seed=15)
    before = snapshot(model)
    ids = ids_for(1, 6)
    with pytest.raises(ValueError, match="packed"):
        MambaLRP(model, composite="conservative").attribute(ids, target=1, seq_idx=torch.zeros(1, 6, dtype=torch.int32))
    assert_unchanged(model, before)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_sequence_pieces_give_the_same_relevance(family, monkeypatch):
    """``recompute="sequence"``: each hybrid's SSM mixers run in pieces of the sequence (state
    carried, pieces that do not divide the length), with the same relevance as ``recompute=False``
    for left-padded batches; the pieces did run."""
    from captum_mambalrp.adapters import recompute as rc
    from captum_mambalrp.adapters.recompute import SequenceChunks

    model = build(family, seed=21)
    ids, mask = left_padded(3, 23, [0, 4, 15], seed=2)
    ids = ids % model.config.vocab_size
    kept = MambaLRP(model, composite="conservative", recompute=False).attribute(ids, target=3, attention_mask=mask)
    calls = []
    real = rc.in_pieces
    monkeypatch.setattr(rc, "in_pieces", lambda *a, **k: calls.append(a[3]) or real(*a, **k))
    again = MambaLRP(model, composite="conservative", recompute=SequenceChunks(chunk=5, stride=2)).attribute(
        ids, target=3, attention_mask=mask
    )
    assert calls and set(calls) == {5}, calls
    assert ((again - kept).norm() / kept.norm()).item() < 1e-5
    assert (again[mask == 0] == 0).all()
