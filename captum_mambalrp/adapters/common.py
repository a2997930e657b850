"""What the concrete adapters share: the rule set of a Mamba mixer, its component list, and
the padding mask applied the way transformers applies it.

Adapters for one family (``hf_mamba``, ``mamba_ssm``, ``vim``, the hybrids) import these
from here, never from each other.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

from torch import Tensor, nn

from ..rules.base import ACTIVATION, GATE, SSM, MambaRule
from ..rules.composites import Composite
from .base import Component


@dataclass
class MixerRules:
    """The rules of one mixer's non-linear components and the scan backend to use."""

    conv_act: MambaRule
    gate_act: MambaRule
    ssm: MambaRule
    gate: MambaRule
    backend: str = "auto"


def mixer_rules(name: str, act_module: Optional[nn.Module], composite: Composite, backend: str) -> MixerRules:
    """Look up the rules of a Mamba mixer's SiLUs (``<name>.conv_act``, ``<name>.gate_act``),
    scan (``<name>.ssm``) and gate (``<name>.gate``).

    Returns:
        The :class:`MixerRules` the composite chooses for mixer ``name``.

    >>> from captum_mambalrp.rules.composites import composite
    >>> mixer_rules("layers.0.mixer", None, composite("mambalrp"), "torch").backend
    'torch'
    """
    return MixerRules(
        conv_act=composite.rule_for(f"{name}.conv_act", ACTIVATION, act_module),
        gate_act=composite.rule_for(f"{name}.gate_act", ACTIVATION, act_module),
        ssm=composite.rule_for(f"{name}.ssm", SSM),
        gate=composite.rule_for(f"{name}.gate", GATE),
        backend=backend,
    )


def rules_as_components(name: str, rules: MixerRules) -> List[Component]:
    """The components of mixer ``name`` (for ``verbose`` and the installation table).

    Returns:
        One :class:`Component` per rule of ``rules``, in the order the mixer applies them.
    """
    return [
        Component(f"{name}.conv_act", ACTIVATION, rules.conv_act),
        Component(f"{name}.ssm", SSM, rules.ssm),
        Component(f"{name}.gate_act", ACTIVATION, rules.gate_act),
        Component(f"{name}.gate", GATE, rules.gate),
    ]


def mask_padding(hidden: Tensor, attention_mask: Optional[Tensor]) -> Tensor:
    """Zero padded positions of ``[b, l, ...]`` (as transformers does before each step).

    Returns:
        ``hidden * attention_mask[:, :, None]`` in ``hidden``'s dtype, or ``hidden`` without a mask.

    >>> import torch
    >>> mask_padding(torch.ones(1, 3, 2), torch.tensor([[0, 1, 1]]))[0, :, 0].tolist()
    [0.0, 1.0, 1.0]
    """
    if attention_mask is None:
        return hidden
    return (hidden * attention_mask[:, :, None]).to(hidden.dtype)
