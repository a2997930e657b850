"""mamba-ssm's ``MambaLMHeadModel`` (Mamba1 and Mamba2 mixers, ``Block`` with fused add+norm, and
hybrids with ``MHA`` attention layers and ``GatedMLP``s).

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


def test_other_mixers_and_rotary_attention_are_refused():
    model = make_ssm_lm("Mamba2", seed=17)
    before = snapshot(model)
    model.backbone.layers[1].mixer = mssm().Mamba2Simple(32, d_state=4, headdim=8)
    with pytest.raises(UnsupportedModelError, match=r"\(Mamba2Simple\).*not covered"):
        MambaLRP(model)
    hybrid = make_ssm_hybrid(seed=17)
    before = snapshot(hybrid)
    hybrid.backbone.layers[1].mixer.rotary_emb_dim = 8  # flash-attn's RotaryEmbedding: no rule
    with pytest.raises(UnsupportedModelError, match=r"'backbone.layers.1.mixer' \(MHA\): rotary"):
        MambaLRP(hybrid, composite="conservative")
    hybrid.backbone.layers[1].mixer.rotary_emb_dim = 0
    assert_unchanged(hybrid, before)


def make_ssm_hybrid(seed: int = 0, layer: str = "Mamba2", d_intermediate: int = 48, attn_layer_idx=(1,), **attn):
    """mamba-ssm's hybrid ``MambaLMHeadModel``: SSM layers, ``MHA`` at ``attn_layer_idx`` (GQA,
    optional conv and MLP half), ``GatedMLP`` after every mixer; all biases zero."""
    ms = mssm()
    ssm_cfg = {"layer": layer, "d_state": 4}
    if layer == "Mamba2":
        ssm_cfg.update(headdim=8, chunk_size=8)
    attn_cfg = dict(num_heads=4, num_heads_kv=2, causal=True, qkv_proj_bias=False, out_proj_bias=False)
    attn_cfg.update(attn)
    config = ms.MambaConfig(
        d_model=32,
        n_layer=3,
        vocab_size=64,
        d_intermediate=d_intermediate,
        ssm_cfg=ssm_cfg,
        attn_layer_idx=list(attn_layer_idx),
        attn_cfg=attn_cfg,
        rms_norm=True,
        residual_in_fp32=True,
        fused_add_norm=True,
        tie_embeddings=False,
    )
    torch.manual_seed(seed)
    model = ms.MambaLMHeadModel(config).eval()
    randomize(model, seed)
    g = torch.Generator().manual_seed(seed + 2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") and "dt_proj" not in name and not name.endswith("dt_bias"):
                p.zero_()
            elif ".mixer." in name and name.endswith("proj.weight") and "dt_proj" not in name:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)  # attention scores of order 1
    return model


HYBRID_CONFIGS = {
    "mamba2_mha_gqa_mlp": dict(),
    "mamba1_mha_conv_mlp_half": dict(layer="Mamba1", d_conv=3, mlp_dim=64, attn_layer_idx=(0, 2)),
    "mamba2_mqa_no_mlp": dict(d_intermediate=0, num_heads_kv=1, softmax_scale=0.3),
}


@pytest.mark.parametrize("name", HYBRID_CONFIGS)
def test_hybrid_lm_conserves_with_every_target_form(name):
    model = make_ssm_hybrid(seed=21, **HYBRID_CONFIGS[name])
    before = snapshot(model)
    ids = ids_for(3, 12, seed=21)
    logits = takeover_logits(model, ids, "conservative")
    lrp = MambaLRP(model, composite="conservative")
    forms = {"int": 3, "position_class": (4, 7), "none": None, "per_example": [5, (0, 2), None]}
    for form, target in forms.items():
        relevance, delta = lrp.attribute(ids, target=target, return_convergence_delta=True)
        targets = target if isinstance(target, list) else [target] * 3
        score = torch.stack([_explained(logits[i], t) for i, t in enumerate(targets)])
        assert torch.allclose(relevance.sum(1) + delta, score, atol=1e-5, rtol=1e-5), form
        assert ((relevance.sum(1) - score).abs() <= 1e-5 * score.abs().clamp_min(0.1)).all(), (form, relevance.sum(1), score)
    inst = install_rules(model, composite("conservative"))
    inst.patcher.restore()
    attention = {c.name for c in inst.components if c.kind == "attention"}
    layers = HYBRID_CONFIGS[name].get("attn_layer_idx", (1,))
    assert attention == {f"backbone.layers.{i}.mixer.attention" for i in layers}, attention
    assert_unchanged(model, before)


def _explained(logits, target):
    """``logits [L, C]``'s score named by a target (no padding: positions are indices)."""
    if isinstance(target, tuple):
        return logits[target[0], target[1]]
    return logits[-1, logits[-1].argmax() if target is None else target]


@pytest.mark.parametrize("attn", [dict(), dict(d_conv=3, mlp_dim=64), dict(num_heads_kv=1, causal=False)])
def test_mha_and_gated_mlp_takeover_equal_their_own_forward(attn):
    """MHA (its CPU path: ``F.scaled_dot_product_attention``) and GatedMLP run their own forward
    here: the taken-over forwards compute the same values."""
    model = make_ssm_hybrid(seed=22, **attn)
    mha, mlp = model.backbone.layers[1].mixer, model.backbone.layers[1].mlp
    x = torch.randn(2, 9, 32, generator=torch.Generator().manual_seed(22))
    with torch.no_grad():
        expected = mha(x), mlp(x)
        inst = install_rules(model, composite("mambalrp"))
        try:
            got = mha(x), mlp(x)
        finally:
            inst.patcher.restore()
    for a, b in zip(got, expected):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4), (a - b).abs().max()


def test_mha_relevance_equals_cp_lrp_computed_directly():
    """One MHA between an embedding and a head: ``composite="conservative"`` equals CP-LRP written
    out (softmax weights from detached q, k; gradient x input through v and the projections)."""
    mha = make_ssm_hybrid(seed=23, d_conv=0).backbone.layers[1].mixer

    class Host(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(23)
            self.embed = nn.Embedding(64, 32)
            self.attn = mha
            self.head = nn.Linear(32, 5, bias=False)

        def forward(self, input_ids=None, inputs_embeds=None):
            h = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
            return self.head(self.attn(h))

    host = Host().eval()
    ids = ids_for(2, 8, seed=23)
    relevance = MambaLRP(host, composite="conservative").attribute(ids, target=(5, 2))
    emb = host.embed(ids).detach().requires_grad_(True)
    q, kv = mha.in_proj(emb).split([4 * 8, 2 * 2 * 8], dim=-1)
    q = q.reshape(2, 8, 4, 8).transpose(1, 2)
    k, v = kv.reshape(2, 8, 2, 2, 8).permute(2, 0, 3, 1, 4)
    k, v = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
    scores = (q @ k.transpose(-1, -2)).detach() * 8**-0.5
    scores = scores.masked_fill(~torch.ones(8, 8, dtype=torch.bool).tril(), float("-inf"))
    out = (torch.softmax(scores, -1) @ v).transpose(1, 2).reshape(2, 8, 32)
    score = host.head(mha.out_proj(out))[:, 5, 2]
    (grad,) = torch.autograd.grad(score.sum(), emb)
    expected = (emb * grad).sum(-1)
    assert torch.allclose(relevance, expected, atol=1e-5, rtol=1e-4), (relevance - expected).abs().max()
    assert torch.allclose(relevance.sum(1), score.detach(), atol=1e-5, rtol=1e-5)


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


@pytest.mark.parametrize("layer", ["Mamba1", "Mamba2", "hybrid"])
def test_sequence_pieces_give_the_same_relevance(layer, monkeypatch):
    """``recompute="sequence"``: mamba-ssm's ``Mamba`` and ``Mamba2`` run in pieces of the sequence
    (state carried; pieces that do not divide the length), in a plain and a hybrid LM, with the
    same relevance as keeping everything; the pieces did run."""
    from captum_mambalrp.adapters import recompute as rc
    from captum_mambalrp.adapters.recompute import SequenceChunks

    model = make_ssm_hybrid(seed=9) if layer == "hybrid" else make_ssm_lm(layer, seed=9)
    ids = ids_for(2, 23, seed=9)
    name = "conservative" if layer == "hybrid" else "mambalrp"
    kept = MambaLRP(model, composite=name, recompute=False).attribute(ids, target=(-1, 5))
    calls = []
    real = rc.in_pieces
    monkeypatch.setattr(rc, "in_pieces", lambda *a, **k: calls.append(a[3]) or real(*a, **k))
    again = MambaLRP(model, composite=name, recompute=SequenceChunks(chunk=5)).attribute(ids, target=(-1, 5))
    assert calls and set(calls) == {5}, calls
    assert ((again - kept).norm() / kept.norm()).item() < 1e-5


def test_conv_output_compute_leaves_the_attention_conv_in_its_dtype(monkeypatch):
    """``CAPTUM_MAMBALRP_CONV_OUTPUT=compute`` on a bf16 hybrid with an ``MHA`` conv: the Mamba
    mixers' convs give float32, the attention's conv keeps bf16 (what its projections read), and the
    pass conserves to bf16 rounding."""
    from captum_mambalrp.kernels.dispatch import CONV_OUTPUT_ENV

    model = make_ssm_hybrid(seed=5, **HYBRID_CONFIGS["mamba1_mha_conv_mlp_half"]).bfloat16()
    seen = {}
    convs = {n: m for n, m in model.named_modules() if n.endswith("conv1d")}
    handles = [m.register_forward_hook(lambda mod, a, out, n=n: seen.__setitem__(n, out.dtype)) for n, m in convs.items()]
    monkeypatch.setenv(CONV_OUTPUT_ENV, "compute")
    try:
        lrp = MambaLRP(model, composite="conservative")  # conservative on this hybrid (test above)
        relevance, delta = lrp.attribute(ids_for(1, 12, seed=5), target=3, return_convergence_delta=True)
    finally:
        for h in handles:
            h.remove()
    inst = install_rules(model, composite("conservative"))
    inst.patcher.restore()
    attention_layers = {c.name.rsplit(".attention", 1)[0] for c in inst.components if c.kind == "attention"}
    for name, dtype in seen.items():
        in_attention = any(name.startswith(layer + ".") for layer in attention_layers)
        assert dtype == (torch.bfloat16 if in_attention else torch.float32), (name, dtype)
    assert any(dtype == torch.bfloat16 for dtype in seen.values()) and any(dtype == torch.float32 for dtype in seen.values())
    assert delta.abs().max() <= 1e-2 * relevance.float().abs().sum()
