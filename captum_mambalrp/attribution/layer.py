"""``LayerMambaLRP``: MambaLRP relevance at any layer (block outputs, embeddings, ...)."""

from __future__ import annotations

import math
from typing import Any, Dict, Hashable, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from captum.attr import LayerGradientXActivation
from torch import Tensor, nn

from ..adapters.recompute import Recompute
from ..rules.composites import Composite, RuleLike
from .cuda_graphs import signature
from .engine import Capture, Selector, relevance_pass
from .inputs import ForwardCall
from .mamba_lrp import MambaLRPOptions
from .targets import TargetLike

LayerLike = Union[nn.Module, str, List[nn.Module], List[str], List[Union[nn.Module, str]]]


def _module_named(model: nn.Module, layer: Union[nn.Module, str]) -> Any:
    """``layer`` itself, or the submodule of ``model`` that a dotted name names
    (``"backbone.layers.0"``, as ``model.named_modules()`` lists them)."""
    if not isinstance(layer, str):
        return layer
    try:
        return model.get_submodule(layer)
    except AttributeError:
        names = [n for n, _ in model.named_modules() if n]
        shown = ", ".join(names[:6]) + (", ..." if len(names) > 6 else "")
        raise ValueError(
            f"layer {layer!r} names no module of the model; names are those of model.named_modules(): {shown}"
        ) from None


class LayerMambaLRP(MambaLRPOptions, LayerGradientXActivation):
    r"""MambaLRP relevance at the output (or input) of one or more layers.

    Relevance at a layer is its activation times the MambaLRP-modified gradient, so
    with bias-free models it sums to the explained logit at *every* block (relevance is
    conserved across depth). Several layers are read in the same single backward pass.

    It is a :class:`captum.attr.LayerGradientXActivation`, the Captum class
    ``LLMGradientAttribution`` accepts; the result has the layer's output shape
    (``[B, L, H]`` for a Mamba block), float32 (float64 for a float64 model), padded positions zero.

    The options and their checks are :class:`~captum_mambalrp.attribution.MambaLRP`'s
    (the same front end): ``composite``, ``rules``, ``backend``, ``embedding``,
    ``recompute`` and ``cuda_graph`` (on CUDA inputs, replay a recorded CUDA graph per
    input signature; ignored for CPU inputs). The model is installed once at
    construction (a dry run), so a model MambaLRP cannot explain fails there.

    Raises:
        TypeError, ValueError: at construction, a model that is not an ``nn.Module``, a
            layer that is not one of its modules, an unknown backend or composite, a rule
            key that matches nothing.
        UnsupportedModelError: at construction, a model with layers MambaLRP has no rule for.

    ``layer`` is a module of the model, its dotted name (``"backbone.layers.0"``), or a list of them.

    >>> lrp = LayerMambaLRP(model, model.backbone.layers[-1])  # doctest: +SKIP
    >>> lrp.attribute(input_ids, target=3).shape  # doctest: +SKIP
    torch.Size([1, 12, 768])
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
        embedding: Optional[nn.Embedding] = None,
        cuda_graph: bool = False,
    ) -> None:
        self._set_options(model, composite, rules, backend, embedding, recompute, cuda_graph)
        layers = [_module_named(model, m) for m in (layer if isinstance(layer, list) else [layer])]
        if not layers:
            raise ValueError("LayerMambaLRP needs at least one layer (a module of the model, or a list of them)")
        layer = layers if isinstance(layer, list) else layers[0]
        modules = set(map(id, model.modules()))
        for m in layers:
            if not isinstance(m, nn.Module) or id(m) not in modules:
                raise ValueError(
                    f"layer {type(m).__name__} is not a module of the model: pass modules of the model itself "
                    "(e.g. model.backbone.layers[0]), not copies"
                )
        LayerGradientXActivation.__init__(self, model, layer, device_ids, multiply_by_inputs=True)
        self._shapes: Dict[Hashable, List[Tuple[int, ...]]] = {}  # per graph signature: the layers' relevance shapes

    @property  # type: ignore[override]
    def explained_model(self) -> nn.Module:
        """The module run and explained: Captum's ``forward_func`` (the model, or the wrapper that
        a Captum class such as ``LLMGradientAttribution`` put in its place)."""
        model = self.__dict__.get("forward_func")
        if model is None:  # during construction, before Captum's __init__ has set it
            return self.__dict__["_explained_model"]
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"LayerMambaLRP needs an nn.Module as forward function (the model or a wrapper of it); got {type(model).__name__}"
            )
        return model

    @explained_model.setter
    def explained_model(self, model: nn.Module) -> None:
        self.__dict__["_explained_model"] = model
        if "forward_func" in self.__dict__:
            self.forward_func = model

    def has_convergence_delta(self) -> bool:
        return True

    def _may_trim_logits(self) -> bool:
        """The head at the explained position only, unless a layer read is the model itself or
        its output head."""
        model = self.explained_model
        get_head = getattr(model, "get_output_embeddings", None)
        head = get_head() if callable(get_head) else None
        layers = self.layer if isinstance(self.layer, list) else [self.layer]
        return not any(m is model or (head is not None and m is head) for m in layers)

    def attribute(  # type: ignore[override]
        self,
        inputs: Union[Tensor, tuple, None] = None,
        target: TargetLike = None,
        additional_forward_args: Any = None,
        attribute_to_layer_input: bool = False,
        return_convergence_delta: bool = False,
        verbose: bool = False,
        attention_mask: Optional[Tensor] = None,
        **forward_kwargs: Any,
    ):
        """Relevance at ``layer`` (a list of tensors for a list of layers), and the delta
        ``explained - sum(relevance)`` per example (per layer) when asked for.

        Inputs, ``target``, ``attention_mask`` and ``additional_forward_args`` are as in
        :meth:`MambaLRP.attribute <captum_mambalrp.attribution.MambaLRP.attribute>`.

        Returns:
            relevance with each layer's output (or input) shape, float32, padded positions
            zero; with ``return_convergence_delta`` also the delta ``[B]`` (a list for a list of layers).
        """
        call, inputs, _ = self._forward_call(inputs, additional_forward_args, attention_mask, forward_kwargs, False)
        layers = self.layer if isinstance(self.layer, list) else [self.layer]
        where = "input" if attribute_to_layer_input else "output"

        def run(c: ForwardCall, select: Selector) -> Tuple[List[Tensor], Tensor]:
            captures = [Capture(module=m, where=where) for m in layers]
            return relevance_pass(self.explained_model, self._install_for_call, c, select, captures, verbose)

        if self._use_graph(inputs):
            relevances, explained = self._through_graph(call, inputs, target, run)
        else:
            relevances, explained = self._relevance(call, inputs, target, run)
        out = relevances if isinstance(self.layer, list) else relevances[0]
        if not return_convergence_delta:
            return out
        deltas = [explained - r.reshape(r.shape[0], -1).sum(1) for r in relevances]
        return out, (deltas if isinstance(self.layer, list) else deltas[0])

    def _through_graph(self, call: ForwardCall, inputs: Tensor, target: TargetLike, run: Any) -> Tuple[List[Tensor], Tensor]:
        """The pass through the CUDA-graph cache, which records one relevance tensor: the
        layers' relevances flattened into one ``[B, N]`` tensor, split again afterwards."""
        key = signature(call)

        def packed(c: ForwardCall, select: Selector) -> Tuple[Tensor, Tensor]:
            relevances, explained = run(c, select)
            self._shapes[key] = [tuple(r.shape) for r in relevances]
            return pack(relevances), explained

        flat, explained = self._relevance(call, inputs, target, packed)
        return unpack(flat, self._shapes[key]), explained


def pack(tensors: Sequence[Tensor]) -> Tensor:
    """``[B, ...]`` tensors -> one ``[B, N]`` tensor (their entries side by side).

    >>> import torch
    >>> pack([torch.ones(2, 3), torch.zeros(2, 1, 2)]).shape
    torch.Size([2, 5])
    """
    return torch.cat([t.reshape(t.shape[0], -1) for t in tensors], dim=1)


def unpack(flat: Tensor, shapes: Sequence[Tuple[int, ...]]) -> List[Tensor]:
    """The inverse of :func:`pack` given the shapes.

    >>> import torch
    >>> [t.shape for t in unpack(torch.zeros(2, 5), [(2, 3), (2, 1, 2)])]
    [torch.Size([2, 3]), torch.Size([2, 1, 2])]
    """
    sizes = [1 if len(s) < 2 else math.prod(s[1:]) for s in shapes]
    return [part.reshape(s) for part, s in zip(flat.split(sizes, dim=1), shapes)]
