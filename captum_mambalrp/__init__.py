"""captum-mambalrp: MambaLRP (Jafari et al., NeurIPS 2024) as a Captum attribution method.

from captum_mambalrp import MambaLRP
relevance = MambaLRP(model).attribute(input_ids, target=label)
"""

from .adapters import UnsupportedModelError
from .adapters.recompute import SequenceChunks
from .attribution import LayerMambaLRP, MambaLRP
from .rules import (
    COMPOSITES,
    Composite,
    ConstantNormRule,
    ConstantSSMRule,
    EpsilonRule,
    GammaRule,
    GradientRule,
    HalfGateRule,
    IdentityActivationRule,
    composite,
)

__version__ = "0.1.0"

__all__ = [
    "COMPOSITES",
    "Composite",
    "ConstantNormRule",
    "ConstantSSMRule",
    "EpsilonRule",
    "GammaRule",
    "GradientRule",
    "HalfGateRule",
    "IdentityActivationRule",
    "LayerMambaLRP",
    "MambaLRP",
    "SequenceChunks",
    "UnsupportedModelError",
    "composite",
    "__version__",
]
