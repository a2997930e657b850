"""mamba-ssm's ``MambaLMHeadModel`` (Mamba1 and Mamba2 mixers, ``Block`` with fused add+norm).

These tests run the real mamba-ssm module definitions on CPU (see ``mamba_ssm_env``): the
adapters take over every forward that would call a kernel. The kernels themselves are
checked on a GPU by ``benchmarks/gpu_mamba_ssm_check.py``. Independent checks here:
transformers' own Mamba / Mamba2 forward on the same weights, the step-by-step MambaLRP
references, and mamba-ssm's pure-torch reference functions for the Mamba2 mixer variants.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import randomize, relative_delta
from mamba_ssm_env import load_mamba_ssm
from test_api import assert_unchanged, snapshot
from torch import nn

from captum_mambalrp import MambaLRP, UnsupportedModelError
from captum_mambalrp.adapters import install_rules
from captum_mambalrp.rules import composite


def mssm():
    """mamba-ssm's classes and reference functions (loaded once), or skip with the reason."""
    found, how = load_mamba_ssm()
    if found is None:
        pytest.skip(f"mamba-ssm's module definitions are not available: {how}")
    return found


def make_ssm_lm(
    layer: str = "Mamba1",
    seed: int = 0,
    d_model: int = 32,
    n_layer: int = 2,
    bias_free: bool = True,
    fused_add_norm: bool = True,
    residual_in_fp32: bool = True,
    rms_norm: bool = True,
    **ssm,
):
    ms = mssm()
    ssm_cfg = {"layer": layer, "d_state": 4, **ssm}
    if layer == "Mamba2":
        ssm_cfg.setdefault("headdim", 8)
        ssm_cfg.setdefault("chunk_size", 8)
    config = ms.MambaConfig(
        d_model=d_model,
        n_layer=n_layer,
        vocab_size=64,
        ssm_cfg=ssm_cfg,
        rms_norm=rms_norm,
        residual_in_fp32=residual_in_fp32,
        fused_add_norm=fused_add_norm,
        tie_embeddings=False,
    )
    torch.manual_seed(seed)
    model = ms.MambaLMHeadModel(config).eval()
    randomize(model, seed)
    if bias_free:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("bias") and "dt_proj" not in name and not name.endswith("dt_bias"):
                    p.zero_()
    return model


def ids_for(batch, length, seed=0):
    return torch.randint(1, 64, (batch, length), generator=torch.Generator().manual_seed(seed))


def takeover_logits(model, ids, name="gradient"):
    """The model's output with MambaLRP's forward in place (no kernel is called)."""
    with torch.no_grad():
        inst = install_rules(model, composite(name))
        try:
            return model(ids).logits
        finally:
            inst.patcher.restore()


# layer, block settings, mixer settings, length, batch
CONFIGS = [
    ("Mamba1", dict(), dict(), 37, 2),
    ("Mamba1", dict(fused_add_norm=False, residual_in_fp32=False, rms_norm=False), dict(), 1, 1),
    ("Mamba2", dict(), dict(ngroups=2, chunk_size=8), 45, 2),
    (
        "Mamba2",
        dict(fused_add_norm=False),
        dict(headdim=4, ngroups=4, chunk_size=16, D_has_hdim=True, norm_before_gate=True, dt_limit=(0.0, 0.05)),
        70,
        1,
    ),
    ("Mamba2", dict(residual_in_fp32=False), dict(rmsnorm=False), 20, 2),
    ("Mamba2", dict(n_layer=3), dict(d_ssm=32, ngroups=2), 33, 2),
]


@pytest.mark.parametrize(
    "layer,block,mixer,length,batch",
    CONFIGS,
    ids=[f"{c[0]}-{'-'.join(f'{k}={v}' for k, v in {**c[1], **c[2]}.items())}" for c in CONFIGS],
)
def test_conservation_bias_free(layer, block, mixer, length, batch):
    model = make_ssm_lm(layer, seed=length, **block, **mixer)
    ids = ids_for(batch, length, seed=length)
    relevance, delta = MambaLRP(model).attribute(ids, target=None, return_convergence_delta=True)  # predicted class
    logits = takeover_logits(model, ids)[:, -1].max(-1).values
    assert relevance.shape == (batch, length)
    assert torch.allclose(relevance.sum(1) + delta, logits, atol=1e-5, rtol=1e-5)
    assert (relative_delta(delta, logits) <= 1e-5).all(), (delta, logits)


def hf_copy(model, layer):
    """The same weights in transformers' ``MambaForCausalLM`` / ``Mamba2ForCausalLM`` (its own forward)."""
    import transformers

    mixer = model.backbone.layers[0].mixer
    common = dict(
        vocab_size=64,
        hidden_size=model.config.d_model,
        num_hidden_layers=model.config.n_layer,
        state_size=mixer.d_state,
        conv_kernel=mixer.d_conv,
        expand=mixer.expand,
        use_bias=False,
        use_conv_bias=True,
        layer_norm_epsilon=1e-5,
        residual_in_fp32=True,
        tie_word_embeddings=False,
    )
    if layer == "Mamba1":
        hf = transformers.MambaForCausalLM(transformers.MambaConfig(time_step_rank=mixer.dt_rank, **common))
    else:
        hf = transformers.Mamba2ForCausalLM(
            transformers.Mamba2Config(
                num_heads=mixer.nheads,
                head_dim=mixer.headdim,
                n_groups=mixer.ngroups,
                chunk_size=mixer.chunk_size,
                time_step_limit=mixer.dt_limit,
                **common,
            )
        )
    state = {k.replace("backbone.embedding.", "backbone.embeddings."): v for k, v in model.state_dict().items()}
    hf.load_state_dict(state, strict=True)
    return hf.eval()


@pytest.mark.parametrize("layer,mixer", [("Mamba1", dict()), ("Mamba2", dict(ngroups=2, chunk_size=4))])
def test_forward_and_relevance_agree_with_transformers_and_the_references(layer, mixer):
    """Same weights in transformers: our takeover of mamba-ssm's Block / MixerModel / mixers computes
    transformers' forward, and the relevance is that of the step-by-step reference MambaLRPs."""
    model = make_ssm_lm(layer, seed=11, **mixer)
    hf = hf_copy(model, layer)
    ids = ids_for(2, 19, seed=11)
    with torch.no_grad():
        expected = hf(ids).logits
    assert torch.allclose(takeover_logits(model, ids), expected, atol=1e-5, rtol=1e-5)
    assert torch.allclose(takeover_logits(model, ids, "mambalrp"), expected, atol=1e-5, rtol=1e-5)
    if layer == "Mamba1":
        from reference_mambalrp import reference_relevance
    else:
        from mamba2_reference import reference_relevance
    ref, logit = reference_relevance(hf, ids, position=18, cls=9)
    relevance, delta = MambaLRP(model).attribute(ids, target=9, return_convergence_delta=True)
    assert torch.allclose(relevance, ref, rtol=1e-4, atol=1e-4 * ref.abs().max()), (relevance - ref).abs().max()
    assert torch.allclose(relevance.sum(1) + delta, logit, atol=1e-5)


MIXER_VARIANTS = [
    dict(ngroups=2),
    dict(ngroups=4, headdim=4, D_has_hdim=True),
    dict(norm_before_gate=True, dt_limit=(0.0, 0.05)),
    dict(rmsnorm=False),
    dict(d_ssm=32, ngroups=2),
]


@pytest.mark.parametrize("variant", MIXER_VARIANTS, ids=lambda v: "-".join(f"{k}={w}" for k, w in v.items()))
def test_mamba2_mixer_matches_mamba_ssms_own_reference_functions(variant):
    """mamba-ssm's pure-torch references (chunked SSD ``ssd_chunk_scan_combined_ref``, gated grouped
    ``rms_norm_ref``) composed as in ``Mamba2.forward``, against our takeover of the mixer."""
    rms_norm_ref, ssd_chunk_scan_combined_ref = mssm().rms_norm_ref, mssm().ssd_chunk_scan_combined_ref
    mixer = make_ssm_lm("Mamba2", seed=13, d_model=32, n_layer=1, chunk_size=8, **variant).backbone.layers[0].mixer
    u = torch.randn(2, 24, 32, generator=torch.Generator().manual_seed(13))
    b, l, _ = u.shape
    d_ssm, g, n, h, p = mixer.d_ssm, mixer.ngroups, mixer.d_state, mixer.nheads, mixer.headdim
    with torch.no_grad():
        d_mlp = (mixer.in_proj.out_features - 2 * d_ssm - 2 * g * n - h) // 2
        z0, x0, z, xBC, dt = mixer.in_proj(u).split([d_mlp, d_mlp, d_ssm, d_ssm + 2 * g * n, h], dim=-1)
        xBC = F.silu(mixer.conv1d(xBC.transpose(1, 2))[..., :l]).transpose(1, 2)
        x, B, C = xBC.split([d_ssm, g * n, g * n], dim=-1)
        dt = F.softplus(dt + mixer.dt_bias).clamp(*mixer.dt_limit)
        D = mixer.D.reshape(h, p) if mixer.D_has_hdim else mixer.D
        y = ssd_chunk_scan_combined_ref(
            x.reshape(b, l, h, p),
            dt,
            -torch.exp(mixer.A_log),
            B.reshape(b, l, g, n),
            C.reshape(b, l, g, n),
            mixer.chunk_size,
            D=D,
            z=None if mixer.rmsnorm else z.reshape(b, l, h, p),
        ).reshape(b, l, d_ssm)
        if mixer.rmsnorm:
            y = rms_norm_ref(
                y,
                mixer.norm.weight,
                None,
                z=z,
                eps=mixer.norm.eps,
                group_size=mixer.norm.group_size,
                norm_before_gate=mixer.norm_before_gate,
            )
        if d_mlp:
            y = torch.cat([F.silu(z0) * x0, y], dim=-1)
        expected = mixer.out_proj(y)
        holder = nn.ModuleDict({"mixer": mixer})
        inst = install_rules(holder, composite("mambalrp"))
        try:
            got = mixer(u)
        finally:
            inst.patcher.restore()
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-4), (got - expected).abs().max()


def test_batch_equals_single_examples():
    model = make_ssm_lm("Mamba2", seed=14, ngroups=2)
    ids = ids_for(3, 21, seed=14)
    lrp = MambaLRP(model)
    batched = lrp.attribute(ids, target=(-2, 4))
    for i in range(3):
        assert torch.allclose(batched[i], lrp.attribute(ids[i : i + 1], target=(-2, 4))[0], atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("layer", ["Mamba1", "Mamba2"])
def test_model_comes_back_unchanged(layer):
    model = make_ssm_lm(layer, seed=15, bias_free=False)
    model.lm_head.weight.grad = torch.randn_like(model.lm_head.weight)
    before = snapshot(model)
    with torch.no_grad():
        logits = takeover_logits(model, ids_for(2, 9))
    MambaLRP(model).attribute(ids_for(2, 9), target=1)
    assert_unchanged(model, before)
    with torch.no_grad():
        assert torch.equal(takeover_logits(model, ids_for(2, 9)), logits)


@pytest.mark.parametrize("layer", ["Mamba1", "Mamba2"])
def test_gradient_x_input_does_not_conserve(layer):
    """Plain Gradient x Input (transformers' own forward on the same weights, autograd) loses
    conservation; the "gradient" composite on mamba-ssm's model reproduces exactly that."""
    model = make_ssm_lm(layer, seed=16, n_layer=3)
    hf = hf_copy(model, layer)
    ids = ids_for(3, 30, seed=16)
    emb = hf.backbone.embeddings(ids).detach().requires_grad_(True)
    logit = hf(inputs_embeds=emb).logits[:, -1, 5]
    (grad,) = torch.autograd.grad(logit.sum(), emb)
    gxi = (emb * grad).sum((1, 2)).detach()
    assert (relative_delta(logit.detach() - gxi, logit.detach()) > 1e-2).all()
    relevance = MambaLRP(model, composite="gradient").attribute(ids, target=5)
    assert torch.allclose(relevance.sum(1), gxi, atol=1e-5, rtol=1e-4)


def test_attention_blocks_mlps_and_other_mixers_are_refused():
    model = make_ssm_lm("Mamba2", seed=17)
    MambaConfig, MambaLMHeadModel = mssm().MambaConfig, mssm().MambaLMHeadModel
    hybrid = MambaLMHeadModel(
        MambaConfig(
            d_model=32,
            n_layer=2,
            vocab_size=64,
            ssm_cfg=dict(layer="Mamba2", headdim=8),
            attn_layer_idx=[1],
            attn_cfg=dict(num_heads=2),
        )
    ).eval()
    before = snapshot(hybrid)
    with pytest.raises(UnsupportedModelError, match=r"'backbone.layers.1.mixer' \(MHA\).*attention"):
        MambaLRP(hybrid)
    assert_unchanged(hybrid, before)
    with_mlp = MambaLMHeadModel(
        MambaConfig(d_model=32, n_layer=1, vocab_size=64, d_intermediate=64, ssm_cfg=dict(layer="Mamba1"))
    ).eval()
    with pytest.raises(UnsupportedModelError, match=r"\(GatedMLP\).*d_intermediate"):
        MambaLRP(with_mlp)
    model.backbone.layers[1].mixer = mssm().Mamba2Simple(32, d_state=4, headdim=8)
    with pytest.raises(UnsupportedModelError, match=r"\(Mamba2Simple\).*not covered"):
        MambaLRP(model)


def test_vision_mamba_fork_of_the_mamba_class_is_not_taken_for_mamba1():
    """Vim's fork keeps the class name and module of ``Mamba`` but adds a backward branch."""
    model = make_ssm_lm("Mamba1", seed=18)
    model.backbone.layers[0].mixer.bimamba_type = "v2"
    with pytest.raises(UnsupportedModelError, match=r"'backbone.layers.0.mixer' \(Mamba\)"):
        MambaLRP(model)


def test_decoding_cache_and_packed_batches_are_refused():
    model = make_ssm_lm("Mamba2", seed=19)
    ids = ids_for(1, 8)
    with pytest.raises(ValueError, match="inference_params"):
        MambaLRP(model).attribute(ids, target=1, inference_params=object())
    with pytest.raises(ValueError, match="packed"):
        MambaLRP(model).attribute(ids, target=1, seq_idx=torch.zeros(1, 8, dtype=torch.int32))
