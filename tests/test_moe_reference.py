"""Mixture-of-experts blocks and MLPs against LRP written out message by message in float64.

The references below use no autograd and none of the package's code: each linear layer is
LRP-epsilon ``R_i = x_i sum_j w_ji R_j / z_j`` (the float64 default epsilon, about 1.9e-18, is below
rounding here), the product ``act(gate) * up`` gives each factor half of its relevance, an activation
passes its relevance unchanged, and a mixture of experts ``y_t = sum_k w_tk E_{i_tk}(x_t) (+ shared(x_t))``
hands the summand ``w_tk E_{i_tk}(x_t)`` its share ``c_t * w_tk E_{i_tk}(x_t)`` of the relevance
``c_t * y_t`` (routing weights and choice constant), token by token and expert by expert. Only the
router's outputs (transformers' own router) and the weights are read from the blocks.
"""

from __future__ import annotations

import copy

import pytest
import torch
from test_moe import BLOCKS, init, nemotron_cfg
from test_moe import relevance_through as package_relevance
from torch import nn

MOE_KINDS = ["jamba_moe", "granite_moe", "nemotron_h_moe", "qwen3_moe"]


def lrp_linear(x, W, r_out, b=None):
    """LRP-epsilon through ``z = x W^T + b`` (rows of ``x`` are samples): ``R_i = x_i sum_j w_ji R_j / z_j``."""
    z = x @ W.T if b is None else x @ W.T + b
    return x * ((r_out / z) @ W)


def gated_mlp(x, w_gate, w_up, w_down, c, b_gate=None, b_up=None, b_down=None):
    """``down(silu(gate(x)) * up(x))``: its output ``y`` and the relevance of ``x`` for the output
    relevance ``c * y`` (``c`` the score's weights on ``y``)."""
    g = x @ w_gate.T if b_gate is None else x @ w_gate.T + b_gate
    u = x @ w_up.T if b_up is None else x @ w_up.T + b_up
    h = g * torch.sigmoid(g) * u
    out = h @ w_down.T if b_down is None else h @ w_down.T + b_down
    r_h = lrp_linear(h, w_down, c * out, b_down)
    r_act, r_up = r_h / 2, r_h / 2  # half rule on the product
    r_g = r_act  # identity rule on SiLU
    return out, lrp_linear(x, w_gate, r_g, b_gate) + lrp_linear(x, w_up, r_up, b_up)


def relu2_mlp(x, w_up, w_down, c, b_up=None, b_down=None):
    """``down(relu(up(x))^2)``: its output ``y`` and the relevance of ``x`` for the output relevance
    ``c * y`` (identity rule on squared ReLU; where ``up(x) <= 0`` the activation and so its relevance
    are zero)."""
    u = x @ w_up.T if b_up is None else x @ w_up.T + b_up
    h = torch.relu(u) ** 2
    out = h @ w_down.T if b_down is None else h @ w_down.T + b_down
    r_h = lrp_linear(h, w_down, c * out, b_down)
    assert (r_h[u <= 0] == 0).all() and (u != 0).all()
    return out, lrp_linear(x, w_up, r_h, b_up)


@torch.no_grad()
def moe_reference(block: nn.Module, x: torch.Tensor, c: torch.Tensor, w: torch.Tensor, idx: torch.Tensor):
    """Output and input relevance of ``score = sum(c * block(x))`` for one MoE block (float64 weights),
    ``x, c [tokens, hidden]``, with the routing ``w, idx [tokens, k]`` held fixed."""
    experts = block.experts
    out, relevance = torch.zeros_like(x), torch.zeros_like(x)
    for t in range(x.shape[0]):
        for k in range(idx.shape[1]):
            e, xt = int(idx[t, k]), x[t : t + 1]
            c_k = c[t] * w[t, k]  # the summand w_tk E_e(x_t) has relevance c_t * w_tk E_e(x_t)
            if hasattr(experts, "gate_up_proj"):
                w_gate, w_up = experts.gate_up_proj[e].chunk(2, dim=0)
                y, r = gated_mlp(xt, w_gate, w_up, experts.down_proj[e], c_k)
            else:
                y, r = relu2_mlp(xt, experts.up_proj[e], experts.down_proj[e], c_k)
            out[t] += w[t, k] * y[0]
            relevance[t] += r[0]
    shared = getattr(block, "shared_experts", None)
    if shared is not None:  # Nemotron-H: y = experts + shared MLP of the same input, no latent projection
        assert isinstance(block.fc1_latent_proj, nn.Identity) and isinstance(block.fc2_latent_proj, nn.Identity)
        y, r = relu2_mlp(x, shared.up_proj.weight, shared.down_proj.weight, c)
        out, relevance = out + y, relevance + r
    return out, relevance


def routing(block: nn.Module, x: torch.Tensor):
    """transformers' router of ``block`` on ``x [tokens, hidden]``: weights and choice ``[tokens, k]``."""
    router = block.router if hasattr(block, "router") else block.gate
    with torch.no_grad():
        _, w, idx = router(x)
    return w, idx


def block_inputs(seed: int, dtype: torch.dtype):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 5, 16, generator=g, dtype=torch.float64).to(dtype) for _ in range(2))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("kind", MOE_KINDS)
def test_moe_block_matches_explicit_lrp(kind, dtype):
    """Per token and feature, the relevance of a MoE block's input (package: rules installed on the
    block, ``x * grad``) equals the explicit LRP above: to 1e-10 in float64, to float32 rounding in
    float32 (reference in float64 on a float64 copy, with the float32 run's routing). The block's
    value, the reference's own conservation, and that the comparison tells the rules apart: routing
    weights by gradient (not detached), the product without the half rule, the activation by gradient
    (each a package ablation) all land far outside the tolerance."""
    block = init(BLOCKS[kind](), seed=len(kind)).to(dtype)
    x, c = block_inputs(1, dtype)
    w, idx = routing(block, x.view(-1, 16))
    assert len(idx.unique()) >= 3 and (w > 0).all()
    ref_block = copy.deepcopy(block).double()
    x64, c64 = x.double().view(-1, 16), c.double().view(-1, 16)
    out, want = moe_reference(ref_block, x64, c64, w.double(), idx)
    want = want.view(2, 5, 16)
    with torch.no_grad():  # transformers' value (routing weights in float32, Nemotron-H's sum too)
        torch.testing.assert_close(out.view(2, 5, 16), ref_block(x.double()), rtol=1e-5, atol=1e-6 * float(out.abs().max()))
    score = (c64 * out).sum()
    torch.testing.assert_close(want.sum(), score, rtol=1e-10, atol=1e-10)  # every rule conserves, no biases

    got, package_score, _, _ = package_relevance(block, x, c)
    assert got.dtype == dtype
    scale = float(want.abs().max())
    tol = dict(rtol=1e-10, atol=1e-12 * scale) if dtype == torch.float64 else dict(rtol=1e-5, atol=2e-6 * scale)
    torch.testing.assert_close(package_score.double(), score, **tol)
    torch.testing.assert_close(got.double(), want, **tol)
    gated = hasattr(block.experts, "gate_up_proj")
    for ablation in ["no_router_rule", "no_activation_rule"] + (["no_gate_rule"] if gated else []):
        wrong = package_relevance(block, x, c, ablation)[0].double()
        assert (wrong - want).abs().max() > 1e-2 * scale, ablation


def test_float64_moe_runs_without_help():
    """A float64 MoE block runs under the rules as transformers runs it (``moe.grouped_mm_usable``
    refuses float64, which torch's CPU ``grouped_mm`` does not take: one product per expert); its
    relevance is then the explicit LRP's."""
    block = init(BLOCKS["qwen3_moe"](), seed=3).double()
    x, c = block_inputs(2, torch.float64)
    w, idx = routing(block, x.view(-1, 16))
    want = moe_reference(block, x.view(-1, 16), c.view(-1, 16), w, idx)[1].view(2, 5, 16)
    got = package_relevance(block, x, c)[0]
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12 * float(want.abs().max()))


def llama_mlp():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    return LlamaMLP(LlamaConfig(hidden_size=16, intermediate_size=24, num_attention_heads=4, mlp_bias=True, hidden_act="silu"))


def nemotron_mlp_with_bias():
    from transformers.models.nemotron_h.modeling_nemotron_h import NemotronHMLP

    cfg = nemotron_cfg()
    cfg.mlp_bias = True
    return NemotronHMLP(cfg)


@torch.no_grad()
def mlp_reference(mlp: nn.Module, x: torch.Tensor, c: torch.Tensor):
    def p(lin):
        return lin.weight.detach(), lin.bias.detach()

    if hasattr(mlp, "gate_proj"):
        (wg, bg), (wu, bu), (wd, bd) = p(mlp.gate_proj), p(mlp.up_proj), p(mlp.down_proj)
        return gated_mlp(x, wg, wu, wd, c, bg, bu, bd)
    (wu, bu), (wd, bd) = p(mlp.up_proj), p(mlp.down_proj)
    return relu2_mlp(x, wu, wd, c, bu, bd)


@pytest.mark.parametrize("make", [llama_mlp, nemotron_mlp_with_bias], ids=["llama_silu_gated", "nemotron_h_relu2"])
def test_mlp_matches_explicit_lrp(make):
    """A dense MLP with biases (``LlamaMLP``: ``down(silu(gate(x)) * up(x))``; ``NemotronHMLP``:
    ``down(relu(up(x))^2)``) in float64: the package's input relevance equals the explicit LRP to 1e-10
    (biases absorb their share, so it does not conserve); the gate rule's and the activation rule's
    ablations land far outside the tolerance."""
    mlp = init(make(), seed=9).double()
    x, c = block_inputs(3, torch.float64)
    out, want = mlp_reference(mlp, x.view(-1, 16), c.view(-1, 16))
    want = want.view(2, 5, 16)
    with torch.no_grad():
        torch.testing.assert_close(out.view(2, 5, 16), mlp(x), rtol=1e-12, atol=1e-12)
    got = package_relevance(mlp, x, c)[0]
    scale = float(want.abs().max())
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12 * scale)
    assert abs(float(want.sum() - (c * out.view(2, 5, 16)).sum())) > 1e-3 * scale  # the biases take their share
    ablations = ["no_activation_rule"] + (["no_gate_rule"] if hasattr(mlp, "gate_proj") else [])
    for ablation in ablations:
        wrong = package_relevance(mlp, x, c, ablation)[0]
        assert (wrong - want).abs().max() > 1e-2 * scale, ablation
