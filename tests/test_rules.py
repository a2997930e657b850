"""Each rule against the explicit LRP formula on small tensors, and the whole model
against an independent step-by-step MambaLRP (the paper's PyTorch recipe)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from captum.attr._utils.lrp_rules import EpsilonRule as CaptumEpsilonRule
from captum.attr._utils.lrp_rules import GammaRule as CaptumGammaRule
from captum.attr._utils.lrp_rules import IdentityRule as CaptumIdentityRule
from conftest import make_lm, zero_biases
from reference_mambalrp import reference_relevance
from torch import nn

from captum_mambalrp import MambaLRP
from captum_mambalrp.adapters.norms import rms_norm
from captum_mambalrp.rules import (
    ConstantNormRule,
    ConstantSSMRule,
    EpsilonRule,
    GammaRule,
    GradientRule,
    HalfGateRule,
    IdentityActivationRule,
    as_mamba_rule,
    composite,
)
from captum_mambalrp.scan import selective_scan

torch.manual_seed(0)


def relevance_through(fn, x, r_out):
    """Input relevance of ``out = fn(x)`` for output relevance ``r_out``: modified
    gradient x input, seeded with ``r_out / out``."""
    x = x.clone().requires_grad_(True)
    out = fn(x)
    (g,) = torch.autograd.grad(out, x, grad_outputs=r_out / out.detach())
    return (x * g).detach()


def test_identity_activation_rule_passes_relevance_unchanged():
    x = torch.randn(50, dtype=torch.float64)
    r_out = torch.randn(50, dtype=torch.float64)
    rule = IdentityActivationRule()
    assert torch.allclose(relevance_through(lambda t: rule.activation(t, F.silu), x, r_out), r_out)
    shrink = x / (x + 1e-6 * torch.sign(x))  # other activations divide by a stabilised x
    assert torch.allclose(relevance_through(lambda t: rule.activation(t, torch.tanh), x, r_out), r_out * shrink)
    # the reference's stabilised form keeps the forward value and loses eps / (|x| + eps)
    ref = IdentityActivationRule(epsilon=1e-6)
    assert torch.allclose(ref.activation(x, F.silu), F.silu(x))
    got = relevance_through(lambda t: ref.activation(t, F.silu), x, r_out)
    assert torch.allclose(got, r_out * x / (x + 1e-6 * torch.sign(x)))
    # the forward value is the activation itself
    assert torch.equal(rule.activation(x, F.silu), x * torch.sigmoid(x))


def test_identity_rule_on_squared_relu_is_exact():
    """Squared ReLU (transformers' ``ReLUSquaredActivation``, Nemotron-H's MLPs): the default rule's
    forward is ``relu(x)^2`` bit for bit and ``x * dout/dx`` is the output relevance ``out * c`` element
    by element (``c`` the gradient reaching the output; zero where ``x <= 0``), with no stabiliser: at
    ``|x| = 1e-3`` the stabilised form would lose 1e-3 of it. The plain gradient doubles it
    (``x * 2 relu(x) = 2 out``); an activation not recognised as squared ReLU gets the stabilised form."""
    from transformers.activations import ACT2FN

    relu2 = ACT2FN["relu2"]
    assert type(relu2).__name__ == "ReLUSquaredActivation"
    g = torch.Generator().manual_seed(4)
    x = torch.cat([torch.randn(40, dtype=torch.float64, generator=g), torch.tensor([1e-3, -1e-3, 0.0], dtype=torch.float64)])
    c = torch.randn(x.shape, dtype=torch.float64, generator=g)
    out = torch.relu(x) ** 2

    def relevance(rule, fn):
        x_ = x.clone().requires_grad_(True)
        y = rule.activation(x_, fn)
        (grad,) = torch.autograd.grad(y, x_, grad_outputs=c)
        return y.detach(), (x * grad).detach()

    for fn in (relu2, relu2.forward):
        y, r = relevance(IdentityActivationRule(), fn)
        assert torch.equal(y, out) and torch.equal(y, relu2(x))
        torch.testing.assert_close(r, out * c, rtol=1e-15, atol=0)
        assert (r[x <= 0] == 0).all() and (r[x > 0] != 0).all()
    assert torch.allclose(relevance(GradientRule(), relu2)[1], 2 * out * c, rtol=1e-15, atol=0)
    stabilised = out * c * x / torch.where(x >= 0, x + 1e-6, x - 1e-6)
    for rule, fn in ((IdentityActivationRule(epsilon=1e-6), relu2), (IdentityActivationRule(), lambda t: torch.relu(t) ** 2)):
        y, r = relevance(rule, fn)
        torch.testing.assert_close(y, out, rtol=1e-15, atol=0)  # x_s * (out / x_s): equal up to rounding
        torch.testing.assert_close(r, stabilised, rtol=1e-12, atol=0)
        assert (r - out * c).abs().max() > 1e-4 * (out * c).abs()[x.abs() == 1e-3].max()


def test_half_gate_rule_splits_relevance_in_half():
    y, g = torch.randn(30, dtype=torch.float64), torch.randn(30, dtype=torch.float64)
    r_out = torch.randn(30, dtype=torch.float64)
    y_, g_ = y.clone().requires_grad_(True), g.clone().requires_grad_(True)
    p = HalfGateRule().gate(y_, g_)
    assert torch.equal(p.detach(), y * g)
    gy, gg = torch.autograd.grad(p, (y_, g_), grad_outputs=r_out / (y * g))
    assert torch.allclose(y * gy, r_out / 2)
    assert torch.allclose(g * gg, r_out / 2)


def test_constant_norm_rule_is_identity_per_channel():
    x = torch.randn(4, 10, dtype=torch.float64)
    w = torch.randn(10, dtype=torch.float64)
    r_out = torch.randn(4, 10, dtype=torch.float64)
    r_in = relevance_through(lambda t: rms_norm(t, w, 1e-6, ConstantNormRule()), x, r_out)
    assert torch.allclose(r_in, r_out)
    # with the plain gradient the norm does not conserve
    r_grad = relevance_through(lambda t: rms_norm(t, w, 1e-6, GradientRule()), x, r_out)
    assert not torch.allclose(r_grad.sum(-1), r_out.sum(-1), atol=1e-3)


def lrp_epsilon(x, W, b, r_out, eps):
    z = x @ W.T + b
    s = r_out / (z + eps * torch.where(z >= 0, 1.0, -1.0))
    return x * (s @ W)  # R_i = sum_j x_i w_ji R_j / z_j


@pytest.mark.parametrize("eps", [1e-9, 0.1])
def test_epsilon_rule_matches_lrp_epsilon_formula(eps):
    lin = nn.Linear(6, 5).double()
    x = torch.randn(3, 6, dtype=torch.float64)
    r_out = torch.randn(3, 5, dtype=torch.float64)
    rule = EpsilonRule(eps)
    got = relevance_through(lambda t: rule.linear(lin, t, lin(t)), x, r_out * lin(x).detach() / lin(x).detach())
    # relevance_through seeds r_out / out; the rule scales by z / (z + eps), so compare with the formula
    expected = lrp_epsilon(x, lin.weight.detach(), lin.bias.detach(), r_out, eps)
    assert torch.allclose(got, expected, atol=1e-10)


def lrp_gamma_loop(x, W, b, r_out, gamma):
    """The gamma rule written out per neuron, sign by sign."""
    out = torch.zeros_like(x)
    for n in range(x.shape[0]):
        for j in range(W.shape[0]):
            contrib = x[n] * W[j]
            z = contrib.sum() + b[j]
            if z > 0:
                c = contrib + gamma * contrib.clamp(min=0)
                zp = c.sum() + b[j] + gamma * max(b[j], 0)
            else:
                c = contrib + gamma * contrib.clamp(max=0)
                zp = c.sum() + b[j] + gamma * min(b[j], 0)
            out[n] += c * r_out[n, j] / zp
    return out


def test_gamma_rule_matches_explicit_formula():
    lin = nn.Linear(5, 4).double()
    x = torch.randn(3, 5, dtype=torch.float64)
    r_out = torch.randn(3, 4, dtype=torch.float64)
    rule = GammaRule(gamma=0.25)
    got = relevance_through(lambda t: rule.linear(lin, t, lin(t)), x, r_out)
    expected = lrp_gamma_loop(x, lin.weight.detach(), lin.bias.detach(), r_out, 0.25)
    assert torch.allclose(got, expected, atol=1e-8)


@pytest.mark.parametrize("rule", [GammaRule(gamma=0.25), EpsilonRule()], ids=["gamma", "epsilon"])
def test_rules_on_zero_outputs_of_a_half_precision_layer(rule):
    """An fp16 layer whose outputs are exactly zero (a padded token's, a bias-free layer on zeros):
    the rule's factor is computed in float32, where its default stabiliser (1e-9, zero in fp16)
    exists, so the relevance is zero there, not ``0 / 0``; elsewhere it equals the float32 rule's
    to fp16 rounding."""
    lin = nn.Linear(5, 4, bias=False)
    x = torch.randn(3, 5)
    x[1] = 0.0
    r_out = torch.randn(3, 4)
    half = copy.deepcopy(lin).half()

    def gxi(layer, t, g):  # modified gradient x input, the gradient seeded with g (finite at zero outputs)
        t = t.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(rule.linear(layer, t, layer(t)), t, g)
        return (t * grad).detach().float()

    got, want = gxi(half, x.half(), r_out.half()), gxi(lin, x, r_out)
    assert torch.isfinite(got).all() and (got[1] == 0).all()
    assert ((got - want).abs() <= 2e-2 * want.abs().max()).all()


def depthwise_conv_matrices(weight, length, padding):
    """A depthwise ``Conv1d`` (weight ``[c, 1, k]``) as one matrix per channel, entry by entry from
    the cross-correlation's definition: ``z[c, t] = sum_j w[c, 0, j] x[c, t + j - padding]``, so
    ``M[c, t, s] = w[c, 0, s - t + padding]`` where that tap exists."""
    channels, _, k = weight.shape
    out_len = length + 2 * padding - k + 1
    M = torch.zeros(channels, out_len, length, dtype=weight.dtype)
    for c in range(channels):
        for t in range(out_len):
            for j in range(k):
                s = t + j - padding
                if 0 <= s < length:
                    M[c, t, s] = weight[c, 0, j]
    return M


@pytest.mark.parametrize("gamma, bias", [(0.5, False), (0.5, True), (0.1, True)])
def test_gamma_rule_on_depthwise_conv(gamma, bias):
    """LRP-gamma on a depthwise causal ``Conv1d`` (Mamba's, padding ``k - 1``) equals the gamma rule
    written out per output position (``lrp_gamma_loop``) on the conv as an explicit per-channel matrix:
    ``R_s = sum_t c_ts (1 + gamma [c_ts sign z_t > 0]) R_t / zp_t`` with ``c_ts = x_s M_ts``. The inputs
    mix signs, so gamma matters: LRP-0 (``GammaRule(0)``, ``EpsilonRule``, the gradient) differs from the
    expected relevance by far more than the tolerance."""
    g = torch.Generator().manual_seed(12)
    conv = nn.Conv1d(3, 3, 4, groups=3, padding=3, bias=bias).double()
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=g, dtype=torch.float64))
        if bias:
            conv.bias.copy_(0.5 * torch.randn(3, generator=g, dtype=torch.float64))
    x = torch.randn(2, 3, 9, dtype=torch.float64, generator=g)
    r_out = torch.randn(2, 3, 12, dtype=torch.float64, generator=g)
    assert (conv.weight > 0).any() and (conv.weight < 0).any() and (x > 0).any() and (x < 0).any()
    M = depthwise_conv_matrices(conv.weight.detach(), 9, 3)
    b = conv.bias.detach() if bias else torch.zeros(3, dtype=torch.float64)
    z = torch.einsum("cts,ncs->nct", M, x) + b[:, None]
    assert torch.allclose(z, conv(x).detach(), atol=1e-12)  # the matrices are the conv

    def expected(gam):
        per_channel = [lrp_gamma_loop(x[:, c], M[c], b[c].expand(12), r_out[:, c], gam) for c in range(3)]
        return torch.stack(per_channel, dim=1)

    def package(rule):
        return relevance_through(lambda t: rule.linear(conv, t, conv(t)), x, r_out)

    want = expected(gamma)
    scale = want.abs().max()
    got = package(GammaRule(gamma))
    torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-9 * scale)  # room for the rule's 1e-9 stabiliser only
    # the check tells the rules apart: LRP-0 is far from LRP-gamma on these inputs
    assert (expected(0.0) - want).abs().max() > 1e-2 * scale
    for wrong in (GammaRule(0.0), GammaRule(gamma / 2), EpsilonRule(), GradientRule()):
        assert (package(wrong) - want).abs().max() > 1e-2 * scale, wrong
    if not bias:  # bias-free: conservative under any rule (so conservation alone checks nothing)
        assert torch.allclose(got.sum(), r_out.sum())


def test_ssm_rule_matches_explicit_linear_map():
    """With constant parameters the scan is y = M x; relevance is x_s M_ts R_t / y_t."""
    b, d, n, l = 1, 3, 2, 6
    x = torch.randn(b, d, l, dtype=torch.float64)
    delta = torch.rand(b, d, l, dtype=torch.float64)
    A = -torch.rand(d, n, dtype=torch.float64)
    B, C = torch.randn(b, n, l, dtype=torch.float64), torch.randn(b, n, l, dtype=torch.float64)
    D = torch.randn(d, dtype=torch.float64)
    M = torch.zeros(d, l, l, dtype=torch.float64)  # M[c, t, s]
    for c in range(d):
        for t in range(l):
            for s in range(t + 1):
                decay = torch.exp(A[c] * delta[0, c, s + 1 : t + 1].sum())
                M[c, t, s] = (C[0, :, t] * decay * delta[0, c, s] * B[0, :, s]).sum()
            M[c, t, t] += D[c]
    y_explicit = torch.einsum("cts,cs->ct", M, x[0])
    r_out = torch.randn(b, d, l, dtype=torch.float64)
    expected = torch.einsum("cs,cts,ct->cs", x[0], M, r_out[0] / y_explicit)
    rule = ConstantSSMRule()

    def scan(t):
        dl, a, bb, cc = rule.ssm_constants(delta, A, B, C)
        return selective_scan(t, dl, a, bb, cc, D, linear=True).double()

    assert torch.allclose(scan(x)[0], y_explicit, atol=1e-5)
    got = relevance_through(scan, x, r_out)[0]
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("held", [[], ["B", "C"], ["delta", "C"], ["delta", "B"], ["delta", "B", "C"]])
def test_ssm_rule_pieces_match_a_step_by_step_scan(held):
    """ConstantSSMRule(held): the input relevance is gradient x input through a scan whose
    delta, B, C depend on x and of which exactly ``held`` are detached, computed here by an
    explicit recurrence (delta = softplus(x W), B = x W_B, C = x W_C, as in a Mamba1 mixer)."""
    b, d, n, l = 1, 3, 2, 7
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(b, d, l, dtype=torch.float64, generator=gen)
    W, WB, WC = (torch.randn(d, k, dtype=torch.float64, generator=gen) for k in (d, n, n))
    A = -torch.rand(d, n, dtype=torch.float64, generator=gen)
    D = torch.randn(d, dtype=torch.float64, generator=gen)
    r_out = torch.randn(b, d, l, dtype=torch.float64, generator=gen)

    def params(t):  # [b, d, l] -> delta [b, d, l], B and C [b, n, l]
        u = t.transpose(1, 2)
        return F.softplus(u @ W).transpose(1, 2), (u @ WB).transpose(1, 2), (u @ WC).transpose(1, 2)

    def explicit(t):
        delta, B_, C_ = (p.detach() if name in held else p for name, p in zip(("delta", "B", "C"), params(t)))
        h = torch.zeros(b, d, n, dtype=torch.float64)
        ys = []
        for s in range(l):
            h = torch.exp(delta[:, :, s, None] * A) * h + (delta[:, :, s] * t[:, :, s])[..., None] * B_[:, None, :, s]
            ys.append((h * C_[:, None, :, s]).sum(-1) + D * t[:, :, s])
        return torch.stack(ys, -1)

    rule = ConstantSSMRule(held)

    def package(t):
        delta, B_, C_ = params(t)
        dl, a, bb, cc = rule.ssm_constants(delta, A, B_, C_)
        return selective_scan(t, dl, a, bb, cc, D, linear=rule.ssm_is_linear).double()

    assert torch.allclose(package(x), explicit(x), atol=1e-10)
    got, want = relevance_through(package, x, r_out), relevance_through(explicit, x, r_out)
    assert torch.allclose(got, want, rtol=1e-8, atol=1e-10)
    assert rule.ssm_is_linear == (len(held) == 3)
    if len(held) == 3:  # only the full rule conserves
        assert torch.allclose(got.sum(), r_out.sum())


def test_ssm_rule_rejects_unknown_parameters():
    with pytest.raises(ValueError, match=r"unknown scan parameters \['dt'\]; choose among"):
        ConstantSSMRule(["dt", "B"])


@pytest.mark.parametrize("arch", ["mamba", "mamba2"])
def test_ssm_rule_piece_ablations_lie_between_the_rule_and_its_absence(arch):
    """No piece held constant is the no_ssm_rule ablation, all three is MambaLRP; each
    one-piece ablation (no_ssm_rule_delta / _b / _c) differs from both."""
    model = zero_biases(make_lm(arch, seed=8, num_hidden_layers=2))
    with torch.no_grad():  # larger projections make delta, B and C depend strongly on x
        for name, p in model.named_parameters():
            if "x_proj" in name or "in_proj" in name:
                p.mul_(3)
    ids = torch.randint(0, 64, (2, 24), generator=torch.Generator().manual_seed(7))
    full = MambaLRP(model).attribute(ids, target=4)
    none = MambaLRP(model, composite="no_ssm_rule").attribute(ids, target=4)
    assert torch.allclose(MambaLRP(model, rules={"ssm": ConstantSSMRule([])}).attribute(ids, target=4), none)
    assert torch.allclose(MambaLRP(model, rules={"ssm": ConstantSSMRule()}).attribute(ids, target=4), full)
    for piece in ("delta", "b", "c"):
        part = MambaLRP(model, composite=f"no_ssm_rule_{piece}").attribute(ids, target=4)
        assert (part - full).abs().max() > 1e-3 * full.abs().max(), piece
        assert (part - none).abs().max() > 1e-3 * full.abs().max(), piece


def test_captum_rules_are_accepted_and_mapped():
    assert isinstance(as_mamba_rule(CaptumEpsilonRule(1e-3)), EpsilonRule)
    assert as_mamba_rule(CaptumEpsilonRule(1e-3)).epsilon == 1e-3
    assert as_mamba_rule(CaptumGammaRule(0.5)).gamma == 0.5
    assert isinstance(as_mamba_rule(CaptumIdentityRule()), IdentityActivationRule)
    with pytest.raises(TypeError, match="cannot be applied"):
        composite("mambalrp", {"gate": EpsilonRule()}).rule_for("m.gate", "gate")


@pytest.mark.parametrize("arch", ["mamba", "falcon"])
def test_matches_independent_reference(arch):
    """Same relevance as a step-by-step implementation of the authors' PyTorch path: to
    float rounding with their 1e-6 SiLU stabiliser ("mambalrp_reference"), and within that
    stabiliser's effect with the exact ``x * sigmoid(x).detach()`` (the default)."""
    model = make_lm(arch, seed=11, num_hidden_layers=3, hidden_size=24, state_size=8)
    ids = torch.randint(0, 64, (2, 33), generator=torch.Generator().manual_seed(5))
    expected, logit = reference_relevance(model, ids, position=-1, cls=9)
    scale = expected.abs().max()
    same = MambaLRP(model, composite="mambalrp_reference").attribute(ids, target=9)
    assert torch.allclose(same, expected, rtol=1e-5, atol=1e-6 * scale)
    exact = MambaLRP(model).attribute(ids, target=9)
    assert torch.allclose(exact, expected, rtol=0, atol=1e-4 * scale)


def test_rule_swaps_the_captum_way_and_by_map():
    model = zero_biases(make_lm("mamba", seed=2))
    ids = torch.randint(0, 64, (1, 16), generator=torch.Generator().manual_seed(6))
    base = MambaLRP(model).attribute(ids, target=1)
    mixer = model.backbone.layers[0].mixer
    mixer.out_proj.rule = GammaRule(0.5)
    try:
        lrp = MambaLRP(model)
        with_attr = lrp.attribute(ids, target=1)
        assert lrp.rule_table()["backbone.layers.0.mixer.out_proj"].startswith("GammaRule")
    finally:
        del mixer.out_proj.rule
    by_map = MambaLRP(model, rules={"backbone.layers.0.mixer.out_proj": GammaRule(0.5)}).attribute(ids, target=1)
    assert torch.allclose(with_attr, by_map)
    assert not torch.allclose(with_attr, base)
    mixer.act.rule = CaptumIdentityRule()  # the Captum way, on the SiLU module
    try:
        assert torch.allclose(MambaLRP(model).attribute(ids, target=1), base)
    finally:
        del mixer.act.rule


ABLATIONS = ["no_activation_rule", "no_ssm_rule", "no_gate_rule", "no_norm_rule"]


@pytest.mark.parametrize("ablation", ABLATIONS)
def test_each_ablation_changes_relevance_and_breaks_conservation(ablation):
    model = zero_biases(make_lm("mamba", seed=8, num_hidden_layers=2))
    with torch.no_grad():  # larger projections make delta, B and C depend strongly on x
        for name, p in model.named_parameters():
            if "x_proj" in name or "in_proj" in name:
                p.mul_(3)
    ids = torch.randint(0, 64, (2, 24), generator=torch.Generator().manual_seed(7))
    full, d_full = MambaLRP(model).attribute(ids, target=4, return_convergence_delta=True)
    kind = ablation[3:-5]
    by_name, d_abl = MambaLRP(model, composite=ablation).attribute(ids, target=4, return_convergence_delta=True)
    by_key = MambaLRP(model, rules={kind: GradientRule()}).attribute(ids, target=4)
    assert torch.allclose(by_name, by_key)
    assert (by_name - full).abs().max() > 1e-2 * full.abs().max()
    assert d_abl.abs().max() > 100 * d_full.abs().max()


def test_unknown_rule_key_is_reported():
    model = make_lm("mamba")
    with pytest.raises(KeyError, match="match no component"):
        MambaLRP(model, rules={"*.sssm": GradientRule()})


def test_every_composite_names_a_rule_for_every_kind():
    from captum_mambalrp.rules import ATTENTION, COMPOSITES, KINDS, AttnLRPRule, ConstantAttentionRule, ConstantRouterRule

    for name, make in COMPOSITES.items():
        rules = make()
        assert set(rules) == set(KINDS), name
        assert all(rule.supports(kind) for kind, rule in rules.items()), name
    assert isinstance(composite("mambalrp").defaults[ATTENTION], AttnLRPRule)
    conservative = composite("conservative").defaults
    assert isinstance(conservative[ATTENTION], ConstantAttentionRule) and isinstance(conservative["router"], ConstantRouterRule)
    assert {k: repr(r) for k, r in conservative.items() if k != ATTENTION} == {
        k: repr(r) for k, r in composite("mambalrp").defaults.items() if k != ATTENTION
    }


def test_composite_is_stateless_and_the_install_reports_matched_keys():
    from captum_mambalrp.adapters import Patcher, install_rules
    from captum_mambalrp.rules import Composite, TrackingComposite

    model = zero_biases(make_lm("mamba", seed=1))
    shared = composite("mambalrp", {"*.layers.0.mixer.ssm": GradientRule(), "gate": HalfGateRule()})
    state = dict(vars(shared))
    inst = install_rules(model, shared, patcher=Patcher())
    inst.patcher.restore()
    assert inst.matched_keys == {"*.layers.0.mixer.ssm", "gate"}
    assert dict(vars(shared)) == state  # nothing recorded on the composite itself
    shared.check_overrides_used(inst.matched_keys, [c.name for c in inst.components])
    with pytest.raises(KeyError, match=r"\['gate'\] match no component"):
        shared.check_overrides_used({"*.layers.0.mixer.ssm"}, [c.name for c in inst.components])
    # the same composite serves two explainers and repeated calls alike
    ids = torch.randint(0, 64, (1, 9), generator=torch.Generator().manual_seed(3))
    first = MambaLRP(model, composite=shared).attribute(ids, target=2)
    again = MambaLRP(model, composite=shared).attribute(ids, target=2)
    assert torch.equal(first, again) and dict(vars(shared)) == state
    tracked = shared.tracking()
    assert isinstance(tracked, TrackingComposite) and tracked.defaults is shared.defaults
    tracked.rule_for("backbone.layers.0.mixer.ssm", "ssm")
    assert tracked.matched == {"*.layers.0.mixer.ssm"}
    assert Composite().rule_for("x.ssm", "ssm").ssm_is_linear  # no arguments: the "mambalrp" set


def test_attention_rule_swaps_by_pattern_and_by_module_rule():
    from test_transformers_models import make_transformer

    from captum_mambalrp.rules import ConstantAttentionRule

    model = make_transformer("llama", seed=2)
    ids = torch.randint(0, 64, (1, 6), generator=torch.Generator().manual_seed(4))
    cp = MambaLRP(model, composite="conservative").attribute(ids, target=1)
    by_key = MambaLRP(model, rules={"attention": ConstantAttentionRule()}).attribute(ids, target=1)
    by_pattern = MambaLRP(model, rules={"*.self_attn.attention": ConstantAttentionRule()}).attribute(ids, target=1)
    for layer in model.model.layers:
        layer.self_attn.rule = ConstantAttentionRule()
    try:
        by_module = MambaLRP(model).attribute(ids, target=1)
    finally:
        for layer in model.model.layers:
            del layer.self_attn.rule
    for other in (by_key, by_pattern, by_module):
        assert torch.allclose(other, cp, atol=1e-7)
    assert not torch.allclose(MambaLRP(model).attribute(ids, target=1), cp, atol=1e-4)


def test_a_rule_that_reads_the_step_gets_it_final():
    """Mamba1's step reaches the stock ConstantSSMRule raw (``dt_proj``'s product; the scan applies
    the bias and softplus) and any other SSM rule final (``softplus(dt + bias)``, as the rule's
    contract says): a subclass that records what it holds sees positive steps of the mixer's shape,
    and its relevance equals the stock rule's."""
    from captum_mambalrp.rules.ssm import takes_raw_step

    seen = {}

    class Recording(ConstantSSMRule):
        def ssm_constants(self, delta, A, B, C):
            seen.setdefault("delta", delta.detach())
            return super().ssm_constants(delta, A, B, C)

    class RawSpy(ConstantSSMRule):
        pass

    assert takes_raw_step(RawSpy()) and not takes_raw_step(Recording())
    model = make_lm("falcon", seed=3, num_hidden_layers=2)
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    stock = MambaLRP(model).attribute(ids, target=4)
    recorded = MambaLRP(model, rules={"ssm": Recording()}).attribute(ids, target=4)
    torch.testing.assert_close(recorded, stock, atol=1e-6, rtol=1e-5)
    mixer = model.backbone.layers[0].mixer
    assert (seen["delta"] > 0).all() and seen["delta"].shape == (2, mixer.intermediate_size, 12)
