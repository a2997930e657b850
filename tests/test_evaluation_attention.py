"""Hidden and implicit attention for Mamba2 (SSD) and Mamba1, against explicit recurrences."""

from __future__ import annotations

import pytest
import torch
from conftest import LastTokenClassifier, make_config, randomize

from captum_mambalrp.evaluation import build_method
from captum_mambalrp.evaluation.hidden_attention import (
    implicit_attention,
    iter_channel_attention,
    scan_records,
    ssd_hidden_attention,
)


def _no_conv_bias(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("conv1d.bias"):
                p.zero_()
    return model


@pytest.fixture(scope="module")
def mamba2():
    from transformers import Mamba2Config, Mamba2Model

    cfg = Mamba2Config(
        vocab_size=64,
        hidden_size=16,
        state_size=4,
        num_hidden_layers=2,
        expand=2,
        num_heads=4,
        head_dim=8,
        n_groups=2,
        chunk_size=4,
        use_conv_bias=True,
    )
    torch.manual_seed(0)
    model = LastTokenClassifier(Mamba2Model(cfg), n_classes=3).eval()
    randomize(model)
    return _no_conv_bias(model)


@pytest.fixture(scope="module")
def mamba1():
    from transformers import MambaModel

    torch.manual_seed(0)
    model = LastTokenClassifier(MambaModel(make_config()), n_classes=3).eval()
    randomize(model)
    return _no_conv_bias(model)


def explicit_ssd(x, dt, A, B, C, D):
    """``h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t``, ``y_t = <C_t, h_t> + D x_t``, one step at a
    time; ``x [b, l, h, p]``, ``B, C [b, l, g, n]``; returns ``y`` and ``M [b, h, t, s]``."""
    b, length, heads, p = x.shape
    hg = heads // B.shape[2]
    Bh, Ch = B.repeat_interleave(hg, dim=2), C.repeat_interleave(hg, dim=2)  # [b, l, h, n]
    state = torch.zeros(b, heads, p, B.shape[-1], dtype=torch.float64)
    ys = []
    M = torch.zeros(b, heads, length, length, dtype=torch.float64)
    for t in range(length):
        decay = torch.exp(dt[:, t] * A)  # [b, h]
        state = decay[..., None, None] * state + (dt[:, t, :, None] * x[:, t])[..., None] * Bh[:, t, :, None, :]
        ys.append((state * Ch[:, t, :, None, :]).sum(-1) + D[:, None] * x[:, t])
        for s in range(t + 1):
            span = dt[:, s + 1 : t + 1].sum(1) if t > s else torch.zeros_like(dt[:, 0])
            M[:, :, t, s] = (Ch[:, t] * Bh[:, s]).sum(-1) * torch.exp(span * A) * dt[:, s]
    return torch.stack(ys, 1), M


def test_ssd_hidden_attention_equals_the_explicit_recurrence(mamba2):
    ids = torch.randint(1, 64, (2, 9), generator=torch.Generator().manual_seed(3))
    records, _ = scan_records(mamba2, ids, None, with_gradient=True)
    assert len(records) == 2 and all(r.kind == "ssd" for r in records)
    for layer, r in zip(mamba2.backbone.layers, records):
        heads = r.A.shape[0]
        x = r.x.transpose(1, 2).reshape(2, 9, heads, -1).double()
        y_ref, M_ref = explicit_ssd(x, r.delta.double(), r.A.double(), r.B.double(), r.C.double(), layer.mixer.D.double())
        assert torch.allclose(r.y.transpose(1, 2).reshape(y_ref.shape).double(), y_ref, atol=1e-4)
        M = ssd_hidden_attention(r.delta, r.A, r.B, r.C)
        assert M.shape == (2, heads, 9, 9) and (M.triu(1) == 0).all()
        assert torch.allclose(M.double(), M_ref, atol=1e-5)
        # per channel: y = alpha x + D x
        alpha = torch.cat([a for _, a in iter_channel_attention(r, chunk=5)], dim=1)
        y = torch.einsum("bdts,bds->bdt", alpha, r.x) + r.D[None, :, None] * r.x
        assert torch.allclose(y, r.y, atol=1e-5)
        assert r.grad_y is not None and r.grad_out is not None


@pytest.mark.parametrize("arch", ["mamba1", "mamba2"])
def test_implicit_attention_maps_the_conv_input_to_the_gated_output(arch, mamba1, mamba2):
    """``silu(z) * y = alpha~ u`` exactly (conv bias zero), with ``u`` the conv's input."""
    model = mamba1 if arch == "mamba1" else mamba2
    ids = torch.randint(1, 64, (2, 8), generator=torch.Generator().manual_seed(4))
    records, _ = scan_records(model, ids, None)
    for r in records:
        for sl, alpha in iter_channel_attention(r, chunk=8):
            folded = implicit_attention(r, sl, alpha)
            assert (folded.triu(1) == 0).all()
            gated = torch.einsum("bdts,bds->bdt", folded, r.conv_in[:, sl])
            assert torch.allclose(gated, (r.y * r.gate)[:, sl], atol=1e-5)


@pytest.mark.parametrize("name", ["attn_rollout", "mamba_attr", "gw_rollout", "implicit_attn", "implicit_attr"])
def test_attention_methods_on_mamba2_with_padding(name, mamba2):
    ids = torch.randint(1, 64, (2, 7), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    rel = build_method(name, mamba2).attribute(ids, torch.tensor([0, 2]), mask)
    assert rel.shape == ids.shape and torch.isfinite(rel).all() and (rel[1, 5:] == 0).all()
    if name == "mamba_attr":  # its gradient weights are min-max normalised: the weakest token gets 0
        assert (rel[:, :5] >= 0).all() and (rel[0, 6] > 0) and (rel[1, 4] > 0)
    else:
        assert (rel[:, :5] > 0).all()  # a row of a product of row-stochastic maps with the identity


@pytest.mark.parametrize("arch", ["mamba1", "mamba2"])
def test_mamba_attr_follows_the_authors_recipe(arch, mamba1, mamba2):
    """Mamba-Attr as Ali et al.'s ``generate_mamba_attr`` computes it, step by step: per layer the
    positive hidden attention min-max normalised and averaged over channels, times the min-max
    normalised ``max_h (dS/dstream)^+`` of each source token, the stream gradient taken here at
    the embeddings (layer 0's input) and at each layer's output (the next one's input); ``I + M``,
    row-normalised, multiplied from ``start_layer`` on; the explained position's row."""
    from captum_mambalrp.evaluation.hidden_attention import HiddenAttentionAttribution, hidden_attention

    model = mamba1 if arch == "mamba1" else mamba2
    ids = torch.randint(1, 64, (1, 9), generator=torch.Generator().manual_seed(2))
    target = torch.tensor([1])
    records, _ = scan_records(model, ids, None, target)
    embeds = model.backbone.get_input_embeddings()(ids).detach().requires_grad_(True)
    streams = [embeds]
    hooks = [
        layer.register_forward_hook(lambda m, a, o: streams.append(o[0] if isinstance(o, tuple) else o))
        for layer in model.backbone.layers
    ]
    try:
        logit = model(inputs_embeds=embeds)[0, -1, 1]
    finally:
        for h in hooks:
            h.remove()
    for h in streams[1:]:
        h.retain_grad()
    logit.backward()
    for start in (0, 1):
        joint = torch.eye(9)
        for k in range(start, len(records)):
            r = records[k]
            if arch == "mamba1":
                alpha = hidden_attention(r.delta, r.A, r.B, r.C)[0]  # [d, t, s]
            else:
                alpha = torch.cat([a for _, a in iter_channel_attention(r, 64)], 1)[0]
            a = alpha.clamp(min=0)
            a = (a - a.min()) / (a.max() - a.min())
            g = streams[k].grad[0].clamp(min=0).max(dim=1).values
            g = (g - g.min()) / (g.max() - g.min())
            m = a.mean(0) * g[None, :] + torch.eye(9)
            joint = (m / m.sum(-1, keepdim=True)) @ joint
        got = HiddenAttentionAttribution(model, mamba_attr=True, start_layer=start).attribute(ids, target)
        assert torch.allclose(got[0], joint[-1], atol=1e-5), start
    model.zero_grad()


TEXTS = ["i feel happy and loved today", "so sad and alone tonight", "what a scary night", "i am angry at the world"]


@pytest.mark.parametrize("arch", ["mamba2", "bamba"])
def test_study_with_distance_profile_and_layers_on_mamba2_and_a_hybrid(arch, mamba2, tmp_path):
    """The study (distance profile, layer relevance, figures) on a Mamba2 classifier and on a
    hybrid LM whose ``model.layers`` mix Mamba2 and attention layers (Bamba)."""
    from captum_mambalrp.evaluation import Perturbation, Study, StudyConfig
    from captum_mambalrp.models.tokenizer import build_word_tokenizer

    tok = build_word_tokenizer(TEXTS, min_freq=1)
    if arch == "bamba":
        from transformers import BambaConfig, BambaForCausalLM

        cfg = BambaConfig(
            vocab_size=max(64, len(tok)),
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            intermediate_size=32,
            pad_token_id=0,
            attn_layer_indices=[1],
            mamba_n_heads=4,
            mamba_d_head=16,
            mamba_n_groups=2,
            mamba_d_state=8,
            mamba_chunk_size=4,
        )
        torch.manual_seed(0)
        model, blocks = BambaForCausalLM(cfg).eval(), ["model.layers.0", "model.layers.1"]
        methods = ["mambalrp", "mambalrp_cp", "saliency"]
    else:
        # mambalrp_cp on a model without attention: CP-LRP is MambaLRP, no second per-layer pass
        model, methods, blocks = mamba2, ["mambalrp", "mambalrp_cp", "implicit_attn"], ["backbone.layers.0", "backbone.layers.1"]
    config = StudyConfig(methods=methods, n_examples=4, batch_size=4, perturbation=Perturbation(0.5))
    summary = Study(model, tok, TEXTS, None, config, str(tmp_path / arch)).run(progress=False)
    assert summary["layers"]["names"] == ["embedding", *blocks]
    assert "distance" in summary["figures"] and (tmp_path / arch / "distance_profile.png").stat().st_size > 1000
    profile = summary["distance_profiles"]["MambaLRP"]
    assert profile["count"][0] == 4 and len(profile["mean"]) == max(len(tok(t)["input_ids"]) for t in TEXTS)
    layers = summary["layers"]
    if arch == "bamba":  # with mambalrp_cp among the methods, CP-LRP's profile beside MambaLRP's
        assert len(layers["mean_sum_per_layer_cp"]) == 3
        assert max(layers["median_rel_gap_per_layer_cp"]) < 1e-4  # no biases at init: CP-LRP conserves everywhere
        assert "CP-LRP" in (tmp_path / arch / "summary.md").read_text()
    else:
        assert "mean_sum_per_layer_cp" not in layers


def test_hidden_attention_refuses_a_hybrid_naming_its_attention_layer():
    """A hybrid also mixes tokens in attention layers: the rollout of its Mamba layers would leave
    them out, so hidden/implicit attention refuse it in one line naming the layer; the model comes
    back unchanged."""
    from test_hybrids import build

    model = build("bamba", seed=3)
    ids = torch.randint(1, 60, (1, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(ids).logits
    with pytest.raises(ValueError, match=r"attention layers \(model\.layers\.1\.self_attn: BambaAttention\)"):
        scan_records(model, ids, None, with_gradient=True)
    assert all("forward" not in m.__dict__ for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)
