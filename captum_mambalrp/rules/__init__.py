"""Rule objects (``PropagationRule`` subclasses) and the named rule sets (composites)."""

from .activation import IdentityActivationRule
from .attention import AttnLRPRule, ConstantAttentionRule
from .base import ACTIVATION, ATTENTION, CONV, GATE, KINDS, LINEAR, NORM, ROUTER, SSM, GradientRule, MambaRule
from .composites import COMPOSITES, Composite, TrackingComposite, as_mamba_rule, composite
from .gate import HalfGateRule
from .linear import EpsilonRule, GammaRule
from .norm import ConstantNormRule
from .router import ConstantRouterRule
from .ssm import ConstantSSMRule

__all__ = [
    "ACTIVATION",
    "ATTENTION",
    "CONV",
    "GATE",
    "KINDS",
    "LINEAR",
    "NORM",
    "ROUTER",
    "SSM",
    "COMPOSITES",
    "AttnLRPRule",
    "Composite",
    "ConstantAttentionRule",
    "ConstantNormRule",
    "ConstantRouterRule",
    "ConstantSSMRule",
    "EpsilonRule",
    "GammaRule",
    "GradientRule",
    "HalfGateRule",
    "IdentityActivationRule",
    "MambaRule",
    "TrackingComposite",
    "as_mamba_rule",
    "composite",
]
