"""What an architecture adapter is, and the registry of them.

An adapter recognises one kind of sequence mixer (or block) and takes over its forward
computation, per instance and reversibly, so that MambaLRP's rules apply wherever the
original would call a fused kernel. It reports the components it created (for rule
look-up and ``verbose``) and names the submodules whose affine maps get the linear or
conv rule through forward hooks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Protocol

from torch import nn

from ..rules.base import MambaRule
from ..rules.composites import Composite
from .patching import Patcher


@dataclass
class Component:
    """One place a rule applies: qualified name, kind, and the rule chosen."""

    name: str
    kind: str
    rule: MambaRule


class MixerAdapter(Protocol):
    """Takes over one family of sequence mixers."""

    label: str
    #: True for block adapters (e.g. mamba-ssm's ``Block``): the block's forward is taken
    #: over, but its children (norm, mixer) are still walked and installed as usual.
    wraps_children: bool = False

    def claims(self, module: nn.Module) -> bool:
        """Is ``module`` a mixer this adapter handles?"""

    def affine_parts(self, module: nn.Module) -> Dict[str, nn.Module]:
        """Submodules (relative names) that carry relevance and get linear/conv rules."""

    def install(self, module: nn.Module, name: str, composite: Composite, patcher: Patcher, backend: str) -> List[Component]:
        """Replace ``module``'s forward by its MambaLRP forward; return its components."""


ADAPTERS: List[MixerAdapter] = []


def register(adapter: MixerAdapter) -> MixerAdapter:
    """Add an adapter to the registry (consulted in order of registration)."""
    ADAPTERS.append(adapter)
    return adapter


def find_adapter(module: nn.Module) -> MixerAdapter | None:
    for adapter in ADAPTERS:
        if adapter.claims(module):
            return adapter
    return None
