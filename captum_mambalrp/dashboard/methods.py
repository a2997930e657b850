"""The methods the dashboard shows next to MambaLRP: those of the evaluation registry
(:mod:`captum_mambalrp.evaluation.methods`), configured as in the studies."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

import torch
from torch import Tensor, nn

from ..evaluation.methods import METHODS, MethodOptions, TokenAttribution, build_method

#: Captum's Gradient x Input, Integrated Gradients on the embedding layer, and occlusion of tokens
DEFAULT_METHODS = ("input_x_gradient", "integrated_gradients", "feature_ablation")
ALWAYS = "mambalrp"  # shown first, always


@dataclass(frozen=True)
class Method:
    """A method to pick: registry key, display name, what it does."""

    key: str
    name: str
    description: str


def comparison_methods() -> Dict[str, Method]:
    """The registry's methods other than MambaLRP itself, by key."""
    return {k: Method(k, s.label, s.description) for k, s in METHODS.items() if k != ALWAYS}


class MethodRunner:
    """Builds each method once for a model and explains one example with it."""

    def __init__(self, model: nn.Module, options: Optional[MethodOptions] = None) -> None:
        self.model = model
        self.options = options or MethodOptions()
        self._built: Dict[str, TokenAttribution] = {}

    def relevance(self, key: str, ids: Tensor, target: int) -> Tensor:
        """Token relevance ``[L]`` of ``ids [1, L]`` for class ``target`` at the last token."""
        if key not in self._built:
            self._built[key] = build_method(key, self.model, self.options)
        return self._built[key].attribute(ids, target=torch.tensor([target], device=ids.device))[0]
