"""Composites: which rule each component of a model gets.

A :class:`Composite` holds one default rule per component kind and, optionally,
overrides keyed by component name patterns (``fnmatch``) or by kind. The precedence,
highest first, is

1. ``module.rule`` set on the module itself (the Captum way; for the SiLU components
   the rule of the mixer's ``act`` module);
2. overrides whose pattern matches the component's qualified name, e.g.
   ``"backbone.layers.0.mixer.ssm"`` or ``"*.gate"``;
3. overrides keyed by the component's kind, e.g. ``"ssm"``;
4. the composite's default for the kind.

Named composites (``COMPOSITES``): ``"mambalrp"`` (the paper; AttnLRP on attention layers),
``"conservative"`` (as ``"mambalrp"`` but CP-LRP on attention: attention weights constant, so
relevance is conserved exactly through transformers and hybrids), ``"mambalrp_reference"``
(identical to ``"mambalrp"`` but for the authors' 1e-6 stabiliser in the SiLU rule),
``"gradient"`` (plain Gradient x Input), ``"ln_only"`` (the paper's "LRP (LN-rule)" baseline)
and one ablation per rule, ``"no_<kind>_rule"`` (that kind back to the gradient).

A composite is stateless: :meth:`Composite.tracking` gives a per-installation view that
records which override keys chose a rule, and the install reports them
(``Installation.matched_keys``) for :meth:`Composite.check_overrides_used`.
"""

from __future__ import annotations

import fnmatch
from typing import Dict, Iterable, Mapping, Optional, Set, Tuple, Union

from captum.attr._utils.lrp_rules import EpsilonRule as CaptumEpsilonRule
from captum.attr._utils.lrp_rules import GammaRule as CaptumGammaRule
from captum.attr._utils.lrp_rules import IdentityRule as CaptumIdentityRule
from captum.attr._utils.lrp_rules import PropagationRule
from torch import nn

from .activation import IdentityActivationRule
from .attention import AttnLRPRule, ConstantAttentionRule
from .base import ACTIVATION, ATTENTION, CONV, GATE, KINDS, LINEAR, NORM, ROUTER, SSM, GradientRule, MambaRule
from .gate import HalfGateRule
from .linear import EpsilonRule, GammaRule
from .norm import ConstantNormRule
from .router import ConstantRouterRule
from .ssm import ConstantSSMRule

RuleLike = Union[MambaRule, PropagationRule]


def as_mamba_rule(rule: RuleLike, where: str = "") -> MambaRule:
    """This package's rule for ``rule``; Captum's Epsilon, Gamma and Identity rules map
    to :class:`EpsilonRule`, :class:`GammaRule` and :class:`IdentityActivationRule`."""
    if isinstance(rule, MambaRule):
        return rule
    if isinstance(rule, CaptumIdentityRule):
        return IdentityActivationRule()
    if isinstance(rule, CaptumGammaRule):
        return GammaRule(rule.gamma, rule.set_bias_to_zero)
    if isinstance(rule, CaptumEpsilonRule):
        return EpsilonRule(rule.STABILITY_FACTOR)
    at = f" for {where}" if where else ""
    raise TypeError(
        f"rule {rule!r}{at} is not supported by MambaLRP. Use a rule from "
        "captum_mambalrp.rules (EpsilonRule, GammaRule, IdentityActivationRule, "
        "ConstantSSMRule, HalfGateRule, ConstantNormRule, AttnLRPRule, ConstantAttentionRule, "
        "ConstantRouterRule, GradientRule) or Captum's "
        "EpsilonRule / GammaRule / IdentityRule."
    )


def _mambalrp() -> Dict[str, MambaRule]:
    return {
        ACTIVATION: IdentityActivationRule(),
        SSM: ConstantSSMRule(),
        GATE: HalfGateRule(),
        NORM: ConstantNormRule(),
        LINEAR: EpsilonRule(),
        CONV: EpsilonRule(),
        ATTENTION: AttnLRPRule(),
        ROUTER: ConstantRouterRule(),
    }


def _conservative() -> Dict[str, MambaRule]:
    """CP-LRP on attention (weights constant); every other kind as ``"mambalrp"``."""
    return {**_mambalrp(), ATTENTION: ConstantAttentionRule()}


def _gradient() -> Dict[str, MambaRule]:
    return {kind: GradientRule() for kind in KINDS}


def _ln_only() -> Dict[str, MambaRule]:
    return {**_gradient(), NORM: ConstantNormRule()}


def _without(kind: str) -> Dict[str, MambaRule]:
    return {**_mambalrp(), kind: GradientRule()}


def _reference() -> Dict[str, MambaRule]:
    """As the authors' code: SiLU through a 1e-6-stabilised division."""
    return {**_mambalrp(), ACTIVATION: IdentityActivationRule(epsilon=1e-6)}


COMPOSITES = {
    "mambalrp": _mambalrp,
    "conservative": _conservative,
    "mambalrp_reference": _reference,
    "gradient": _gradient,
    "ln_only": _ln_only,
    "no_activation_rule": lambda: _without(ACTIVATION),
    "no_ssm_rule": lambda: _without(SSM),
    "no_gate_rule": lambda: _without(GATE),
    "no_norm_rule": lambda: _without(NORM),
    "no_ssm_rule_delta": lambda: {**_mambalrp(), SSM: ConstantSSMRule(["B", "C"])},
    "no_ssm_rule_b": lambda: {**_mambalrp(), SSM: ConstantSSMRule(["delta", "C"])},
    "no_ssm_rule_c": lambda: {**_mambalrp(), SSM: ConstantSSMRule(["delta", "B"])},
    "no_attention_rule": lambda: _without(ATTENTION),
    "no_router_rule": lambda: _without(ROUTER),
}


class Composite:
    """Per-kind default rules plus name- or kind-keyed overrides (see module doc).

    ``defaults`` maps every kind in ``KINDS`` to a rule (``None``: the ``"mambalrp"`` set).
    The composite holds no state across calls: rule look-ups have no side effects.

    Raises:
        ValueError: ``defaults`` lacks a kind.
        TypeError: a rule is neither this package's nor Captum's Epsilon/Gamma/Identity rule.

    >>> Composite().rule_for("layers.0.mixer.ssm", "ssm")
    ConstantSSMRule()
    """

    def __init__(
        self,
        defaults: Optional[Mapping[str, RuleLike]] = None,
        overrides: Optional[Mapping[str, RuleLike]] = None,
    ) -> None:
        defaults = _mambalrp() if defaults is None else defaults
        missing = [k for k in KINDS if k not in defaults]
        if missing:
            raise ValueError(
                f"composite has no default rule for kinds {missing}: give one per kind in KINDS, or pass a partial "
                "mapping to captum_mambalrp.rules.composite(...), which fills the rest from 'mambalrp'"
            )
        self.defaults = {k: as_mamba_rule(r, k) for k, r in defaults.items()}
        self.overrides = {k: as_mamba_rule(r, k) for k, r in (overrides or {}).items()}

    def resolve(self, name: str, kind: str, module: Optional[nn.Module] = None) -> Tuple[MambaRule, Optional[str]]:
        """The rule of component ``name`` of kind ``kind`` and the override key that chose it
        (``None`` for ``module.rule`` or the default).

        Raises:
            TypeError: the chosen rule does not apply to ``kind``.
        """
        rule: Optional[MambaRule] = None
        key: Optional[str] = None
        own = getattr(module, "rule", None) if module is not None else None
        if own is not None:
            rule = as_mamba_rule(own, name)
        if rule is None:
            for pattern, candidate in self.overrides.items():
                if pattern not in KINDS and (pattern == name or fnmatch.fnmatchcase(name, pattern)):
                    rule, key = candidate, pattern
                    break
        if rule is None and kind in self.overrides:
            rule, key = self.overrides[kind], kind
        if rule is None:
            rule = self.defaults[kind]
        if not rule.supports(kind):
            raise TypeError(
                f"{type(rule).__name__} cannot be applied to {name!r} (a component of kind "
                f"{kind!r}); it applies to kinds {sorted(rule.kinds)}."
            )
        return rule, key

    def rule_for(self, name: str, kind: str, module: Optional[nn.Module] = None) -> MambaRule:
        """The rule of the component ``name`` of kind ``kind`` (``module`` carries ``.rule``).

        Returns:
            The rule by the precedence of the module doc.
        """
        return self.resolve(name, kind, module)[0]

    def tracking(self) -> TrackingComposite:
        """A view of this composite for one installation that records the override keys used."""
        return TrackingComposite(self)

    def check_overrides_used(self, matched: Iterable[str], names: Iterable[str]) -> None:
        """Raise if an override matched no component (``matched``: the keys an installation
        used, ``Installation.matched_keys``): almost always a typo.

        Raises:
            KeyError: naming the unused keys and examples of component names.
        """
        used = set(matched)
        unused = [k for k in self.overrides if k not in used]
        if unused:
            sample = ", ".join(sorted(names)[:6])
            raise KeyError(
                f"rule keys {unused} match no component of the model. Keys are kinds "
                f"{list(KINDS)} or fnmatch patterns over component names such as {sample}."
            )

    def describe(self) -> Dict[str, str]:
        out = {k: repr(r) for k, r in self.defaults.items()}
        out.update({k: repr(r) for k, r in self.overrides.items()})
        return out


class TrackingComposite(Composite):
    """The rules of a :class:`Composite` (shared, not copied) for one installation, recording
    in ``matched`` every override key that chose a rule."""

    def __init__(self, base: Composite) -> None:
        self.defaults = base.defaults
        self.overrides = base.overrides
        self.matched: Set[str] = set()

    def resolve(self, name: str, kind: str, module: Optional[nn.Module] = None) -> Tuple[MambaRule, Optional[str]]:
        rule, key = super().resolve(name, kind, module)
        if key is not None:
            self.matched.add(key)
        return rule, key

    def tracking(self) -> TrackingComposite:
        return self


def composite(
    name: Union[str, Composite, Mapping[str, RuleLike]] = "mambalrp",
    overrides: Optional[Mapping[str, RuleLike]] = None,
) -> Composite:
    """Build a :class:`Composite` from a name in ``COMPOSITES``, a per-kind mapping, or
    an existing composite, with optional overrides on top."""
    if isinstance(name, Composite):
        merged = {**name.overrides, **(overrides or {})}
        return Composite(name.defaults, merged)
    if isinstance(name, str):
        if name not in COMPOSITES:
            raise ValueError(f"unknown composite {name!r}; choose one of {sorted(COMPOSITES)}")
        return Composite(COMPOSITES[name](), overrides)
    return Composite({**_mambalrp(), **dict(name)}, overrides)
