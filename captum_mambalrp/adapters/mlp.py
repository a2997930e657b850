"""MLPs of transformers models and hybrids: gated (SwiGLU-style) and plain.

Every supported MLP computes, for ``x [..., hidden]``::

    gated:  y = m_down * down( act(m_gate * gate(x)) * up(x) )     # Llama, Qwen3, Jamba, Bamba, Falcon-H1, ...
    plain:  y = m_down * down( act(up(x)) )                        # Nemotron-H (squared ReLU)

with ``gate(x), up(x)`` two linear layers or the two halves of one (Granite's ``input_linear``,
Zamba2's ``gate_up_proj`` plus its per-layer LoRA adapter) and ``m_gate``, ``m_down`` Falcon-H1's
multipliers (1 elsewhere; linear scalings, no rule). MambaLRP's rules: the identity rule on
``act`` (component ``<mlp>.act``, kind ``activation``), the half rule on the product
(``<mlp>.gate``, kind ``gate``, as the gate of a Mamba mixer), and the linear rule on the linear
layers through the install's hooks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from ..rules.base import ACTIVATION, GATE, MambaRule
from ..rules.composites import Composite
from ..rules.gate import gate_with_activation
from .base import Adapter, Component, register
from .patching import Patcher

Projection = Callable[..., Tuple[Tensor, Optional[Tensor]]]  # (x, **kwargs) -> (pre-activation, up or None)


@dataclass
class MLPParts:
    """Where the parts of one MLP live."""

    project: Projection
    act_module: nn.Module
    down: nn.Module
    affine: Dict[str, nn.Module]
    gate_multiplier: float = 1.0
    down_multiplier: float = 1.0
    gated: bool = True


def mlp_forward(parts: MLPParts, act_rule: MambaRule, gate_rule: MambaRule, x: Tensor, **kwargs) -> Tensor:
    """``m_down * down(gate_rule.gate(act_rule.activation(m_gate * pre), up))`` (or without the
    product for a plain MLP): the MLP with MambaLRP's rules.

    Returns:
        The MLP's output, equal in value to its own forward.
    """
    pre, up = parts.project(x, **kwargs)
    if parts.gate_multiplier != 1.0:
        pre = pre * parts.gate_multiplier
    if up is None:
        hidden = act_rule.activation(pre, parts.act_module.forward)
    else:  # the product of the Mamba gate's form (fused into one kernel on CUDA for the default rules)
        hidden = gate_with_activation(gate_rule, act_rule, up, pre, parts.act_module.forward)
    out = parts.down(hidden)
    return out * parts.down_multiplier if parts.down_multiplier != 1.0 else out


def mlp_parts(module: nn.Module) -> Optional[MLPParts]:
    """The parts of a supported MLP, or ``None`` when ``module`` is not one (by structure)."""
    act = getattr(module, "act_fn", None)
    if not isinstance(act, nn.Module):
        act = getattr(module, "activation", None)
    if not isinstance(act, nn.Module):
        return None
    lin: Dict[str, nn.Linear] = {n: m for n, m in module.named_children() if isinstance(m, nn.Linear)}
    if {"gate_proj", "up_proj", "down_proj"} <= lin.keys():
        gate_proj, up_proj = lin["gate_proj"], lin["up_proj"]
        multipliers = getattr(module, "gate_multiplier", 1.0), getattr(module, "down_multiplier", 1.0)  # Falcon-H1
        return MLPParts(
            project=lambda x: (gate_proj(x), up_proj(x)),
            act_module=act,
            down=lin["down_proj"],
            affine={k: lin[k] for k in ("gate_proj", "up_proj", "down_proj")},
            gate_multiplier=float(multipliers[0]),
            down_multiplier=float(multipliers[1]),
        )
    if {"input_linear", "output_linear"} <= lin.keys():  # GraniteMoeHybridMLP (shared experts)
        input_linear = lin["input_linear"]

        def fused(x: Tensor) -> Tuple[Tensor, Optional[Tensor]]:
            gate, up = input_linear(x).chunk(2, dim=-1)
            return gate, up

        return MLPParts(fused, act, lin["output_linear"], {k: lin[k] for k in ("input_linear", "output_linear")})
    adapters = getattr(module, "gate_up_proj_adapter_list", None)
    layer_index: Dict[int, int] = getattr(module, "layer_dic", {})
    if {"gate_up_proj", "down_proj"} <= lin.keys() and isinstance(adapters, nn.ModuleList):  # Zamba2MLP
        gate_up_proj, lora = lin["gate_up_proj"], adapters

        def zamba2(x: Tensor, layer_idx: int = 0) -> Tuple[Tensor, Optional[Tensor]]:
            state = gate_up_proj(x) + lora[layer_index[layer_idx]](x)
            gate, up = torch.chunk(state, 2, dim=-1)
            return gate, up

        affine: Dict[str, nn.Module] = {"gate_up_proj": gate_up_proj, "down_proj": lin["down_proj"]}
        affine.update({f"gate_up_proj_adapter_list.{n}": m for n, m in lora.named_modules() if isinstance(m, nn.Linear)})
        return MLPParts(zamba2, act, lin["down_proj"], affine)
    if {"up_proj", "down_proj"} <= lin.keys() and "gate_proj" not in lin:  # NemotronHMLP
        up_only = lin["up_proj"]
        plain: Dict[str, nn.Module] = {k: lin[k] for k in ("up_proj", "down_proj")}
        return MLPParts(lambda x: (up_only(x), None), act, lin["down_proj"], plain, gated=False)
    return None


#: MLP classes whose forward was read and matches :func:`mlp_forward` on :func:`mlp_parts`
SUPPORTED_MLP = (
    "LlamaMLP",
    "Qwen3MLP",
    "Qwen3MoeMLP",
    "JambaMLP",
    "BambaMLP",
    "FalconH1MLP",
    "NemotronHMLP",
    "GraniteMoeHybridMLP",
    "Zamba2MLP",
)


class MLPAdapter(Adapter):
    """transformers MLPs (``SUPPORTED_MLP``): identity rule on the activation, half rule on the gate."""

    label = "transformers MLP (" + ", ".join(SUPPORTED_MLP) + ")"
    recomputed_whole = True

    def claims(self, module: nn.Module) -> bool:
        cls = type(module)
        return cls.__name__ in SUPPORTED_MLP and cls.__module__.startswith("transformers.") and mlp_parts(module) is not None

    def affine_parts(self, module: nn.Module) -> Dict[str, nn.Module]:
        parts = mlp_parts(module)
        return {} if parts is None else parts.affine

    def install(self, module: nn.Module, name: str, composite: Composite, patcher: Patcher, backend: str) -> List[Component]:
        parts = mlp_parts(module)
        assert parts is not None  # claimed
        act_rule = composite.rule_for(f"{name}.act", ACTIVATION, parts.act_module)
        components = [Component(f"{name}.act", ACTIVATION, act_rule)]
        gate_rule = act_rule  # unused without a product
        if parts.gated:
            gate_rule = composite.rule_for(f"{name}.gate", GATE)
            components.append(Component(f"{name}.gate", GATE, gate_rule))

        def forward(x: Tensor, *args, **kwargs) -> Tensor:
            if args:  # Zamba2MLP(hidden_state, layer_idx)
                kwargs = {"layer_idx": args[0], **kwargs}
            return mlp_forward(parts, act_rule, gate_rule, x, **kwargs)

        patcher.replace_forward(module, forward)
        return components


register(MLPAdapter())
