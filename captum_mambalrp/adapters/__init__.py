"""Per-architecture adapters: which modules MambaLRP takes over and how."""

from . import (  # noqa: I001  (the mixers first, then transformers' attention, MLPs and mixtures of experts)
    hf_hybrids,  # noqa: F401  (the SSM mixers of transformers' hybrids: Jamba, Bamba, NemotronH, Granite, Zamba2, FalconH1)
    hf_mamba,  # noqa: F401  (registers the transformers Mamba1 adapter)
    hf_mamba2,  # noqa: F401  (transformers Mamba2)
    mamba3,  # noqa: F401  (mamba-ssm's Mamba3, SISO and MIMO)
    mamba_ssm,  # noqa: F401  (mamba-ssm's Mamba, Mamba2, Block, MixerModel)
    vim,  # noqa: F401  (Vision Mamba's bidirectional mixer)
)
from . import (  # noqa: I001  (transformers' attention, MLPs and mixtures of experts: after the mixers)
    attention,  # noqa: F401
    mlp,  # noqa: F401
    moe,  # noqa: F401
)
from .base import ADAPTERS, Adapter, Component, MixerAdapter, find_adapter, register
from .install import Installation, UnsupportedModelError, install_rules, supported_layers
from .patching import Patcher

__all__ = [
    "ADAPTERS",
    "Adapter",
    "Component",
    "Installation",
    "MixerAdapter",
    "Patcher",
    "UnsupportedModelError",
    "find_adapter",
    "install_rules",
    "register",
    "supported_layers",
]
