"""Mixture-of-experts layers of transformers models (Jamba, GraniteMoeHybrid, Nemotron-H, Qwen3-MoE).

In transformers 5 each MoE layer is a block with a router and a fused experts module::

    logits, w, idx = router(x)                     # top-k choice idx and its weights w [tokens, k]
    y = experts(x, idx, w)                          # sum_k w_k * E_{idx_k}(x), experts as 3D weights
      + shared_experts(x)                           # (Nemotron-H; Granite's shared MLP sits beside the block)

with ``E_e(x) = W_down[e] (act(W_gate[e] x) * W_up[e] x)`` (gated, ``gate_up_proj`` holding both
halves) or ``W_down[e] act(W_up[e] x)`` (Nemotron-H, squared ReLU). MambaLRP's rules: the router's
outputs are constants (kind ``router``, :class:`~captum_mambalrp.rules.ConstantRouterRule`), so the
layer is a fixed weighted sum of the selected experts; inside each expert the identity rule on
``act`` (``<experts>.act``), the half rule on the product (``<experts>.gate``) and the linear rule on
the two matrix products (``<experts>.gate_up_proj`` / ``up_proj``, ``<experts>.down_proj``).
The block itself is left as it is (its children are installed one by one).
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..rules.base import ACTIVATION, GATE, LINEAR, ROUTER, MambaRule
from ..rules.composites import Composite
from ..rules.gate import gate_with_activation
from .base import Adapter, Component, register
from .patching import Patcher

#: classes read in transformers 5.24; each router returns ``(logits, top_k_weights, top_k_index)``
SUPPORTED_ROUTERS = ("JambaTopKRouter", "GraniteMoeHybridTopKRouter", "NemotronHTopkRouter", "Qwen3MoeTopKRouter")
SUPPORTED_EXPERTS = ("JambaExperts", "GraniteMoeHybridExperts", "NemotronHExperts", "Qwen3MoeExperts")
SUPPORTED_MOE = ("JambaSparseMoeBlock", "GraniteMoeHybridMoE", "NemotronHMoE", "Qwen3MoeSparseMoeBlock")


def _from_transformers(module: nn.Module, names: tuple) -> bool:
    cls = type(module)
    return cls.__name__ in names and cls.__module__.startswith("transformers.")


def as_linear(weight: Tensor) -> nn.Linear:
    """An ``nn.Linear`` view of one expert's weight ``[out, in]`` (no copy, no bias), so that the
    linear rules (which read ``module.weight``) apply to it as to any linear layer.

    Returns:
        A bias-free ``nn.Linear`` whose ``weight`` is ``weight`` itself.

    >>> as_linear(torch.ones(3, 2)).out_features
    3
    """
    view = nn.Linear.__new__(nn.Linear)
    nn.Module.__init__(view)
    view.in_features, view.out_features = weight.shape[1], weight.shape[0]
    view.weight = weight  # type: ignore[assignment]  # a plain tensor attribute (the parameter's slice)
    view.bias = None  # type: ignore[assignment]
    return view


def _ruled_linear(rule: MambaRule, x: Tensor, weight: Tensor) -> Tensor:
    return rule.linear(as_linear(weight), x, F.linear(x, weight))


class RouterAdapter(Adapter):
    """MoE routers: their outputs (logits, top-k weights) pass through the router rule."""

    label = "transformers MoE router (" + ", ".join(SUPPORTED_ROUTERS) + ")"

    def claims(self, module: nn.Module) -> bool:
        return _from_transformers(module, SUPPORTED_ROUTERS)

    def affine_parts(self, module: nn.Module) -> Dict[str, nn.Module]:
        return {}

    def install(self, module: nn.Module, name: str, composite: Composite, patcher: Patcher, backend: str) -> List[Component]:
        rule = composite.rule_for(name, ROUTER, module)

        def constant(value: Any) -> Any:
            return rule.routing(value) if isinstance(value, Tensor) and value.is_floating_point() else value

        def hook(m: nn.Module, args: Any, out: Any) -> Any:
            return tuple(constant(v) for v in out) if isinstance(out, tuple) else constant(out)

        patcher.add_handle(module.register_forward_hook(hook))
        return [Component(name, ROUTER, rule)]


def experts_forward(
    experts: Any,
    act_rule: MambaRule,
    gate_rule: Optional[MambaRule],
    up_rule: MambaRule,
    down_rule: MambaRule,
    hidden: Tensor,
    top_k_index: Tensor,
    top_k_weights: Tensor,
) -> Tensor:
    """``sum_k w_k E_{idx_k}(x)`` per token with the rules in each expert; ``gate_rule is None``
    for experts without a gate (Nemotron-H).

    With linear rules that read only the product's output (``linear_is_elementwise``: LRP-epsilon,
    the plain gradient) the selected (token, expert) pairs are sorted by expert and each matrix
    product is one grouped product over all experts (:func:`grouped_linear`, as transformers'
    ``grouped_mm`` experts do; no host synchronisation on CUDA in bf16). Other linear rules (LRP-gamma
    reads each expert's weights) go expert by expert.

    Returns:
        ``[tokens, hidden]`` in the dtype the model's own forward returns.
    """
    if up_rule.linear_is_elementwise and down_rule.linear_is_elementwise:
        return _grouped_experts(experts, act_rule, gate_rule, up_rule, down_rule, hidden, top_k_index, top_k_weights)
    return _looped_experts(experts, act_rule, gate_rule, up_rule, down_rule, hidden, top_k_index, top_k_weights)


def _expert_activation(experts: Any, act_rule: MambaRule, gate_rule: Optional[MambaRule], up_out: Tensor) -> Tensor:
    """``act(up)`` (no gate) or ``act(gate) * up`` (the halves of ``gate_up_proj``), with the rules."""
    if gate_rule is None:
        return act_rule.activation(up_out, experts.act_fn.forward)
    gate, up = up_out.chunk(2, dim=-1)
    return gate_with_activation(gate_rule, act_rule, up, gate, experts.act_fn.forward)


def grouped_mm_usable(x: Tensor, weight: Tensor) -> bool:
    """Whether ``torch.nn.functional.grouped_mm`` runs ``x @ weight[e].T`` here: on CUDA (compute
    capability 8.0 or more) in bfloat16, on the CPU in float32, bfloat16 or float16 when every
    operand is 16-byte aligned (float64, which torch's CPU kernel refuses, takes one product per expert).

    >>> grouped_mm_usable(torch.ones(4, 3), torch.ones(2, 5, 3))  # rows of 12 bytes
    False
    >>> grouped_mm_usable(torch.ones(4, 4, dtype=torch.float64), torch.ones(2, 4, 4, dtype=torch.float64))
    False
    """
    if not hasattr(F, "grouped_mm") or x.dtype != weight.dtype:
        return False
    if x.is_cuda:
        return x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device) >= (8, 0)
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False
    size = x.element_size()
    aligned = all(t.data_ptr() % 16 == 0 and all(s * size % 16 == 0 for s in t.stride()[:-1]) for t in (x, weight))
    return aligned and all(n * size % 16 == 0 for n in weight.shape[1:])


def grouped_linear(x: Tensor, weight: Tensor, offsets: Tensor) -> Tensor:
    """Rows of ``x`` sorted by expert times their expert's weight: ``x[offsets[e-1]:offsets[e]] @
    weight[e].T`` for every expert ``e`` (``offsets`` the cumulative row counts, int32).

    One ``grouped_mm`` where :func:`grouped_mm_usable`, else one product per expert (a host
    synchronisation reads ``offsets``). Rows past ``offsets[-1]`` are zero in the fallback and
    left unwritten by ``grouped_mm``.

    Returns:
        ``[rows, out]``.

    >>> w = torch.arange(12.0).reshape(2, 2, 3)
    >>> grouped_linear(torch.ones(3, 3), w, torch.tensor([1, 3], dtype=torch.int32))
    tensor([[ 3., 12.],
            [21., 30.],
            [21., 30.]])
    """
    if grouped_mm_usable(x, weight):
        return F.grouped_mm(x, weight.transpose(-2, -1), offs=offsets)
    out, start = x.new_zeros(x.shape[0], weight.shape[1]), 0
    for e, end in enumerate(offsets.tolist()):
        if end > start:
            out[start:end] = F.linear(x[start:end], weight[e])
        start = end
    return out


def _grouped_experts(experts, act_rule, gate_rule, up_rule, down_rule, hidden, top_k_index, top_k_weights):
    k, tokens = top_k_index.shape[-1], hidden.shape[0]
    n_experts = int(experts.num_experts)
    with torch.no_grad():
        order = torch.argsort(top_k_index.reshape(-1), stable=True)
        ids = top_k_index.reshape(-1)[order]
        # histc, not bincount: no host synchronisation (CUDA graphs); float input on the CPU. Under
        # expert parallelism, ids of other ranks' experts (>= n_experts) sort last and are not counted.
        counts = torch.histc(ids.float() if ids.device.type == "cpu" else ids.int(), bins=n_experts, min=0, max=n_experts - 1)
        offsets = torch.cumsum(counts, dim=0, dtype=torch.int32)
        foreign = (ids >= n_experts)[:, None] if getattr(experts, "_is_expert_parallel", False) else None

    def product(x: Tensor, weight: Tensor) -> Tensor:
        z = grouped_linear(x, weight, offsets)
        return z if foreign is None else z.masked_fill(foreign, 0.0)  # rows past offsets[-1] are left unwritten

    x = hidden[order // k]
    up_weight = experts.up_proj if gate_rule is None else experts.gate_up_proj
    h = _expert_activation(experts, act_rule, gate_rule, up_rule.linear(experts, x, product(x, up_weight)))
    y = down_rule.linear(experts, h, product(h, experts.down_proj)) * top_k_weights.reshape(-1)[order, None]
    # back to (token, k) order; summed over k in the routing weights' precision, as transformers does
    return torch.empty_like(y).index_copy_(0, order, y).view(tokens, k, -1).sum(dim=1).to(hidden.dtype)


def _looped_experts(experts, act_rule, gate_rule, up_rule, down_rule, hidden, top_k_index, top_k_weights):
    """Expert by expert (transformers' eager loop), for linear rules that read the weights."""
    n_experts = int(experts.num_experts)
    out = torch.zeros_like(hidden, dtype=top_k_weights.dtype if gate_rule is None else hidden.dtype)
    with torch.no_grad():
        expert_mask = F.one_hot(top_k_index, num_classes=n_experts + 1).permute(2, 1, 0)
        hit = torch.greater(expert_mask.sum(dim=(-1, -2)), 0).nonzero()
    for e in hit[:, 0].tolist():
        if e == n_experts:
            continue
        pos, token = torch.where(expert_mask[e])
        x = hidden[token]
        up_weight = experts.up_proj[e] if gate_rule is None else experts.gate_up_proj[e]
        h = _expert_activation(experts, act_rule, gate_rule, _ruled_linear(up_rule, x, up_weight))
        y = _ruled_linear(down_rule, h, experts.down_proj[e]) * top_k_weights[token, pos, None]
        out.index_add_(0, token, y.to(out.dtype))
    return out.to(hidden.dtype)


class ExpertsAdapter(Adapter):
    """Fused experts (3D weights): the rules inside each selected expert."""

    label = "transformers MoE experts (" + ", ".join(SUPPORTED_EXPERTS) + ")"
    recomputed_whole = True

    def claims(self, module: nn.Module) -> bool:
        plain_layout = not any(getattr(module, a, False) for a in ("has_bias", "is_transposed", "has_post_expert_norm"))
        return _from_transformers(module, SUPPORTED_EXPERTS) and plain_layout and getattr(module, "is_concatenated", True)

    def affine_parts(self, module: nn.Module) -> Dict[str, nn.Module]:
        return {}

    def install(self, module: nn.Module, name: str, composite: Composite, patcher: Patcher, backend: str) -> List[Component]:
        gated = hasattr(module, "gate_up_proj")
        up_name = f"{name}.gate_up_proj" if gated else f"{name}.up_proj"
        act_module: nn.Module = module.act_fn  # type: ignore[assignment]
        act_rule = composite.rule_for(f"{name}.act", ACTIVATION, act_module)
        gate_rule = composite.rule_for(f"{name}.gate", GATE) if gated else None
        up_rule = composite.rule_for(up_name, LINEAR)
        down_rule = composite.rule_for(f"{name}.down_proj", LINEAR)
        components = [Component(up_name, LINEAR, up_rule), Component(f"{name}.act", ACTIVATION, act_rule)]
        if gate_rule is not None:
            components.append(Component(f"{name}.gate", GATE, gate_rule))
        components.append(Component(f"{name}.down_proj", LINEAR, down_rule))

        def forward(hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
            return experts_forward(module, act_rule, gate_rule, up_rule, down_rule, hidden_states, top_k_index, top_k_weights)

        patcher.replace_forward(module, forward)
        return components


class MoEBlockAdapter(Adapter):
    """The MoE block: its own forward (route, experts, shared experts, sums) stays; its router,
    experts, shared MLP and latent projections are installed one by one."""

    label = "transformers MoE block (" + ", ".join(SUPPORTED_MOE) + ")"
    recomputed_whole = True
    wraps_children = True

    def claims(self, module: nn.Module) -> bool:
        return _from_transformers(module, SUPPORTED_MOE)

    def affine_parts(self, module: nn.Module) -> Dict[str, nn.Module]:
        return {}

    def install(self, module: nn.Module, name: str, composite: Composite, patcher: Patcher, backend: str) -> List[Component]:
        return []


register(RouterAdapter())
register(ExpertsAdapter())
register(MoEBlockAdapter())
