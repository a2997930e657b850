"""Model-level checks of the GPU fast paths (``-m gpu``; skipped without CUDA).

For each architecture, every scan backend that can run on CUDA gives the relevance of
the CPU reference path (the torch backend on the CPU) to float32 rounding, and conserves
the explained logit with biases zero. Batches hold padding, so the masked path is covered.
"""

from __future__ import annotations

import pytest
import torch
from conftest import make_lm, relative_delta, zero_biases

from captum_mambalrp import MambaLRP, scan
from captum_mambalrp.adapters import install_rules
from captum_mambalrp.rules import composite

CUDA = torch.cuda.is_available()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="needs CUDA")]


def _mamba2():
    from test_mamba2 import make_mamba2

    return make_mamba2(hidden_size=32, num_heads=4, head_dim=16, state_size=16, n_groups=2, chunk_size=16)


def _mamba_ssm(layer: str):
    from test_mamba_ssm import make_ssm_lm

    extra = dict(headdim=16, chunk_size=16) if layer == "Mamba2" else {}
    return make_ssm_lm(layer, d_model=32, d_state=16, **extra)


MODELS = {
    "hf_mamba": lambda: zero_biases(make_lm("mamba", hidden_size=32, state_size=16)),
    "hf_falcon_mamba": lambda: zero_biases(make_lm("falcon", hidden_size=32, state_size=16)),
    "hf_mamba2": _mamba2,
    "mamba_ssm_mamba1": lambda: _mamba_ssm("Mamba1"),
    "mamba_ssm_mamba2": lambda: _mamba_ssm("Mamba2"),
}


def _inputs(batch: int = 3, length: int = 70):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 64, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[1, :9] = 0  # left padding
    mask[2, :30] = 0
    return ids, mask


@pytest.mark.parametrize("backend", ["torch", "triton", "mamba_ssm"])
@pytest.mark.parametrize("name", list(MODELS))
def test_gpu_backends_match_cpu_reference_and_conserve(name, backend):
    if (name.startswith("mamba_ssm") or backend == "mamba_ssm") and "mamba_ssm" not in scan.available_backends("cuda"):
        pytest.skip("mamba-ssm is not installed")
    if backend not in scan.available_backends("cuda"):
        pytest.skip(f"the {backend} backend cannot run here")
    model = MODELS[name]()
    ids, mask = _inputs()
    if name.startswith("mamba_ssm"):
        mask = None  # mamba-ssm's models take no attention mask
    ref, _ = MambaLRP(model, backend="torch").attribute(ids, target=5, attention_mask=mask, return_convergence_delta=True)
    model = model.cuda()
    with scan.record_backends() as used:
        rel, delta = MambaLRP(model, backend=backend).attribute(
            ids.cuda(), target=5, attention_mask=None if mask is None else mask.cuda(), return_convergence_delta=True
        )
    assert set(used) == {backend}
    err = (rel.cpu() - ref).abs().max() / ref.abs().max()
    assert err <= 1e-4, (backend, float(err))
    explained = rel.sum(dim=tuple(range(1, rel.dim()))) + delta  # delta = explained - sum(relevance)
    assert (relative_delta(delta, explained) <= 1e-4).all(), (backend, delta)


# ---------------------------------------------------------------- hybrids and Mamba3 (issue 13)


def _hf_hybrid(family: str):
    from test_hybrids import build

    return build(family, seed=31)


HYBRIDS = ["jamba", "bamba", "zamba2", "nemotron_h", "granite", "falcon_h1"]


@pytest.mark.parametrize("backend", ["torch", "triton", "mamba_ssm"])
@pytest.mark.parametrize("family", HYBRIDS)
def test_gpu_transformers_hybrids_match_cpu_and_conserve(family, backend):
    """transformers' hybrids (``composite="conservative"``): every CUDA backend's relevance equals
    the CPU path to 1e-4, with left padding, and conserves."""
    if backend not in scan.available_backends("cuda"):
        pytest.skip(f"the {backend} backend cannot run here")
    model = _hf_hybrid(family)
    ids, mask = _inputs(length=40)
    ids = ids % model.config.vocab_size
    ref = MambaLRP(model, composite="conservative", backend="torch").attribute(ids, target=5, attention_mask=mask)
    model = model.cuda()
    rel, delta = MambaLRP(model, composite="conservative", backend=backend).attribute(
        ids.cuda(), target=5, attention_mask=mask.cuda(), return_convergence_delta=True
    )
    err = (rel.cpu() - ref).abs().max() / ref.abs().max()
    assert err <= 1e-4, (family, backend, float(err))
    explained = rel.sum(1) + delta
    # float32 sums: 1e-5 of the score or of the relevance's mass, whichever is larger, since the sum
    # of relevance cancels (run 9 of docs/benchmarks_history.md: Bamba on the torch backend, delta 1.0e-6 for a
    # score of 0.0985, its relevance equal to the CPU's to 1e-4)
    mass = torch.maximum(explained.abs(), rel.abs().sum(1))
    assert (delta.abs() <= 1e-5 * mass).all(), (family, backend, delta, explained, mass)


@pytest.mark.parametrize("family", ["nemotron_h", "granite"])
def test_gpu_hybrid_layers_recomputed_give_the_same_relevance(family):
    """On CUDA, a hybrid with its attention, MLP and expert layers recomputed with the mixers
    (``recompute=True``; ``"projection"``, where they keep their products and the fused
    attention's output: efficient attention with the padding mask, flash without) gives the
    relevance of keeping everything, and its pass peaks lower."""
    model = _hf_hybrid(family).cuda()
    ids, mask = _inputs(length=1024)  # long enough for the activations to set the peak
    ids, mask = (ids % model.config.vocab_size).cuda(), mask.cuda()
    peaks, out = {}, {}
    for mode in (False, True, "projection"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out[mode] = MambaLRP(model, recompute=mode).attribute(ids, target=5, attention_mask=mask)
        torch.cuda.synchronize()
        peaks[mode] = torch.cuda.max_memory_allocated() - base
    torch.testing.assert_close(out[True], out[False], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out["projection"], out[False], atol=1e-5, rtol=1e-4)
    assert peaks[True] < peaks[False], peaks
    unmasked = {mode: MambaLRP(model, recompute=mode).attribute(ids[:1], target=5) for mode in (False, "projection")}
    torch.testing.assert_close(unmasked["projection"], unmasked[False], atol=1e-5, rtol=1e-4)


def _mamba_ssm_or_skip():
    from mamba_ssm_env import load_mamba_ssm

    found, how = load_mamba_ssm()
    if found is None or not how.startswith("installed"):
        pytest.skip(f"mamba-ssm with its kernels is not installed ({how})")
    return found


@pytest.mark.parametrize("backend", ["torch", "triton", "mamba_ssm"])
def test_gpu_mamba_ssm_hybrid_lm_real_kernels(backend):
    """mamba-ssm's hybrid ``MambaLMHeadModel`` (Mamba2, ``MHA`` with GQA, ``GatedMLP``): the model's
    own forward with its kernels equals the takeover's forward (TF32 inside Triton: 1e-2); relevance
    on CUDA equals the CPU path to 1e-4 and conserves."""
    _mamba_ssm_or_skip()
    from test_mamba_ssm import make_ssm_hybrid, takeover_logits

    if backend not in scan.available_backends("cuda"):
        pytest.skip(f"the {backend} backend cannot run here")
    model = make_ssm_hybrid(seed=32)
    ids, _ = _inputs(length=64)
    ref = MambaLRP(model, composite="conservative", backend="torch").attribute(ids, target=5)
    model = model.cuda()
    for m in model.modules():  # the fused Mamba2 path needs causal-conv1d's kernels; the unfused one runs
        if hasattr(m, "use_mem_eff_path"):  # the Triton SSD and gated-norm kernels without them
            m.use_mem_eff_path = False
    with torch.no_grad():
        own = model(ids.cuda()).logits.float()
    ours = takeover_logits(model, ids.cuda(), "conservative").float()
    assert ((own - ours).abs().max() / own.abs().max()) <= 1e-2
    rel, delta = MambaLRP(model, composite="conservative", backend=backend).attribute(
        ids.cuda(), target=5, return_convergence_delta=True
    )
    err = (rel.cpu() - ref).abs().max() / ref.abs().max()
    assert err <= 1e-4, (backend, float(err))
    explained = rel.sum(1) + delta
    assert (delta.abs() <= 1e-5 * explained.abs().clamp_min(0.1)).all(), (backend, delta)


@pytest.mark.parametrize("backend", ["torch", "triton", "mamba_ssm"])
@pytest.mark.parametrize("outproj_norm", [False, True])
def test_gpu_mamba3_real_kernel_and_relevance(backend, outproj_norm):
    """``Mamba3`` (SISO): its own Triton kernel (bf16 inside) against the torch path MambaLRP
    computes (bf16 tolerance 3e-2), and relevance on CUDA equal to the CPU path to 1e-4, conserved."""
    _mamba_ssm_or_skip()
    from test_mamba3 import Host, make_mamba3

    if backend not in scan.available_backends("cuda"):
        pytest.skip(f"the {backend} backend cannot run here")
    mixer = make_mamba3(seed=33, d_model=64, d_state=32, headdim=32, chunk_size=16, is_outproj_norm=outproj_norm)
    host = Host(mixer, seed=33)
    ids = torch.randint(0, 48, (2, 64), generator=torch.Generator().manual_seed(33))
    ref = MambaLRP(host, backend="torch").attribute(ids, target=(40, 3))
    host = host.cuda()
    u = host.embed(ids.cuda())
    with torch.no_grad():
        own = mixer(u).float()
        inst = install_rules(host, composite("mambalrp"))
        try:
            ours = mixer(u).float()
        finally:
            inst.patcher.restore()
    assert ((own - ours).abs().max() / ours.abs().max()) <= 3e-2, float((own - ours).abs().max() / ours.abs().max())
    rel, delta = MambaLRP(host, backend=backend).attribute(ids.cuda(), target=(40, 3), return_convergence_delta=True)
    err = (rel.cpu() - ref).abs().max() / ref.abs().max()
    assert err <= 1e-4, (backend, float(err))
    explained = rel.sum(1) + delta
    assert (delta.abs() <= 1e-5 * explained.abs().clamp_min(0.1)).all(), (backend, delta)


@pytest.mark.parametrize("family", ["bamba", "falcon_h1"])
def test_gpu_hybrid_cuda_graph_replays_equal_eager(family):
    """``cuda_graph=True`` on a hybrid (attention and Mamba2 layers): replays equal eager passes."""
    backends = [b for b in scan.available_backends("cuda") if b != "torch"]
    if not backends:
        pytest.skip("no CUDA scan backend beside torch")
    model = _hf_hybrid(family).cuda()
    ids, mask = _inputs(length=40)
    ids, mask = (ids % model.config.vocab_size).cuda(), mask.cuda()
    graphed = MambaLRP(model, composite="conservative", backend=backends[0], cuda_graph=True)
    eager = MambaLRP(model, composite="conservative", backend=backends[0])
    for target in [5, (3, 7), 5, (3, 7)]:  # the last position (the head there only) and an earlier one
        rel = graphed.attribute(ids, target=target, attention_mask=mask)
        ref = eager.attribute(ids, target=target, attention_mask=mask)
        assert ((rel - ref).abs().max() / ref.abs().max()) <= 1e-5, target
    assert graphed.cuda_graphs.captures == 2 and graphed.cuda_graphs.replays == 2  # a graph per kind of target


@pytest.mark.parametrize("family", ["granite", "nemotron_h"])
def test_gpu_moe_bf16_grouped_experts_and_cuda_graph(family):
    """MoE hybrids in bf16 on CUDA: the experts run as one ``grouped_mm`` per product (no host
    synchronisation), equal to the expert loop to bf16 rounding; ``cuda_graph=True`` replays equal
    eager passes; relevance conserves to bf16 rounding."""
    from captum_mambalrp.adapters import moe

    backends = [b for b in scan.available_backends("cuda") if b != "torch"]
    if not backends:
        pytest.skip("no CUDA scan backend beside torch")
    model = _hf_hybrid(family).cuda().to(torch.bfloat16)
    experts = next(m for m in model.modules() if type(m).__name__.endswith("Experts"))
    x = torch.randn(200, model.config.hidden_size, device="cuda", dtype=torch.bfloat16)
    weight = torch.rand(200, 2, device="cuda")
    index = torch.randint(0, int(experts.num_experts), (200, 2), device="cuda")
    assert moe.grouped_mm_usable(x, experts.down_proj)
    rules = composite("conservative")
    act = rules.rule_for("e.act", "activation", experts.act_fn)
    gate = rules.rule_for("e.gate", "gate") if hasattr(experts, "gate_up_proj") else None
    lin = rules.rule_for("e.up", "linear")
    grouped = moe._grouped_experts(experts, act, gate, lin, lin, x, index, weight).float()
    looped = moe._looped_experts(experts, act, gate, lin, lin, x, index, weight).float()
    assert ((grouped - looped).abs().max() / looped.abs().max()) <= 2e-2
    ids, mask = _inputs(length=40)
    ids, mask = (ids % model.config.vocab_size).cuda(), mask.cuda()
    graphed = MambaLRP(model, composite="conservative", backend=backends[0], cuda_graph=True)
    eager = MambaLRP(model, composite="conservative", backend=backends[0])
    for target in [5, (3, 7), 5, (3, 7)]:  # the last position (the head there only) and an earlier one
        rel, delta = graphed.attribute(ids, target=target, attention_mask=mask, return_convergence_delta=True)
        ref = eager.attribute(ids, target=target, attention_mask=mask)
        assert ((rel - ref).abs().max() / ref.abs().max()) <= 1e-5, target
        # bf16 gradients: conservation to a bf16-sized share of the relevance's mass
        assert (delta.abs() <= 2e-2 * rel.float().abs().sum(1)).all(), (family, delta, rel.float().abs().sum(1))
    assert graphed.cuda_graphs.captures == 2 and graphed.cuda_graphs.replays == 2  # a graph per kind of target
