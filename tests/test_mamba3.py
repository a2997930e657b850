"""mamba-ssm's ``Mamba3`` (SISO, MIMO, output norm): MambaLRP's torch path against an independent
step-by-step recurrence, conservation, and the model-unchanged guarantees.

The reference below is written from Mamba3's recurrence (the step form of mamba-ssm's decode
kernel and of its MIMO test reference: ``S_t = alpha_t S_{t-1} + beta_t v_{t-1} k_{t-1}^T +
gamma_t v_t k_t^T``) as a Python loop over time, sharing no code with the package; MambaLRP's
rules there: every input-dependent parameter (``dt``, ``A``, trapezoid, angles, ``q``, ``k``)
detached, SiLU as ``x * sigmoid(x).detach()``, the gate's output halved in the gradient, the
output norm's ``rsqrt`` detached. The real Mamba3 kernels (CUDA) are compared on the GPU
(``tests/test_gpu_models.py``).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from mamba_ssm_env import load_mamba_ssm
from test_api import assert_unchanged, snapshot
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from captum_mambalrp import MambaLRP, SequenceChunks
from captum_mambalrp.adapters import install_rules
from captum_mambalrp.rules import composite

VOCAB = 48


def mssm():
    found, how = load_mamba_ssm()
    if found is None:
        pytest.skip(f"mamba-ssm's module definitions are not available: {how}")
    return found


def make_mamba3(seed: int = 0, d_model: int = 16, mimo: bool = False, **kwargs) -> nn.Module:
    """A ``Mamba3`` with random (non-trivial) parameters; MIMO is built without its TileLang
    kernels by pointing the constructor's availability check at a stand-in."""
    cls = mssm().Mamba3
    torch.manual_seed(seed)
    cfg = dict(d_model=d_model, d_state=8, expand=2, headdim=8, ngroups=1, chunk_size=4, is_mimo=mimo, mimo_rank=2)
    cfg.update(kwargs)
    env = cls.__init__.__globals__
    saved = env.get("mamba3_mimo_combined")
    env["mamba3_mimo_combined"] = saved or (lambda *a, **k: None)
    try:
        mixer = cls(**cfg).eval()
    finally:
        env["mamba3_mimo_combined"] = saved
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in mixer.parameters():
            if p.dim() == 2:  # projections: unit-scale outputs
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)
            else:
                p.copy_(p + 0.3 * torch.randn(p.shape, generator=g))
    return mixer


class Host(nn.Module):
    """``embedding -> Mamba3 -> linear head`` (mamba-ssm has no Mamba3 language model yet)."""

    def __init__(self, mixer: nn.Module, classes: int = 5, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        d = mixer.d_model
        self.embed = nn.Embedding(VOCAB, d)
        self.mixer = mixer
        self.head = nn.Linear(d, classes, bias=False)
        nn.init.normal_(self.head.weight, std=d**-0.5)

    def forward(self, input_ids=None, inputs_embeds=None):
        h = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
        return self.head(self.mixer(h))


def _silu_identity(x):
    return x * torch.sigmoid(x).detach()


def _rotate(x, theta, pairwise):
    n = x.shape[-1]
    out = x.clone()
    for i in range(theta.shape[-1]):
        j, k = (2 * i, 2 * i + 1) if pairwise else (i, i + n // 2)
        c, s = torch.cos(theta[..., i]), torch.sin(theta[..., i])
        out[..., j] = x[..., j] * c - x[..., k] * s
        out[..., k] = x[..., j] * s + x[..., k] * c
    return out


def reference_mamba3(m, u):
    """Mamba3 with MambaLRP's rules, step by step (see the module doc)."""
    b, length, _ = u.shape
    h, p, n, g = m.nheads, m.headdim, m.d_state, m.num_bc_heads
    R = m.mimo_rank if m.is_mimo else 1
    z, x, B, C, dd_dt, dd_A, trap, angles = torch.split(
        m.in_proj(u), [m.d_inner, m.d_inner, n * g * R, n * g * R, h, h, h, m.num_rope_angles], dim=-1
    )
    dt = F.softplus(dd_dt + m.dt_bias).detach()
    A = torch.clamp(-F.softplus(dd_A), max=-m.A_floor).detach()
    lam = torch.sigmoid(trap).detach()

    def norm(t, module):
        return module.weight * t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + module.eps)

    B = norm(B.reshape(b, length, R, g, n), m.B_norm).repeat_interleave(h // g, dim=3).detach()
    C = norm(C.reshape(b, length, R, g, n), m.C_norm).repeat_interleave(h // g, dim=3).detach()
    x = x.reshape(b, length, h, p)
    z = z.reshape(b, length, h, p)
    theta = torch.zeros(b, h, m.num_rope_angles)
    S = torch.zeros(b, h, p, n)
    k_prev = torch.zeros(b, R, h, n)
    v_prev = torch.zeros(b, R, h, p)
    outs = []
    for t in range(length):
        theta = theta + math.pi * torch.tanh(angles[:, t, None, :]).detach() * dt[:, t, :, None]
        k = _rotate(B[:, t] + m.B_bias.transpose(0, 1), theta[:, None], not m.is_mimo)  # [b, R, h, n]
        q = _rotate(C[:, t] + m.C_bias.transpose(0, 1), theta[:, None], not m.is_mimo)
        v = x[:, t, None] * (m.mimo_x.transpose(0, 1) if m.is_mimo else 1.0)  # [b, R, h, p]
        alpha = torch.exp(A[:, t] * dt[:, t])
        beta = alpha * dt[:, t] * (1 - lam[:, t])
        gamma = dt[:, t] * lam[:, t]
        S = (
            alpha[..., None, None] * S
            + beta[..., None, None] * torch.einsum("brhp,brhn->bhpn", v_prev, k_prev)
            + gamma[..., None, None] * torch.einsum("brhp,brhn->bhpn", v, k)
        )
        y = torch.einsum("bhpn,brhn->brhp", S, q) + m.D[:, None] * v
        zr = z[:, t, None] * (m.mimo_z.transpose(0, 1) if m.is_mimo else 1.0)
        if m.is_outproj_norm:
            w = m.norm.weight.reshape(h, p)
            y = w * y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + m.norm.eps).detach()
        y = y * _silu_identity(zr)
        y = y / 2 + (y / 2).detach()
        y = (y * m.mimo_o.transpose(0, 1)).sum(1) if m.is_mimo else y[:, 0]
        outs.append(y.reshape(b, h * p))
        k_prev, v_prev = k, v
    return m.out_proj(torch.stack(outs, dim=1))


def reference_relevance(host, ids, position, cls):
    emb = host.embed(ids).detach().requires_grad_(True)
    score = host.head(reference_mamba3(host.mixer, emb))[:, position, cls]
    (grad,) = torch.autograd.grad(score.sum(), emb)
    return (emb * grad).sum(-1), score.detach()


VARIANTS = {
    "siso": dict(),
    "siso_outproj_norm": dict(is_outproj_norm=True),
    "siso_full_rope_groups": dict(rope_fraction=1.0, ngroups=2),
    "mimo": dict(mimo=True),
    "mimo_outproj_norm": dict(mimo=True, is_outproj_norm=True, mimo_rank=3),
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_forward_equals_step_by_step_recurrence(variant):
    mixer = make_mamba3(seed=1, **VARIANTS[variant])
    u = torch.randn(2, 9, mixer.d_model, generator=torch.Generator().manual_seed(1))
    host = Host(mixer)
    with torch.no_grad():
        expected = reference_mamba3(mixer, u)
        inst = install_rules(host, composite("mambalrp"))
        try:
            got = mixer(u)
        finally:
            inst.patcher.restore()
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-4), (got - expected).abs().max()


@pytest.mark.parametrize("variant", VARIANTS)
def test_relevance_equals_reference_and_conserves(variant):
    host = Host(make_mamba3(seed=2, **VARIANTS[variant]), seed=2)
    ids = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(2))
    before = snapshot(host)
    relevance, delta = MambaLRP(host, backend="torch").attribute(ids, target=(7, 3), return_convergence_delta=True)
    ref, score = reference_relevance(host, ids, 7, 3)
    scale = float(ref.detach().abs().max())
    assert torch.allclose(relevance, ref, atol=1e-4 * scale, rtol=1e-4), (relevance - ref).abs().max() / scale
    assert ((relevance.sum(1) - score).abs() <= 1e-5 * score.abs().clamp_min(0.1)).all(), (relevance.sum(1), score)
    assert_unchanged(host, before)


def test_components_and_refusals():
    host = Host(make_mamba3(seed=3, is_outproj_norm=True))
    inst = install_rules(host, composite("mambalrp"))
    try:
        kinds = {c.name: c.kind for c in inst.components if c.name.startswith("mixer.")}
        assert kinds == {
            "mixer.ssm": "ssm",
            "mixer.gate_act": "activation",
            "mixer.gate": "gate",
            "mixer.norm": "norm",
            "mixer.in_proj": "linear",
            "mixer.out_proj": "linear",
        }, kinds
        u = torch.randn(1, 4, host.mixer.d_model)
        with pytest.raises(ValueError, match="packed"):
            host.mixer(u, cu_seqlens=torch.tensor([0, 4], dtype=torch.int32))
        with pytest.raises(ValueError, match="inference_params"):
            host.mixer(u, inference_params=object())
    finally:
        inst.patcher.restore()


# ---------------------------------------------------------------- memory-saving paths


def make_mamba3_lm(mimo: bool = False, seed: int = 0, n_layer: int = 2, d_model: int = 16) -> nn.Module:
    """mamba-ssm's ``MambaLMHeadModel`` (its ``Block``s, fused add-norm, ``lm_head``, ``num_last_tokens``)
    with a Mamba3 mixer in every block: its ``create_block`` builds Mamba1 and Mamba2 only, so the
    model is built with Mamba2 mixers and each is swapped for a :func:`make_mamba3`."""
    from test_mamba_ssm import make_ssm_lm

    model = make_ssm_lm("Mamba2", seed=seed, d_model=d_model, n_layer=n_layer)
    for i, block in enumerate(model.backbone.layers):
        block.mixer = make_mamba3(seed=seed + 10 + i, d_model=d_model, mimo=mimo)
    return model.eval()


class CallCounts(TorchDispatchMode):
    """How often the mixer's ``in_proj`` and ``out_proj`` products ran (``self.products``, keyed
    by name; told by the weight's memory, read transposed as ``F.linear`` does) and how often the
    modules were called (``self.calls``, forward hooks)."""

    def __init__(self, mixer: nn.Module) -> None:
        super().__init__()
        self.weights = {name: getattr(mixer, name).weight for name in ("in_proj", "out_proj")}
        self.products = dict.fromkeys(self.weights, 0)
        self.calls = dict.fromkeys(self.weights, 0)
        self.handles = [getattr(mixer, name).register_forward_hook(self._counter(name)) for name in self.weights]

    def _counter(self, name):
        def hook(module, args, out):
            self.calls[name] += 1

        return hook

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default):
            operand = args[-1]
            for name, w in self.weights.items():
                if operand.data_ptr() == w.data_ptr() and tuple(operand.shape[-2:]) == tuple(w.t().shape):
                    self.products[name] += 1
        return func(*args, **(kwargs or {}))

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()
        return super().__exit__(*exc)


# mode -> (recompute, in_proj module calls, in_proj products, out_proj products) in one pass
MEMORY_PATHS = {
    "recompute": (True, 2, 2, 2),
    "projection": ("projection", 2, 1, 1),  # the recomputation reads both saved products
    "offload": ("offload", 2, 2, 2),
    # Mamba3 has no piece function: "sequence" recomputes the mixer whole (docs/scaling.md);
    # pieces of 4 tokens, which do not divide the 11 tokens, would call in_proj once per piece
    "sequence": ("sequence", 2, 2, 2),
    "sequence_chunks": (SequenceChunks(chunk=4, stride=2), 2, 2, 2),
    "auto": ("auto", 1, 1, 1),  # this machine's memory holds everything
    "auto_over_budget": ("auto", 2, 2, 2),  # CAPTUM_MAMBALRP_MEMORY_BUDGET=1: recompute, with a warning
}


@pytest.mark.parametrize("path", MEMORY_PATHS)
@pytest.mark.parametrize("mimo", [False, True], ids=["siso", "mimo"])
def test_every_memory_path_equals_keeping_and_conserves(mimo, path, monkeypatch):
    """Relevance and delta with each memory-saving path equal those with ``recompute=False`` (to
    1e-6), the relevance sums to the score of the step-by-step reference (1e-5 relative), and the
    mixer ran as the path says: recomputed (``in_proj`` called twice), in ``"projection"`` mode
    without running its two products again, kept once by ``"auto"`` when memory suffices and
    recomputed when ``CAPTUM_MAMBALRP_MEMORY_BUDGET`` holds nothing."""
    recompute, calls, in_products, out_products = MEMORY_PATHS[path]
    host = Host(make_mamba3(seed=4, mimo=mimo, is_outproj_norm=True), seed=4)
    ids = torch.randint(0, VOCAB, (3, 11), generator=torch.Generator().manual_seed(4))
    _, score = reference_relevance(host, ids, -1, 2)
    before = snapshot(host)
    kept, kept_delta = MambaLRP(host, recompute=False).attribute(ids, target=2, return_convergence_delta=True)
    assert ((kept.sum(1) - score).abs() <= 1e-5 * score.abs().clamp_min(0.1)).all(), (kept.sum(1), score)
    lrp = MambaLRP(host, recompute=recompute)
    if path == "auto_over_budget":
        monkeypatch.setenv("CAPTUM_MAMBALRP_MEMORY_BUDGET", "1")
    with CallCounts(host.mixer) as seen:
        if path == "auto_over_budget":
            with pytest.warns(ResourceWarning, match="run out of memory"):
                relevance, delta = lrp.attribute(ids, target=2, return_convergence_delta=True)
        else:
            relevance, delta = lrp.attribute(ids, target=2, return_convergence_delta=True)
    assert seen.calls == {"in_proj": calls, "out_proj": calls}, seen.calls
    assert seen.products == {"in_proj": in_products, "out_proj": out_products}, seen.products
    torch.testing.assert_close(relevance, kept, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(delta, kept_delta, atol=1e-6, rtol=1e-5)
    assert_unchanged(host, before)
