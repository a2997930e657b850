"""Adapter for transformers' ``MambaMixer`` and ``FalconMambaMixer``."""

from __future__ import annotations

from typing import Any, Dict, List

from torch import nn

from ..rules.composites import Composite
from .base import Adapter, Component, register
from .common import mixer_rules, rules_as_components
from .mamba1 import Mamba1State, hf_mamba1_parts, mamba1_forward, mamba1_piece
from .patching import Patcher


class HFMamba1Adapter(Adapter):
    label = "transformers Mamba / FalconMamba mixer"

    def claims(self, module: nn.Module) -> bool:
        cls = type(module)
        return cls.__name__ in ("MambaMixer", "FalconMambaMixer") and cls.__module__.startswith("transformers.")

    def affine_parts(self, module: Any) -> Dict[str, nn.Module]:
        return {"in_proj": module.in_proj, "conv1d": module.conv1d, "out_proj": module.out_proj}

    def install(self, module: Any, name: str, composite: Composite, patcher: Patcher, backend: str) -> List[Component]:
        parts = hf_mamba1_parts(module)
        rules = mixer_rules(name, module.act, composite, backend)

        def forward(hidden_states, *args, attention_mask=None, **kwargs):
            return mamba1_forward(parts, rules, hidden_states, attention_mask)

        def piece(hidden, attention_mask, state, carry):  # recompute="sequence": one piece of the sequence
            out, new = mamba1_piece(parts, rules, hidden, attention_mask, None if state is None else Mamba1State(*state), carry)
            return out, None if new is None else new.tensors()

        forward.sequence_piece = piece  # type: ignore[attr-defined]

        patcher.replace_forward(module, forward)
        return rules_as_components(name, rules)


register(HFMamba1Adapter())
