"""One registry of attribution methods, each a Captum ``Attribution`` returning token relevance.

Every method is a :class:`TokenAttribution`: ``attribute(input_ids [B, L], target [B],
attention_mask [B, L]) -> [B, L]`` (float32, padded positions 0), where ``target`` is the
explained class per example, read at the last real token. The plain-Captum baselines are
the real ``captum.attr`` classes run on :class:`~.scores.LastTokenScores`, configured as
they are used on language models:

- gradient methods on the token embeddings (``Saliency``: L2 norm of the gradient per
  token; ``InputXGradient``: sum over the hidden size; SmoothGrad: ``NoiseTunnel`` over
  ``Saliency``, the averaged gradient times the input minus the reference, summed);
- ``IntegratedGradients`` on the embeddings from the reference;
- perturbation methods over tokens (``FeatureAblation``: each token replaced by the
  reference; ``KernelShap`` with one feature per token), each example at its length.

The methods with a reference (:attr:`MethodSpec.reference`) take a zero embedding, the mean
embedding or a token's embedding (:class:`~.base.Reference`, :attr:`MethodOptions.reference`,
or per method the key ``name@ref``, e.g. ``integrated_gradients@mean``). The LRP variants
and hidden attention have none: LRP decomposes the output itself (its root point is
implicit in each rule), hidden attention reads the model's own mixing weights.

MambaLRP and its variants are :class:`~captum_mambalrp.MambaLRP` with a named composite.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, replace
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from captum.attr import (
    Attribution,
    FeatureAblation,
    InputXGradient,
    IntegratedGradients,
    KernelShap,
    NoiseTunnel,
    Saliency,
)
from torch import Tensor, nn

from ..attribution.mamba_lrp import MambaLRP, find_embedding
from .base import MethodOptions, Reference, TokenAttribution
from .hidden_attention import HiddenAttentionAttribution
from .least_squares import WeightedLeastSquares
from .scores import LastTokenScores

Reduce = Callable[[Tensor, Tensor, Tensor], Tensor]


def reduce_sum(attr: Tensor, x: Tensor, ref: Tensor) -> Tensor:
    """``sum_h a[b, t, h]``: for methods that already multiply by the input (minus the reference)."""
    return attr.sum(-1)


def reduce_norm(attr: Tensor, x: Tensor, ref: Tensor) -> Tensor:
    """``||a[b, t, :]||_2``: the usual token score of a saliency map."""
    return attr.norm(dim=-1)


def reduce_times_input(attr: Tensor, x: Tensor, ref: Tensor) -> Tensor:
    """``sum_h a[b, t, h] (x[b, t, h] - ref[b, t, h])``: a gradient map times the input minus
    the reference (the input itself for a zero reference)."""
    return (attr * (x - ref)).sum(-1)


def reduce_first(attr: Tensor, x: Tensor, ref: Tensor) -> Tensor:
    """``a[b, t, 0]``: perturbation methods give every hidden unit of a token the token's value."""
    return attr[..., 0]


class _OnModelDevice(nn.Module):
    """``scores`` called on host tensors: the inputs go to the model's device, the scores come
    back to the host (one copy each way per batch of perturbed inputs)."""

    def __init__(self, scores: nn.Module, device: torch.device) -> None:
        super().__init__()
        self.scores, self.device = scores, device

    def forward(self, x: Tensor, attention_mask: Optional[Tensor] = None) -> Tensor:
        mask = None if attention_mask is None else attention_mask.to(self.device)
        return self.scores(x.to(self.device), mask).cpu()


class OnEmbeddings(TokenAttribution):
    """A Captum method over the embeddings ``[B, L, H]``, reduced to one value per token.

    With a ``reference`` (:class:`~.base.Reference`), the reference input puts its embedding
    at every real token (padding keeps its own), is handed to Captum as ``baselines`` when
    ``baselines`` is set, and is given to ``reduce``. ``per_example`` runs each example alone
    at its real length with one feature per token (all hidden units of a token perturbed
    together), so no evaluation is spent on padding. ``host_sampling`` (perturbation methods):
    on an accelerator, Captum's per-sample work (drawing a coalition, its weight, building the
    perturbed input) runs on the host and only the batched forward on the device. Captum's
    KernelShap otherwise synchronises the device at every coalition (``.item()`` on a device
    tensor); the samples and the result are the same.
    """

    #: the host's device type (a test sets another to take the host path on the CPU)
    host = "cpu"

    def __init__(
        self,
        model: nn.Module,
        make: Callable[[nn.Module], Attribution],
        reduce: Reduce,
        reference: Optional[Reference] = None,
        baselines: bool = False,
        per_example: bool = False,
        host_sampling: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(model)
        self.scores = LastTokenScores(model)
        self.make = make
        self.method = make(self.scores)
        self.reduce = reduce
        self.reference = reference
        self.baselines = baselines
        self.per_example = per_example
        self.host_sampling = host_sampling
        self.kwargs = kwargs
        self._host_methods: Dict[torch.device, Attribution] = {}

    @property
    def reference_name(self) -> str:
        return "none" if self.reference is None else self.reference.name

    def _attribute(self, inputs: Tensor, target: Tensor, mask: Tensor) -> Tensor:
        x = self.embedding(inputs).detach()
        if self.reference is None:
            ref = torch.zeros_like(x)
        else:
            ref = torch.where(mask.bool()[..., None], self.reference.vector(self.embedding).to(x), x)
        if not self.per_example:
            return self.reduce(self._run(x, ref, target, mask, {}), x, ref)
        out = torch.zeros(inputs.shape, dtype=torch.float32, device=inputs.device)
        for i in range(inputs.shape[0]):
            real = mask[i].bool().nonzero().flatten()
            xi, ri, mi = x[i : i + 1, real], ref[i : i + 1, real], mask[i : i + 1, real]
            features = torch.arange(len(real), device=inputs.device)[None, :, None].expand_as(xi)
            attr = self._run(xi, ri, target[i : i + 1], mi, {"feature_mask": features})
            out[i, real] = self.reduce(attr, xi, ri)[0].float()
        return out

    def _run(self, x: Tensor, ref: Tensor, target: Tensor, mask: Tensor, extra: Dict[str, Any]) -> Tensor:
        if self.baselines:
            extra = {**extra, "baselines": ref}
        method, device = self.method, x.device
        if self.host_sampling and device.type != self.host:
            if device not in self._host_methods:
                self._host_methods[device] = self.make(_OnModelDevice(self.scores, device))
            method = self._host_methods[device]
            x, target, mask = x.cpu(), target.cpu(), mask.cpu()
            extra = {k: v.cpu() if isinstance(v, Tensor) else v for k, v in extra.items()}
        with warnings.catch_warnings():  # Captum notes that it set requires_grad itself
            warnings.filterwarnings("ignore", message="Input Tensor .* did not already require gradients")
            attr = method.attribute(x, target=target, additional_forward_args=(mask,), **self.kwargs, **extra)
        return attr.to(device)


class LRPMethod(TokenAttribution):
    """:class:`~captum_mambalrp.MambaLRP` with a named composite (``"mambalrp"``, ``"gradient"``,
    ``"ln_only"``, ``"no_<kind>_rule"``): one forward and one backward pass."""

    def __init__(self, model: nn.Module, composite: str = "mambalrp") -> None:
        super().__init__(model)
        self.lrp = MambaLRP(model, composite=composite)

    def _attribute(self, inputs: Tensor, target: Tensor, mask: Tensor) -> Tensor:
        return self.lrp.attribute(inputs, target=target.tolist(), attention_mask=mask)


class RandomAttribution(TokenAttribution):
    """Uniform random relevance (torch's global generator): the control every method must beat."""

    def _attribute(self, inputs: Tensor, target: Tensor, mask: Tensor) -> Tensor:
        return torch.rand(inputs.shape, device=inputs.device)


@dataclass(frozen=True)
class MethodSpec:
    """A registered method: key, display label, family, and how to build it."""

    name: str
    label: str
    family: str
    build: Callable[[nn.Module, MethodOptions], TokenAttribution]
    description: str = ""
    #: the method's usual reference (``"token"``, ``"zero"``, ...) if it takes one, else None
    reference: Optional[str] = None


METHODS: Dict[str, MethodSpec] = {}


def register_method(spec: MethodSpec) -> MethodSpec:
    """Add a method to :data:`METHODS` (its name must be new)."""
    if spec.name in METHODS:
        raise ValueError(f"method {spec.name!r} is already registered")
    METHODS[spec.name] = spec
    return spec


def _embedding_range(model: nn.Module) -> float:
    embedding = find_embedding(model)
    if embedding is None:
        raise ValueError("cannot find the model's token embedding (get_input_embeddings())")
    weight = embedding.weight.detach()
    return float(weight.max() - weight.min())


def _lrp(composite: str) -> Callable[[nn.Module, MethodOptions], TokenAttribution]:
    return lambda model, opts: LRPMethod(model, composite)


def _hidden_attention(
    gradient_weighted: bool, implicit: bool = False, mamba_attr: bool = False
) -> Callable[[nn.Module, MethodOptions], TokenAttribution]:
    def build(model: nn.Module, opts: MethodOptions) -> TokenAttribution:
        return HiddenAttentionAttribution(model, gradient_weighted, opts.chunk_channels, implicit, mamba_attr)

    return build


def _kernel_shap(model: nn.Module, opts: MethodOptions) -> TokenAttribution:
    def make(scores: nn.Module) -> Attribution:
        method = KernelShap(scores)
        method.interpretable_model = WeightedLeastSquares()  # exact fit; no scikit-learn needed
        return method

    return OnEmbeddings(
        model,
        make,
        reduce_first,
        opts.reference_for("token"),
        baselines=True,
        per_example=True,
        host_sampling=True,
        n_samples=opts.kernelshap_samples,
        perturbations_per_eval=opts.perturbations_per_eval,
    )


for _spec in [
    MethodSpec("mambalrp", "MambaLRP", "lrp", _lrp("mambalrp"), "MambaLRP (all rules of the paper)"),
    MethodSpec("gxi", "Gradient x Input", "lrp", _lrp("gradient"), "MambaLRP engine with plain gradients everywhere"),
    MethodSpec("lrp_ln", "LRP (LN-rule)", "lrp", _lrp("ln_only"), "only the norm rule (the paper's LN-rule baseline)"),
    MethodSpec(
        "mambalrp_cp",
        "MambaLRP (CP-LRP attention)",
        "lrp",
        _lrp("conservative"),
        "MambaLRP with the attention weights constant (CP-LRP; conserves); as mambalrp on models without attention",
    ),
    *[
        MethodSpec(
            f"no_{kind}_rule",
            f"MambaLRP w/o {kind} rule",
            "ablation",
            _lrp(f"no_{kind}_rule"),
            f"MambaLRP with the {kind} rule replaced by the gradient",
        )
        for kind in ("activation", "ssm", "gate", "norm")
    ],
    *[
        MethodSpec(
            f"no_ssm_rule_{piece.lower()}",
            f"MambaLRP, {piece} not constant",
            "ablation",
            _lrp(f"no_ssm_rule_{piece.lower()}"),
            f"MambaLRP with the SSM's {piece} in the gradient (the other scan parameters constant)",
        )
        for piece in ("delta", "B", "C")
    ],
    MethodSpec(
        "saliency",
        "Saliency",
        "gradient",
        lambda m, o: OnEmbeddings(m, Saliency, reduce_norm, abs=True),
        "captum Saliency on the embeddings; L2 norm per token",
    ),
    MethodSpec(
        "input_x_gradient",
        "InputXGradient (Captum)",
        "gradient",
        lambda m, o: OnEmbeddings(m, InputXGradient, reduce_sum),
        "captum InputXGradient on the embeddings; sum per token",
    ),
    MethodSpec(
        "integrated_gradients",
        "Integrated Gradients",
        "gradient",
        lambda m, o: OnEmbeddings(
            m,
            IntegratedGradients,
            reduce_sum,
            o.reference_for("token"),
            baselines=True,
            n_steps=o.ig_steps,
            internal_batch_size=o.ig_internal_batch_size,
        ),
        "captum IntegratedGradients on the embeddings from the reference (default: the reference token)",
        reference="token",
    ),
    MethodSpec(
        "smoothgrad",
        "SmoothGrad",
        "gradient",
        lambda m, o: OnEmbeddings(
            m,
            lambda s: NoiseTunnel(Saliency(s)),
            reduce_times_input,
            o.reference_for("zero"),
            nt_type="smoothgrad",
            nt_samples=o.smoothgrad_samples,
            nt_samples_batch_size=o.smoothgrad_samples_per_pass,
            stdevs=o.smoothgrad_noise * _embedding_range(m),
            abs=False,
        ),
        "captum NoiseTunnel(Saliency), averaged gradient x (input - reference; default zero)",
        reference="zero",
    ),
    MethodSpec(
        "feature_ablation",
        "Occlusion (FeatureAblation)",
        "perturbation",
        lambda m, o: OnEmbeddings(
            m,
            FeatureAblation,
            reduce_first,
            o.reference_for("token"),
            baselines=True,
            per_example=True,
            host_sampling=True,
            perturbations_per_eval=o.perturbations_per_eval,
        ),
        "captum FeatureAblation, each token replaced by the reference (default: the reference token)",
        reference="token",
    ),
    MethodSpec(
        "kernelshap",
        "KernelShap",
        "perturbation",
        _kernel_shap,
        "captum KernelShap, one feature per token, the reference as baseline (default: the reference token)",
        reference="token",
    ),
    MethodSpec(
        "attn_rollout",
        "Attention Rollout (hidden attn.)",
        "attention",
        _hidden_attention(False),
        "rollout of Mamba's hidden attention (Ali et al. 2024)",
    ),
    MethodSpec(
        "mamba_attr",
        "Mamba-Attr",
        "attention",
        _hidden_attention(True, mamba_attr=True),
        "Mamba-Attr as Ali et al.'s code computes it: positive hidden attention weighted by the stream "
        "gradient per source token, rolled out over the last 3/8 of the layers (Ali et al. 2024)",
    ),
    MethodSpec(
        "gw_rollout",
        "Gradient-weighted rollout",
        "attention",
        _hidden_attention(True),
        "rollout over all layers of mean_d (grad_alpha * alpha)^+, the exact gradient at the hidden attention "
        "(this package's earlier Mamba-Attr; `mamba_attr` now follows Ali et al.'s code)",
    ),
    MethodSpec(
        "implicit_attn",
        "Implicit attention rollout",
        "attention",
        _hidden_attention(False, implicit=True),
        "rollout of the implicit attention, gate, SiLU and conv folded in (Zimerman et al. 2025); Mamba1 and Mamba2",
    ),
    MethodSpec(
        "implicit_attr",
        "Implicit attention (grad.)",
        "attention",
        _hidden_attention(True, implicit=True),
        "gradient-weighted rollout of the implicit attention (Zimerman et al. 2025); Mamba1 and Mamba2",
    ),
    MethodSpec("random", "Random", "control", lambda m, o: RandomAttribution(m), "uniform random relevance"),
]:
    register_method(_spec)

GROUPS: Dict[str, List[str]] = {
    "lrp": ["mambalrp", "gxi", "lrp_ln"],
    "ablations": [f"no_{k}_rule" for k in ("activation", "ssm", "gate", "norm")],
    "captum": ["saliency", "input_x_gradient", "integrated_gradients", "smoothgrad", "feature_ablation", "kernelshap"],
    "attention": ["attn_rollout", "mamba_attr", "gw_rollout", "implicit_attn", "implicit_attr"],
}


def split_variant(key: str) -> Tuple[str, Optional[str]]:
    """``"integrated_gradients@zero"`` -> ``("integrated_gradients", "zero")``; no ``@``: ``(key, None)``."""
    name, sep, ref = key.partition("@")
    return name, (ref if sep else None)


def method_label(key: str) -> str:
    """Display label of a method key (with its reference for a ``name@ref`` variant)."""
    name, ref = split_variant(key)
    label = METHODS[name].label if name in METHODS else name
    return label if ref is None else f"{label} (ref. {ref})"


def _check_key(key: str) -> None:
    name, ref = split_variant(key)
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose among {sorted(METHODS)} or groups {sorted(GROUPS)}")
    if ref is not None:
        if METHODS[name].reference is None:
            with_ref = sorted(k for k, spec in METHODS.items() if spec.reference)
            raise ValueError(f"method {name!r} takes no reference ({key!r}); methods with one: {with_ref}")
        Reference.parse(ref)


def resolve_methods(names: Union[str, Sequence[str]]) -> List[str]:
    """Method keys from ``"all"``, group names (:data:`GROUPS`), keys, or a comma list of them.
    A key ``name@ref`` (``ref`` one of ``zero``, ``mean``, ``token:ID``) is the method with that
    reference (only for methods that take one).

    Returns:
        The keys, each once, in order.

    Raises:
        ValueError: an unknown method or group, or a reference on a method without one.

    >>> resolve_methods("lrp,integrated_gradients@zero")
    ['mambalrp', 'gxi', 'lrp_ln', 'integrated_gradients@zero']
    """
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    out: List[str] = []
    for name in names:
        expanded = list(METHODS) if name == "all" else GROUPS.get(name, [name])
        for key in expanded:
            _check_key(key)
            if key not in out:
                out.append(key)
    return out


def build_method(name: str, model: nn.Module, options: Optional[MethodOptions] = None) -> TokenAttribution:
    """An instance of the registered method ``name`` (or ``name@ref``) for ``model``.

    Raises:
        ValueError: an unknown method, or a reference on a method without one.
    """
    _check_key(name)
    key, ref = split_variant(name)
    options = options or MethodOptions()
    if ref is not None:
        options = replace(options, reference=ref)
    return METHODS[key].build(model, options)


def reference_of(method: TokenAttribution) -> str:
    """The reference a built method uses (``"zero"``, ``"mean"``, ``"token:ID"``), or ``"none"``."""
    return getattr(method, "reference_name", "none")
