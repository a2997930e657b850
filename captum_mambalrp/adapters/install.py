"""Walk a model and put MambaLRP's rules in place (reversibly, through a Patcher)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import partial
from typing import Dict, List, Optional, Set, Tuple

import torch
from torch import nn

from ..kernels.dispatch import conv_forward, conv_output_dtype
from ..rules.activation import SILU_CLASSES
from ..rules.base import ACTIVATION, ATTENTION, CONV, LINEAR, NORM, SSM, GradientRule
from ..rules.composites import Composite
from .attention import SUPPORTED_ATTENTION
from .base import ADAPTERS, Component, find_adapter
from .norms import is_rmsnorm, norm_forward
from .patching import Patcher
from .recompute import Recompute, recomputing, recomputing_layer

ACTIVATION_MODULES = (nn.SiLU, nn.ReLU, nn.GELU, nn.Tanh, nn.Sigmoid, nn.Softplus, nn.LeakyReLU)
PASS_THROUGH = (nn.Embedding, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Identity, nn.Flatten)
# Container class names that signal a layer with no MambaLRP rules (hybrids, unknown mixers).
# (mamba-ssm's attention block is ``MHA``; a bare ``Mamba``/``Mamba2``/``Mamba3``/``Mamba2Simple``
# not claimed by an adapter is a mixer variant without rules, e.g. Vision Mamba's bidirectional fork.)
UNSUPPORTED = re.compile(r"(Attention|Attn|Mixer|MoE|Expert|DeltaNet|Mamba2?Layer|SSM|^MHA$|^Mamba\d*(Simple)?$)", re.IGNORECASE)
# transformers' MLP classes: most are gated (``act(gate(x)) * up(x)``), a product the hooks alone would
# give double relevance; only those an adapter claims (``adapters.mlp``) are accepted.
TRANSFORMERS_MLP = re.compile(r"(MLP|Mlp|FeedForward)$")
# Containers named after what they hold (``JambaAttentionDecoderLayer``, ``Qwen3MoeModel``): not
# refused by name; their children are checked one by one.
CONTAINERS = re.compile(r"(DecoderLayer|Model|For[A-Z]\w*)$")
# Leaf modules whose outputs are constants for relevance: rotary embeddings give ``cos``/``sin``
# from positions and fixed frequencies only (RoPE is then a linear map of ``q`` and ``k``).
CONSTANT_MODULES = re.compile(r"Rotary(Positional)?Embedding$")


class UnsupportedModelError(TypeError):
    """The model holds a layer that MambaLRP has no rule for."""


@dataclass
class Installation:
    """What was put in place: the components and their rules, and how to undo it."""

    patcher: Patcher
    components: List[Component] = field(default_factory=list)
    mixers: List[str] = field(default_factory=list)
    #: attention layers taken over (their attention runs ``adapters.attention.lrp_attention``)
    attention: List[str] = field(default_factory=list)
    #: attention, MLP and expert layers recomputed whole with the mixers (``recompute`` not False)
    recomputed_layers: List[str] = field(default_factory=list)
    #: the composite's override keys that chose a rule (for ``Composite.check_overrides_used``)
    matched_keys: Set[str] = field(default_factory=set)
    #: the modules whose computation the rules took over (mixers, norms, MLPs, ...): modules
    #: inside them may be computed from their weights without being called (:meth:`owner`)
    taken_over: Set[str] = field(default_factory=set)

    def owner(self, name: str) -> Optional[str]:
        """The taken-over module that module ``name`` lies strictly inside (``None``: none)."""
        parts = name.split(".")
        inside = (".".join(parts[:k]) for k in range(1, len(parts)) if ".".join(parts[:k]) in self.taken_over)
        return next(inside, "" if name and "" in self.taken_over else None)

    def table(self) -> str:
        width = max((len(c.name) for c in self.components), default=10)
        return "\n".join(f"{c.name:<{width}}  {c.kind:<10}  {c.rule!r}" for c in self.components)


def _hook_affine(
    module: nn.Module, name: str, kind: str, composite: Composite, inst: Installation, in_mixer: bool = False
) -> None:
    """Hook ``module``'s rule; ``in_mixer``: a part of a sequence mixer (its depthwise conv's output
    may then be kept in float32, ``kernels.dispatch.conv_output_dtype``)."""
    rule = composite.rule_for(name, kind, module)
    inst.components.append(Component(name, kind, rule))
    if kind == CONV and isinstance(module, nn.Conv1d) and module.groups == module.in_channels > 1:
        # a depthwise conv: its value by our kernel where one applies (kernels.dispatch.conv_forward)
        inst.patcher.replace_forward(module, conv_forward(module, inst.patcher.inner_forward(module), in_mixer))
    if isinstance(rule, GradientRule):
        return
    inst.patcher.add_handle(module.register_forward_hook(lambda m, args, out: rule.linear(m, args[0], out)))


def _in_proj(mixer: nn.Module) -> Optional[nn.Linear]:
    """The mixer's input projection (``in_proj``), whose output ``recompute="projection"`` keeps."""
    proj = getattr(mixer, "in_proj", None)
    return proj if isinstance(proj, nn.Linear) else None


def _out_proj(mixer: nn.Module) -> Optional[nn.Linear]:
    """The mixer's output projection (``out_proj``), whose output ``recompute="projection"`` keeps."""
    proj = getattr(mixer, "out_proj", None)
    return proj if isinstance(proj, nn.Linear) else None


def _hook_activation(module: nn.Module, name: str, composite: Composite, inst: Installation) -> None:
    rule = composite.rule_for(name, ACTIVATION, module)
    inst.components.append(Component(name, ACTIVATION, rule))
    inst.patcher.add_handle(module.register_forward_hook(lambda m, args, out: rule.activation(args[0], m.forward)))


def supported_layers() -> List[str]:
    """The layers MambaLRP takes over: each adapter's label (not the blocks that only wrap
    mixers) and the attention classes; docs/architectures.md describes each.

    >>> any("Mamba2" in label for label in supported_layers())
    True
    """
    return [a.label for a in ADAPTERS if not a.wraps_children] + [f"attention: {', '.join(SUPPORTED_ATTENTION)}"]


#: where an error about an unsupported model points for the list
SUPPORTED_HINT = "the supported layers: captum_mambalrp.adapters.supported_layers(), docs/architectures.md"


def _inside(name: str, roots: Set[str]) -> bool:
    """Is module ``name`` one of ``roots`` or inside one? (One look-up per ancestor.)"""
    parts = name.split(".")
    return any(".".join(parts[:k]) in roots for k in range(1, len(parts) + 1))


def _uncovered_layers(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    """Layers that look like attention or a mixer (``UNSUPPORTED``) outside the subtrees that an
    adapter takes over or that the user opted into plain gradient (``module.rule``)."""
    found: List[Tuple[str, nn.Module]] = []
    covered: Set[str] = set()
    for name, module in model.named_modules():
        if not name or _inside(name, covered):
            continue
        adapter = find_adapter(module)
        if (adapter is not None and not adapter.wraps_children) or getattr(module, "rule", None) is not None:
            covered.add(name)
        elif adapter is None and _looks_uncovered(module):
            found.append((name, module))
    return found


def _looks_uncovered(module: nn.Module) -> bool:
    """An attention layer, mixer or MoE by its class name (not a container, norm or constant
    module that merely mentions a family), or a transformers MLP no adapter claims."""
    cls = type(module)
    if UNSUPPORTED.search(cls.__name__) and not _has_rule_by_type(module):
        return True
    return cls.__module__.startswith("transformers.") and bool(TRANSFORMERS_MLP.search(cls.__name__))


def _has_rule_by_type(module: nn.Module) -> bool:
    """A container, norm or constant module whose class name merely mentions a family
    (``Qwen3MoeRMSNorm``, ``Qwen3MoeRotaryEmbedding``, ``Qwen3MoeModel``): installed as its type says."""
    cls = type(module).__name__
    return bool(CONTAINERS.search(cls) or CONSTANT_MODULES.search(cls)) or is_rmsnorm(module) or isinstance(module, nn.LayerNorm)


def _refuse_uncovered(found: List[Tuple[str, nn.Module]]) -> UnsupportedModelError:
    """The error for a model with layers MambaLRP has no rule for, naming one of each type."""
    first: Dict[str, str] = {}
    for name, module in found:
        first.setdefault(type(module).__name__, name)
    listing = ", ".join(f"{cls} (e.g. {name!r})" for cls, name in first.items())
    name, module = found[0]
    return _unsupported(
        name,
        module,
        f"this kind of layer (attention or an unknown mixer) is not covered; layer types without rules in this model: {listing}",
    )


def _unsupported(name: str, module: nn.Module, why: str) -> UnsupportedModelError:
    return UnsupportedModelError(
        f"MambaLRP has no rule for module {name!r} ({type(module).__name__}): {why}. If plain gradient "
        f"is acceptable there, set `module.rule = captum_mambalrp.rules.GradientRule()` on it (relevance is then "
        f"not conserved through it); {SUPPORTED_HINT}."
    )


def install_rules(
    model: nn.Module,
    composite: Composite,
    backend: str = "auto",
    patcher: Optional[Patcher] = None,
    recompute: Recompute = False,
    require_layer: bool = True,
) -> Installation:
    """Take over every supported mixer and norm of ``model`` and hook its affine layers
    (mixers recomputed in the backward pass as ``recompute`` says, see :mod:`.recompute`).

    ``composite`` is only read; the override keys that chose a rule are reported in
    ``Installation.matched_keys``.
    ``require_layer=False`` installs into a part of a model without a mixer or attention layer
    (an MLP or MoE block alone, e.g. to test its rules).

    Returns:
        The :class:`Installation` (undo it with ``inst.patcher.restore()``).

    Raises:
        UnsupportedModelError: the model has no layer MambaLRP takes over (no Mamba mixer and
            no attention layer), or a layer without a rule (an unknown mixer or attention class,
            an unknown module type), naming the module and its class; nothing is left installed.
    """
    conv_output_dtype(torch.float32)  # a bad CAPTUM_MAMBALRP_CONV_OUTPUT: its one-line error now
    uncovered = _uncovered_layers(model)
    if uncovered:  # name every layer type that has no rule (hybrids), before installing anything
        raise _refuse_uncovered(uncovered)
    inst = Installation(patcher or Patcher())
    tracked = composite.tracking()
    inst.matched_keys = tracked.matched
    composite = tracked
    done: Set[str] = inst.taken_over  # subtrees already handled

    for name, module in model.named_modules():
        if name and ("" in done or _inside(name, done)):
            continue
        adapter = find_adapter(module)
        if adapter is not None:
            installed = adapter.install(module, name, composite, inst.patcher, backend)
            inst.components += installed
            has_ssm = any(c.kind == SSM for c in installed)
            if any(c.kind == ATTENTION for c in installed):
                inst.attention.append(name)
            whole = getattr(adapter, "recomputed_whole", False) and not has_ssm
            if recompute is not False and whole and not _inside(name, set(inst.recomputed_layers)):
                # an attention layer, an MLP or experts: recomputed whole with the mixers
                attention = any(c.kind == ATTENTION for c in installed)
                wrap = partial(recomputing_layer, recompute=recompute, layer=module, attention=attention)
                inst.patcher.wrap_forward(module, wrap)
                inst.recomputed_layers.append(name)
            for part_name, part in adapter.affine_parts(module).items():
                kind = LINEAR if isinstance(part, nn.Linear) else CONV
                _hook_affine(part, f"{name}.{part_name}", kind, composite, inst, in_mixer=has_ssm)
            if adapter.wraps_children:
                continue  # a block taken over as a whole: its norm and mixer are installed as reached
            done.add(name)
            if not has_ssm:
                continue  # an MLP or a mixture of experts: taken over, not a sequence mixer
            if recompute is not False:
                keep = partial(recomputing, recompute=recompute, projection=_in_proj(module), output=_out_proj(module))
                inst.patcher.wrap_forward(module, keep)
            inst.mixers.append(name)
            continue
        own_rule = getattr(module, "rule", None)
        is_leaf = next(module.children(), None) is None
        if is_rmsnorm(module) or isinstance(module, nn.LayerNorm):
            rule = composite.rule_for(name, NORM, module)
            inst.components.append(Component(name, NORM, rule))
            inst.patcher.replace_forward(module, norm_forward(module, rule))
            done.add(name)
        elif isinstance(module, nn.Linear):
            _hook_affine(module, name, LINEAR, composite, inst)
        elif isinstance(module, (nn.Conv1d, nn.Conv2d)):
            _hook_affine(module, name, CONV, composite, inst)
        elif isinstance(module, ACTIVATION_MODULES) or type(module).__name__ in SILU_CLASSES:
            _hook_activation(module, name, composite, inst)
        elif isinstance(module, PASS_THROUGH) or (is_leaf and CONSTANT_MODULES.search(type(module).__name__)):
            pass
        elif own_rule is not None:
            if not isinstance(own_rule, GradientRule):
                raise _unsupported(name, module, f"its rule {own_rule!r} only fits other layer types; use GradientRule")
            inst.components.append(Component(name, "module", own_rule))
            done.add(name)
        elif is_leaf:
            raise _unsupported(name, module, "unknown layer type")
    if require_layer and not inst.mixers and not inst.attention:
        inst.patcher.restore()
        raise UnsupportedModelError(
            f"{type(model).__name__} contains no supported Mamba mixer or attention layer, so MambaLRP "
            f"cannot explain it; {SUPPORTED_HINT}."
        )
    return inst
