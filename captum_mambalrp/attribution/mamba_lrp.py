"""``MambaLRP``: Captum's LRP for Mamba models, in one forward and one backward pass."""

from __future__ import annotations

import os
from dataclasses import replace
from typing import Any, Callable, Dict, Hashable, Mapping, Optional, Tuple, TypeVar, Union, cast

import torch
from captum.attr import LRP
from captum.log import log_usage
from torch import Tensor, nn

from ..adapters import Installation, Patcher, install_rules
from ..adapters.recompute import Recompute, RecomputePlan, check_recompute, plan_for
from ..rules.composites import Composite, RuleLike
from ..rules.composites import composite as make_composite
from ..scan import BACKENDS
from .batching import bounds, call_part, joined, target_part
from .cuda_graphs import GraphCache
from .engine import Capture, Selector, relevance_pass
from .inputs import ForwardCall, build_call, check_inputs, inputs_from_keywords, last_logits_only
from .targets import TargetLike, TargetSelector, resolve_class_names

R = TypeVar("R")  # what a pass returns as relevance: one tensor, or one per layer


def find_embedding(model: nn.Module) -> Optional[nn.Embedding]:
    """The token embedding: ``model.get_input_embeddings()`` or the only ``nn.Embedding``."""
    getter = getattr(model, "get_input_embeddings", None)
    if callable(getter):
        try:
            emb = getter()
        except (NotImplementedError, AttributeError):
            emb = None
        if isinstance(emb, nn.Embedding):
            return emb
    found = [m for m in model.modules() if isinstance(m, nn.Embedding)]
    return found[0] if len(found) == 1 else None


def install_checked(
    model: nn.Module, composite: Composite, backend: str, patcher: Patcher, recompute: Recompute = False
) -> Installation:
    """Install the rules; undo everything and re-raise on an unsupported model or a
    rule key that matches nothing (the install reports the keys it used; the composite
    keeps no state between calls)."""
    try:
        inst = install_rules(model, composite, backend, patcher, recompute)
        composite.check_overrides_used(inst.matched_keys, [c.name for c in inst.components])
    except BaseException:
        patcher.restore()
        raise
    return inst


class MambaLRPOptions:
    """The front end :class:`MambaLRP` and :class:`~captum_mambalrp.attribution.LayerMambaLRP`
    share: their options, checked once at construction (model, composite and rule keys,
    backend, recompute, embedding, cuda_graph, and a dry-run install that refuses a model
    MambaLRP cannot explain), the checks of ``attribute``'s inputs, the forward call, and
    the choice between an eager pass and a CUDA graph's replay."""

    composite: Composite
    backend: str
    recompute: Recompute
    embedding: Optional[nn.Embedding]
    cuda_graph: bool
    cuda_graphs: GraphCache
    last_installation: Optional[Installation]
    explained_model: nn.Module

    def _set_options(
        self,
        model: nn.Module,
        composite: Union[str, Composite, Mapping[str, RuleLike]],
        rules: Optional[Mapping[str, RuleLike]],
        backend: str,
        embedding: Optional[nn.Embedding],
        recompute: Recompute,
        cuda_graph: bool,
    ) -> None:
        """Check and keep the options; install the rules once and undo them (fails early on
        models MambaLRP cannot explain and on misspelt rule keys)."""
        who = type(self).__name__
        if not isinstance(model, nn.Module):
            raise TypeError(f"{who} needs an nn.Module (the model, or a module that calls it); got {type(model).__name__}")
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
        if not isinstance(cuda_graph, bool):
            raise TypeError(f"cuda_graph must be True or False; got {cuda_graph!r}")
        if embedding is not None:
            if not isinstance(embedding, nn.Embedding):
                raise TypeError(
                    f"embedding must be the model's token embedding (an nn.Embedding); got {type(embedding).__name__}"
                )
            if not any(m is embedding for m in model.modules()):
                raise ValueError("embedding is not a module of the model: pass the nn.Embedding the model's forward uses")
        self.explained_model = model
        self.composite = make_composite(composite, rules)
        self.backend = backend
        self.recompute = check_recompute(recompute)
        self.embedding = embedding if embedding is not None else find_embedding(model)
        self.cuda_graph = cuda_graph
        self.cuda_graphs = GraphCache()
        self.last_installation = None
        self._batch_plan: Optional[RecomputePlan] = None  # the plan that sizes parts of a batch (made on first use)
        self._install(Patcher()).patcher.restore()

    def _install(self, patcher: Patcher) -> Installation:
        return install_checked(self.explained_model, self.composite, self.backend, patcher, self.recompute)

    def _install_for_call(self, patcher: Patcher) -> Installation:
        self.last_installation = self._install(patcher)
        return self.last_installation

    def _forward_call(
        self,
        inputs: Union[Tensor, Tuple[Tensor, ...], None],
        additional_forward_args: Any,
        attention_mask: Optional[Tensor],
        forward_kwargs: Dict[str, Any],
        needs_embedding: bool,
    ) -> Tuple[ForwardCall, Tensor, bool]:
        """``(forward call, the input tensor, whether it came as a 1-tuple)``, after checking the
        inputs (token ids or embeddings) and the mask against the model."""
        inputs = inputs_from_keywords(inputs, forward_kwargs)
        is_tuple = isinstance(inputs, tuple)
        if is_tuple:
            if len(inputs) != 1:
                raise ValueError(
                    f"{type(self).__name__} explains one input tensor; pass token ids or embeddings, not a tuple of {len(inputs)}"
                )
            inputs = inputs[0]
        token_ids = check_inputs(inputs, self.embedding)  # type: ignore[arg-type]
        if needs_embedding and token_ids and self.embedding is None:
            raise ValueError(
                "cannot find the model's token embedding (no get_input_embeddings() and not exactly one "
                f"nn.Embedding): pass {type(self).__name__}(model, ..., embedding=...) or give embeddings as inputs"
            )
        call = build_call(self.explained_model, inputs, token_ids, additional_forward_args, attention_mask, forward_kwargs)  # type: ignore[arg-type]
        return call, inputs, is_tuple  # type: ignore[return-value]

    def _use_graph(self, inputs: Tensor) -> bool:
        """Replay a CUDA graph? (``cuda_graph=True`` and CUDA inputs; CPU inputs run eagerly.)"""
        return self.cuda_graph and inputs.is_cuda

    def _relevance(
        self, call: ForwardCall, inputs: Tensor, target: TargetLike, run: Callable[[ForwardCall, Selector], Tuple[R, Tensor]]
    ) -> Tuple[R, Tensor]:
        """``run(call, selector)``: eagerly, or through the CUDA-graph cache (``run`` then returns
        one relevance tensor)."""
        target = resolve_class_names(target, self.explained_model)  # class names -> indices, before the plan
        if self._may_trim_logits():
            call = last_logits_only(self.explained_model, call, target)
        if self._use_graph(inputs):
            return cast(Tuple[R, Tensor], self.cuda_graphs.relevance(call, target, cast(Any, run), self._graph_state()))
        batch = int(inputs.shape[0])
        size = self._part_size(call, inputs)
        if size < batch:  # in parts that keep every tensor (batching.py)
            results = []
            for start, end in bounds(batch, size):
                part = call_part(call, batch, start, end)
                results.append(run(part, TargetSelector(target_part(target, batch, start, end), part.target_mask)))
            return cast(Tuple[R, Tensor], joined(cast(Any, results)))
        return run(call, TargetSelector(target, call.target_mask))

    def _part_size(self, call: ForwardCall, inputs: Tensor) -> int:
        """How many sequences one pass takes (``recompute="auto"``, a batch of token ids or of
        embeddings ``[B, L, H]``): the whole batch when keeping every tensor fits it, or when not
        even one sequence fits (then the pass recomputes); else as many as fit
        (:meth:`~captum_mambalrp.adapters.recompute.RecomputePlan.kept_batch`)."""
        batch = int(inputs.shape[0])
        sequences = inputs.dim() == 2 if call.token_ids else inputs.dim() == 3
        if self.recompute != "auto" or batch < 2 or not sequences:
            return batch
        if self._batch_plan is None:
            inst = self._install(Patcher())
            try:
                model = self.explained_model
                self._batch_plan = plan_for(
                    model, inst.mixers, attention_names=inst.attention, layer_names=inst.recomputed_layers
                )
            finally:
                inst.patcher.restore()
        param = next((p for p in self.explained_model.parameters() if p.is_floating_point()), None)
        if param is None:
            return batch
        width = self.embedding.embedding_dim if call.token_ids and self.embedding is not None else int(inputs.shape[-1])
        kept = self._batch_plan.kept_batch(batch, int(inputs.shape[1]), width, param.dtype, inputs.device)
        return kept if kept > 0 else batch

    def _may_trim_logits(self) -> bool:
        """May the pass compute the output head at the explained position only
        (:func:`~captum_mambalrp.attribution.inputs.last_logits_only`)? Yes, unless relevance is read
        at the head or after it (``LayerMambaLRP``)."""
        return True

    def _graph_state(self) -> Hashable:
        """What recorded graphs depend on besides the call: train/eval mode, autocast, where
        each weight lives, each ``module.rule`` assigned and the package's ``CAPTUM_MAMBALRP_*``
        settings in the environment (backends, kernels, precision)."""
        model = self.explained_model
        rules = tuple((name, id(rule)) for name, m in model.named_modules() if (rule := getattr(m, "rule", None)) is not None)
        weights = tuple(t.data_ptr() for t in (*model.parameters(), *model.buffers()))
        settings = tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith("CAPTUM_MAMBALRP_")))
        return (model.training, _cuda_autocast(), weights, rules, settings)

    def clear_cuda_graphs(self) -> None:
        """Drop the recorded CUDA graphs and their memory (needed after changing the
        composite in place; weights moved or re-assigned are noticed on their own)."""
        self.cuda_graphs.clear()

    def rule_table(self) -> Dict[str, str]:
        """Component name -> rule, as installed for the last call (or a dry run).

        Returns:
            a dict from each component's qualified name to its rule's ``repr``.
        """
        if self.last_installation is None:
            inst = self._install(Patcher())
            inst.patcher.restore()
            self.last_installation = inst
        return {c.name: repr(c.rule) for c in self.last_installation.components}


class MambaLRP(MambaLRPOptions, LRP):
    r"""Layer-wise Relevance Propagation for Mamba models (Jafari et al., NeurIPS 2024).

    A :class:`captum.attr.LRP`: ``MambaLRP(model).attribute(inputs, target=...)``.
    While attributing, each Mamba mixer and norm of ``model`` computes its forward with
    MambaLRP's rules (see :mod:`captum_mambalrp.rules`), so one backward pass of the
    explained score yields relevance as *modified gradient x input* at the token
    embeddings. The model is restored afterwards, also when an error is raised.

    Args:
        model: a transformers or mamba-ssm Mamba, FalconMamba, Mamba2 or Mamba3 model, a hybrid
            (Jamba, Bamba, Zamba2, Granite 4.0-H, Nemotron-H, Falcon-H1), Vision Mamba, or any
            ``nn.Module`` containing their layers (for example a classifier head on top);
            ``captum_mambalrp.adapters.supported_layers()`` lists the layers.
        composite: a named rule set (``"mambalrp"`` default, ``"gradient"``, ``"ln_only"``,
            ``"no_ssm_rule"``, ...; see ``captum_mambalrp.rules.COMPOSITES``), a mapping
            kind -> rule, or a :class:`~captum_mambalrp.rules.Composite`.
        rules: overrides keyed by component name pattern (``"*.layers.0.mixer.ssm"``)
            or by kind (``"ssm"``, ``"gate"``, ``"activation"``, ``"norm"``, ``"linear"``,
            ``"conv"``). ``module.rule = ...`` on a module takes precedence over both.
        backend: the relevance scan: ``"auto"`` (CUDA: for Mamba1 mamba-ssm's kernel, else our
            Triton kernel; for Mamba2 in a float32 model the torch backend's chunked SSD, in a
            bf16/fp16 model mamba-ssm's SSD kernels when installed; CPU: torch;
            ``captum_mambalrp.scan.AUTO_ORDER``), ``"torch"``, ``"triton"`` or ``"mamba_ssm"``.
        recompute: recompute each mixer in the backward pass instead of keeping its
            intermediate tensors (``True``), keep them (``False``), recompute but keep each mixer's
            ``in_proj`` and ``out_proj`` outputs so that the recomputation skips both products
            (``"projection"``; in a hybrid also the recomputed attention, MLP and expert layers' products),
            recompute with the mixer inputs parked in pinned host memory (``"offload"``), run each mixer in pieces of the
            sequence with its state carried and recompute the blocks from sparse checkpoints
            (``"sequence"``, or ``SequenceChunks(chunk=..., stride=..., slots=..., host=...)``
            for its settings: the longest inputs), or ``"auto"``: chosen per pass from the memory
            the pass would need and the memory free (see :mod:`captum_mambalrp.adapters.recompute`
            for the estimate). Same relevance; memory per layer drops to the mixer's input
            (offloaded: none), for one more mixer forward (``"sequence"``: about three more).
        embedding: the token embedding module when the model has several.
        cuda_graph: on CUDA inputs, record each input signature's pass as a CUDA graph and
            replay it on later calls with that signature (same relevance; removes the launch
            overhead that dominates at a few thousand tokens; see
            :mod:`captum_mambalrp.attribution.cuda_graphs`). The first call per signature
            costs an eager pass plus the recording; each graph keeps one pass's memory.
            Ignored for CPU inputs.
    """

    def __init__(
        self,
        model: nn.Module,
        composite: Union[str, Composite, Mapping[str, RuleLike]] = "mambalrp",
        rules: Optional[Mapping[str, RuleLike]] = None,
        backend: str = "auto",
        embedding: Optional[nn.Embedding] = None,
        recompute: Recompute = "auto",
        cuda_graph: bool = False,
    ) -> None:
        self._set_options(model, composite, rules, backend, embedding, recompute, cuda_graph)
        LRP.__init__(self, model)

    def has_convergence_delta(self) -> bool:
        return True

    @property
    def multiplies_by_inputs(self) -> bool:
        return True

    @log_usage()
    def attribute(  # type: ignore[override]
        self,
        inputs: Union[Tensor, Tuple[Tensor], None] = None,
        target: TargetLike = None,
        additional_forward_args: Any = None,
        return_convergence_delta: bool = False,
        verbose: bool = False,
        attention_mask: Optional[Tensor] = None,
        **forward_kwargs: Any,
    ) -> Union[Tensor, Tuple[Tensor, Tensor], Tuple[Tensor, ...]]:
        r"""Relevance of each input token (or embedding entry) for the explained score.

        Args:
            inputs: token ids ``[B, L]`` (relevance ``[B, L]``, summed over the hidden
                size) or embeddings ``[B, L, H]`` (relevance ``[B, L, H]``). A 1-tuple of
                a tensor is accepted and gives a 1-tuple back, as in Captum. Or as the keyword
                ``input_ids=`` / ``inputs_embeds=``: ``attribute(**tokenizer(texts, return_tensors="pt"), target=...)``.
            target: which score to explain; see :mod:`captum_mambalrp.attribution.targets`.
                For ``[B, L, C]`` logits an int is that class at the last real token.
            additional_forward_args: passed to the model after ``inputs``, as in Captum.
            return_convergence_delta: also return ``explained score - sum(relevance)``
                per example (zero up to rounding when all biases are zero; otherwise the
                relevance absorbed by biases).
            verbose: print the rule applied to each component.
            attention_mask: ``[B, L]`` 0/1 mask (left or right padding); padded
                positions get zero relevance. May also come through
                ``additional_forward_args`` or be given in ``forward_kwargs``.
            **forward_kwargs: further keyword arguments for the model's forward.

        Returns:
            relevance in float32 (float64 for a float64 model), and the delta ``[B]`` when asked for.
        """
        call, inputs, is_tuple = self._forward_call(inputs, additional_forward_args, attention_mask, forward_kwargs, True)
        relevance, explained = self._relevance(call, inputs, target, lambda c, sel: self._pass(c, sel, verbose))
        out: Any = (relevance,) if is_tuple else relevance
        if return_convergence_delta:
            return out, explained - relevance.reshape(relevance.shape[0], -1).sum(dim=1)
        return out

    def _pass(self, call: ForwardCall, select: Selector, verbose: bool) -> Tuple[Tensor, Tensor]:
        """One forward and backward pass: relevance at the embeddings (summed over the
        hidden size for token ids) and the explained score per example."""
        if call.token_ids:
            capture = Capture(module=self.embedding)
        else:
            leaf = _input_of(call).detach().requires_grad_(True)
            capture = Capture(leaf=leaf)
            call = _with_input(call, leaf)
        (relevance,), explained = relevance_pass(self.model, self._install_for_call, call, select, [capture], verbose)
        if len(capture.tensors) != 1:
            raise RuntimeError("the token embedding ran more than once in one forward; MambaLRP needs it to run once")
        if call.token_ids:
            relevance = relevance.sum(dim=-1)
        return relevance, explained


def _cuda_autocast() -> bool:
    """Is CUDA autocast on? (``torch.is_autocast_enabled("cuda")``; before torch 2.4 the
    argument-less form, which meant CUDA.)"""
    try:
        return torch.is_autocast_enabled("cuda")
    except TypeError:
        return torch.is_autocast_enabled()


def _input_of(call: ForwardCall) -> Tensor:
    return call.kwargs["inputs_embeds"] if "inputs_embeds" in call.kwargs else call.args[0]


def _with_input(call: ForwardCall, x: Tensor) -> ForwardCall:
    if "inputs_embeds" in call.kwargs:
        return replace(call, kwargs={**call.kwargs, "inputs_embeds": x})
    return replace(call, args=(x, *call.args[1:]))
