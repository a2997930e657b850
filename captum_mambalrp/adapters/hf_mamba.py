"""Adapter for transformers' ``MambaMixer`` and ``FalconMambaMixer``."""

from __future__ import annotations

from typing import Dict, List

from torch import nn

from ..rules.base import ACTIVATION, GATE, SSM
from ..rules.composites import Composite
from .base import Component, register
from .mamba1 import MixerRules, hf_mamba1_parts, mamba1_forward
from .patching import Patcher


def mixer_rules(name: str, act_module: nn.Module, composite: Composite, backend: str) -> MixerRules:
    """Look up the rules of a Mamba mixer's SiLUs, scan and gate (shared by adapters)."""
    return MixerRules(
        conv_act=composite.rule_for(f"{name}.conv_act", ACTIVATION, act_module),
        gate_act=composite.rule_for(f"{name}.gate_act", ACTIVATION, act_module),
        ssm=composite.rule_for(f"{name}.ssm", SSM),
        gate=composite.rule_for(f"{name}.gate", GATE),
        backend=backend,
    )


def rules_as_components(name: str, rules: MixerRules) -> List[Component]:
    return [
        Component(f"{name}.conv_act", ACTIVATION, rules.conv_act),
        Component(f"{name}.ssm", SSM, rules.ssm),
        Component(f"{name}.gate_act", ACTIVATION, rules.gate_act),
        Component(f"{name}.gate", GATE, rules.gate),
    ]


class HFMamba1Adapter:
    label = "transformers Mamba / FalconMamba mixer"

    def claims(self, module: nn.Module) -> bool:
        cls = type(module)
        return cls.__name__ in ("MambaMixer", "FalconMambaMixer") and cls.__module__.startswith("transformers.")

    def affine_parts(self, module: nn.Module) -> Dict[str, nn.Module]:
        return {"in_proj": module.in_proj, "conv1d": module.conv1d, "out_proj": module.out_proj}

    def install(self, module: nn.Module, name: str, composite: Composite, patcher: Patcher, backend: str) -> List[Component]:
        parts = hf_mamba1_parts(module)
        rules = mixer_rules(name, module.act, composite, backend)

        def forward(hidden_states, *args, attention_mask=None, **kwargs):
            return mamba1_forward(parts, rules, hidden_states, attention_mask)

        patcher.replace_forward(module, forward)
        return rules_as_components(name, rules)


register(HFMamba1Adapter())
