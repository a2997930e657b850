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
    """Takes over one family of sequence mixers (the protocol :func:`register` accepts).

    Every adapter declares ``label`` and ``wraps_children``; subclass :class:`Adapter` for
    the default ``wraps_children = False``.
    """

    label: str
    #: True for block adapters (e.g. mamba-ssm's ``Block``): the block's forward is taken
    #: over, but its children (norm, mixer) are still walked and installed as usual.
    wraps_children: bool
    #: an attention, MLP or expert layer recomputed whole with the mixers (optional; default False)
    recomputed_whole: bool

    def claims(self, module: nn.Module) -> bool:
        """Is ``module`` a mixer this adapter handles?"""

    def affine_parts(self, module: nn.Module) -> Dict[str, nn.Module]:
        """Submodules (relative names) that carry relevance and get linear/conv rules."""

    def install(self, module: nn.Module, name: str, composite: Composite, patcher: Patcher, backend: str) -> List[Component]:
        """Replace ``module``'s forward by its MambaLRP forward; return its components."""


class Adapter:
    """Base class of the package's adapters: the protocol's attributes with their defaults.

    A subclass sets ``label``, implements ``claims``, ``affine_parts`` and ``install``, and
    sets ``wraps_children = True`` only when it takes over a block whose children are still
    installed one by one.

    >>> class Mine(Adapter):
    ...     label = "my mixer"
    >>> Mine().wraps_children
    False
    """

    label: str = ""
    wraps_children: bool = False
    #: an attention, MLP or expert layer (no state): recomputed whole in the backward pass
    #: whenever the mixers are (``recompute`` not ``False``; :func:`.recompute.recomputing_layer`)
    recomputed_whole: bool = False

    def claims(self, module: nn.Module) -> bool:
        raise NotImplementedError

    def affine_parts(self, module: nn.Module) -> Dict[str, nn.Module]:
        raise NotImplementedError

    def install(self, module: nn.Module, name: str, composite: Composite, patcher: Patcher, backend: str) -> List[Component]:
        raise NotImplementedError


ADAPTERS: List[MixerAdapter] = []


def register(adapter: MixerAdapter) -> MixerAdapter:
    """Add an adapter to the registry (consulted in order of registration).

    Returns:
        ``adapter``.

    Raises:
        TypeError: ``adapter`` does not declare ``wraps_children`` (a bool) and ``label``.
    """
    if not isinstance(getattr(adapter, "wraps_children", None), bool) or not isinstance(getattr(adapter, "label", None), str):
        raise TypeError(
            f"adapter {type(adapter).__name__} must declare `label` (str) and `wraps_children` (bool): "
            "subclass captum_mambalrp.adapters.base.Adapter"
        )
    ADAPTERS.append(adapter)
    return adapter


def find_adapter(module: nn.Module) -> MixerAdapter | None:
    """The first registered adapter that claims ``module``, or ``None``."""
    for adapter in ADAPTERS:
        if adapter.claims(module):
            return adapter
    return None
