"""Mixture-of-experts layers and hybrid MLPs: each block alone (Jamba, GraniteMoeHybrid, Nemotron-H,
Qwen3-MoE; the MLPs of Bamba, Falcon-H1 with its multipliers, Zamba2 with its LoRA adapters,
Nemotron-H's squared ReLU) conserves relevance and keeps its forward value; a tiny Qwen3-MoE
model conserves end to end with left padding."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from test_transformers_models import bound, left_padded
from torch import nn

from captum_mambalrp import MambaLRP
from captum_mambalrp.adapters import install_rules
from captum_mambalrp.rules import composite


def init(module: nn.Module, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return module.eval()


def jamba_moe():
    from transformers import JambaConfig
    from transformers.models.jamba.modeling_jamba import JambaSparseMoeBlock

    cfg = JambaConfig(hidden_size=16, intermediate_size=24, num_experts=4, num_experts_per_tok=2)
    return JambaSparseMoeBlock(cfg)


def granite_moe():
    from transformers import GraniteMoeHybridConfig
    from transformers.models.granitemoehybrid.modeling_granitemoehybrid import GraniteMoeHybridMoE

    cfg = GraniteMoeHybridConfig(
        hidden_size=16, intermediate_size=24, num_local_experts=4, num_experts_per_tok=2, mamba_n_heads=4, mamba_d_head=8
    )
    return GraniteMoeHybridMoE(cfg)


def nemotron_cfg():
    from transformers import NemotronHConfig

    return NemotronHConfig(
        hidden_size=16,
        intermediate_size=24,
        n_routed_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=12,
        moe_shared_expert_intermediate_size=20,
        n_group=1,
        topk_group=1,
        mlp_hidden_act="relu2",
        mlp_bias=False,
    )


def nemotron_moe():
    from transformers.models.nemotron_h.modeling_nemotron_h import NemotronHMoE

    return NemotronHMoE(nemotron_cfg())


def qwen3_moe():
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    cfg = Qwen3MoeConfig(hidden_size=16, moe_intermediate_size=12, num_experts=4, num_experts_per_tok=2, norm_topk_prob=True)
    return Qwen3MoeSparseMoeBlock(cfg)


def bamba_mlp():
    from transformers.models.bamba.modeling_bamba import BambaMLP

    # the MLP reads four fields (a full BambaConfig validates its Mamba shapes too)
    return BambaMLP(SimpleNamespace(hidden_size=16, intermediate_size=24, mlp_bias=False, hidden_act="silu"))


def falcon_h1_mlp():
    from transformers import FalconH1Config
    from transformers.models.falcon_h1.modeling_falcon_h1 import FalconH1MLP

    return FalconH1MLP(FalconH1Config(hidden_size=16, intermediate_size=24, mlp_multipliers=[0.7, 1.9]))


def granite_shared_mlp():
    from transformers import GraniteMoeHybridConfig
    from transformers.models.granitemoehybrid.modeling_granitemoehybrid import GraniteMoeHybridMLP

    cfg = GraniteMoeHybridConfig(hidden_size=16, shared_intermediate_size=20, mamba_n_heads=4, mamba_d_head=8)
    return GraniteMoeHybridMLP(cfg)


def nemotron_mlp():
    from transformers.models.nemotron_h.modeling_nemotron_h import NemotronHMLP

    return NemotronHMLP(nemotron_cfg())


class Zamba2Call(nn.Module):
    """Zamba2's shared MLP as its hybrid layer calls it: ``mlp(x, layer_idx)``."""

    def __init__(self) -> None:
        super().__init__()
        from transformers import Zamba2Config
        from transformers.models.zamba2.modeling_zamba2 import Zamba2MLP

        cfg = Zamba2Config(hidden_size=16, intermediate_size=24, num_hidden_layers=2, layers_block_type=["hybrid", "hybrid"])
        self.mlp = Zamba2MLP(cfg, num_fwd_mem_blocks=2, block_id=0)
        self.layer_idx = cfg.hybrid_layer_ids[0]

    def forward(self, x):
        return self.mlp(x, self.layer_idx)


BLOCKS = {
    "jamba_moe": jamba_moe,
    "granite_moe": granite_moe,
    "nemotron_h_moe": nemotron_moe,
    "qwen3_moe": qwen3_moe,
    "bamba_mlp": bamba_mlp,
    "falcon_h1_mlp": falcon_h1_mlp,
    "granite_shared_mlp": granite_shared_mlp,
    "nemotron_h_mlp": nemotron_mlp,
    "zamba2_mlp": Zamba2Call,
}


def relevance_through(block: nn.Module, x: torch.Tensor, weights: torch.Tensor, name: str = "mambalrp"):
    """Relevance of ``x`` for ``sum(weights * block(x))`` with the rules installed, the explained
    score, and the output under the rules."""
    inst = install_rules(block, composite(name), require_layer=False)
    try:
        x = x.clone().requires_grad_(True)
        y = block(x)
        score = (weights * y).sum()
        (grad,) = torch.autograd.grad(score, x)
    finally:
        inst.patcher.restore()
    return (x * grad).detach(), score.detach(), y.detach(), inst


@pytest.mark.parametrize("kind", sorted(BLOCKS))
def test_block_conserves_and_keeps_its_forward(kind):
    block = init(BLOCKS[kind](), seed=len(kind))
    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(2, 5, 16, generator=g), torch.randn(2, 5, 16, generator=g)
    with torch.no_grad():
        expected = block(x)
    relevance, score, y, inst = relevance_through(block, x, w)
    assert torch.allclose(y, expected, atol=1e-6, rtol=1e-5)
    assert abs(float(relevance.sum() - score)) <= 1e-5 * max(abs(float(score)), 0.1), (relevance.sum(), score)
    assert "forward" not in block.__dict__ and all("forward" not in m.__dict__ for m in block.modules())
    kinds = {c.kind for c in inst.components}
    assert "activation" in kinds and ("router" in kinds) == kind.endswith("_moe")


@pytest.mark.parametrize("kind", ["jamba_moe", "nemotron_h_moe"])
def test_routing_gradient_breaks_conservation(kind):
    """Without the router rule, relevance also flows into the router: the sum no longer matches."""
    block = init(BLOCKS[kind](), seed=3)
    g = torch.Generator().manual_seed(2)
    x, w = torch.randn(1, 6, 16, generator=g), torch.randn(1, 6, 16, generator=g)
    relevance, score, _, _ = relevance_through(block, x, w, "no_router_rule")
    assert abs(float(relevance.sum() - score)) > 1e-3 * abs(float(score))


def test_qwen3_moe_model_conserves_with_left_padding():
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(0)
    cfg = Qwen3MoeConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        moe_intermediate_size=16,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        num_experts=4,
        num_experts_per_tok=2,
        norm_topk_prob=True,
        attention_bias=False,
    )
    model = init(Qwen3MoeForCausalLM(cfg), seed=5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(1.0)
    ids, mask = left_padded(3, 8, seed=4)
    logits = model(ids, attention_mask=mask).logits[:, -1, 9].detach()
    lrp = MambaLRP(model, composite="conservative")
    relevance, delta = lrp.attribute(ids, target=9, attention_mask=mask, return_convergence_delta=True)
    assert torch.allclose(relevance.sum(1) + delta, logits, atol=1e-5, rtol=1e-4)
    assert (delta.abs() <= bound(logits)).all(), (delta, logits)
    table = lrp.rule_table()
    assert table["model.layers.0.mlp.gate"] == "ConstantRouterRule()"
    assert table["model.layers.0.mlp.experts.gate"] == "HalfGateRule()"


@pytest.mark.parametrize("kind", ["jamba_moe", "granite_moe", "nemotron_h_moe", "qwen3_moe"])
@pytest.mark.parametrize("grouped_mm", [True, False])
def test_grouped_experts_equal_the_expert_loop(kind, grouped_mm, monkeypatch):
    """The grouped path (one product over all experts; ``grouped_mm`` or its per-expert fallback)
    gives the expert loop's output and relevance, with an expert that receives no token."""
    from captum_mambalrp.adapters import moe

    block = init(BLOCKS[kind](), seed=7)
    experts = next(m for m in block.modules() if type(m).__name__.endswith("Experts"))
    g = torch.Generator().manual_seed(4)
    x = torch.randn(9, 16, generator=g, requires_grad=True)
    weights = torch.rand(9, 2, generator=g)
    index = torch.tensor([[0, 2], [2, 0], [3, 0], [0, 3], [2, 3], [3, 2], [0, 2], [2, 0], [3, 0]])  # expert 1 unused
    rules = composite("mambalrp")
    act = rules.rule_for("e.act", "activation", experts.act_fn)
    gate = rules.rule_for("e.gate", "gate") if hasattr(experts, "gate_up_proj") else None
    lin = rules.rule_for("e.up", "linear")
    monkeypatch.setattr(moe, "grouped_mm_usable", lambda a, b: grouped_mm and moe.F.grouped_mm is not None)
    assert lin.linear_is_elementwise
    outs = []
    for fn in (moe._grouped_experts, moe._looped_experts):
        y = fn(experts, act, gate, lin, lin, x, index, weights)
        (grad,) = torch.autograd.grad((y * torch.linspace(-1, 1, 16)).sum(), x)
        outs.append((y.detach(), grad))
    assert torch.allclose(outs[0][0], outs[1][0], atol=1e-6, rtol=1e-5)
    assert torch.allclose(outs[0][1], outs[1][1], atol=1e-6, rtol=1e-5)


def test_grouped_linear_fallback_matches_grouped_mm_and_rule_without_weights_loops():
    """``grouped_linear``'s per-expert fallback equals ``grouped_mm``; LRP-gamma (which reads each
    expert's weights) takes the expert loop."""
    from captum_mambalrp.adapters import moe
    from captum_mambalrp.rules import GammaRule

    g = torch.Generator().manual_seed(5)
    x, w = torch.randn(10, 8, generator=g), torch.randn(3, 4, 8, generator=g)
    offsets = torch.tensor([3, 3, 10], dtype=torch.int32)
    assert moe.grouped_mm_usable(x, w)
    expected = torch.cat([x[:3] @ w[0].T, x[3:] @ w[2].T])
    assert torch.allclose(moe.grouped_linear(x, w, offsets), expected, atol=1e-6)
    odd = torch.randn(3, 4, 5, generator=g)  # rows of 20 bytes: not 16-byte aligned
    assert not moe.grouped_mm_usable(x[:, :5].contiguous(), odd)
    narrow = x[:, :5].contiguous()
    assert torch.allclose(moe.grouped_linear(narrow, odd, offsets), torch.cat([narrow[:3] @ odd[0].T, narrow[3:] @ odd[2].T]))
    assert not GammaRule().linear_is_elementwise
