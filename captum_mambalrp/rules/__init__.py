"""Rule objects (``PropagationRule`` subclasses) and the named rule sets (composites)."""

from .activation import IdentityActivationRule
from .base import ACTIVATION, CONV, GATE, KINDS, LINEAR, NORM, SSM, GradientRule, MambaRule
from .composites import COMPOSITES, Composite, as_mamba_rule, composite
from .gate import HalfGateRule
from .linear import EpsilonRule, GammaRule
from .norm import ConstantNormRule
from .ssm import ConstantSSMRule

__all__ = [
    "ACTIVATION",
    "CONV",
    "GATE",
    "KINDS",
    "LINEAR",
    "NORM",
    "SSM",
    "COMPOSITES",
    "Composite",
    "ConstantNormRule",
    "ConstantSSMRule",
    "EpsilonRule",
    "GammaRule",
    "GradientRule",
    "HalfGateRule",
    "IdentityActivationRule",
    "MambaRule",
    "as_mamba_rule",
    "composite",
]
