"""``LayerMambaLRP``: MambaLRP relevance at any layer (block outputs, embeddings, ...)."""

from __future__ import annotations

from typing import Any, List, Mapping, Optional, Union

from captum.attr import LayerGradientXActivation
from torch import Tensor, nn

from ..adapters import Installation, Patcher
from ..adapters.recompute import Recompute, check_recompute
from ..rules.composites import Composite, RuleLike
from ..rules.composites import composite as make_composite
from .engine import Capture, relevance_pass
from .inputs import build_call, check_inputs
from .mamba_lrp import find_embedding, install_checked
from .targets import TargetLike, TargetSelector

LayerLike = Union[nn.Module, List[nn.Module]]


class LayerMambaLRP(LayerGradientXActivation):
    r"""MambaLRP relevance at the output (or input) of one or more layers.

    Relevance at a layer is its activation times the MambaLRP-modified gradient, so
    with bias-free models it sums to the explained logit at *every* block (relevance is
    conserved across depth). Several layers are read in the same single backward pass.

    It is a :class:`captum.attr.LayerGradientXActivation`, the Captum class
    ``LLMGradientAttribution`` accepts; the result has the layer's output shape
    (``[B, L, H]`` for a Mamba block), float32, padded positions zero.
    """

    def __init__(
        self,
        model: nn.Module,
        layer: LayerLike,
        composite: Union[str, Composite, Mapping[str, RuleLike]] = "mambalrp",
        rules: Optional[Mapping[str, RuleLike]] = None,
        backend: str = "auto",
        device_ids: Optional[List[int]] = None,
        recompute: Recompute = "auto",
    ) -> None:
        LayerGradientXActivation.__init__(self, model, layer, device_ids, multiply_by_inputs=True)
        self.composite = make_composite(composite, rules)
        self.backend = backend
        self.recompute = check_recompute(recompute)

    def has_convergence_delta(self) -> bool:
        return True

    def _model(self) -> nn.Module:
        if not isinstance(self.forward_func, nn.Module):
            raise TypeError("LayerMambaLRP needs an nn.Module as forward function (the model or a wrapper of it)")
        return self.forward_func

    def attribute(  # type: ignore[override]
        self,
        inputs: Union[Tensor, tuple],
        target: TargetLike = None,
        additional_forward_args: Any = None,
        attribute_to_layer_input: bool = False,
        return_convergence_delta: bool = False,
        verbose: bool = False,
        attention_mask: Optional[Tensor] = None,
        **forward_kwargs: Any,
    ):
        """Relevance at ``layer`` (a list of tensors for a list of layers), and the delta
        ``explained - sum(relevance)`` per example (per layer) when asked for."""
        if isinstance(inputs, tuple):
            if len(inputs) != 1:
                raise ValueError("LayerMambaLRP explains one input tensor")
            inputs = inputs[0]
        model = self._model()
        token_ids = check_inputs(inputs, find_embedding(model))
        call = build_call(model, inputs, token_ids, additional_forward_args, attention_mask, forward_kwargs)
        layers = self.layer if isinstance(self.layer, list) else [self.layer]
        where = "input" if attribute_to_layer_input else "output"
        captures = [Capture(module=m, where=where) for m in layers]

        def install(patcher: Patcher) -> Installation:
            return install_checked(model, self.composite, self.backend, patcher, self.recompute)

        relevances, explained = relevance_pass(model, install, call, TargetSelector(target, call.mask), captures, verbose)
        out = relevances if isinstance(self.layer, list) else relevances[0]
        if not return_convergence_delta:
            return out
        deltas = [explained - r.reshape(r.shape[0], -1).sum(1) for r in relevances]
        return out, (deltas if isinstance(self.layer, list) else deltas[0])
