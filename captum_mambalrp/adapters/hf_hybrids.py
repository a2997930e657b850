"""The SSM mixers of transformers' hybrid models: Jamba (Mamba1), and Bamba, Nemotron-H,
Granite-4.0-H (``GraniteMoeHybrid``), Zamba2 and Falcon-H1 (Mamba2).

Each is the computation of :mod:`.mamba1` or :mod:`.mamba2` with the family's own attribute
names, so the adapters reuse :func:`.mamba1.mamba1_forward` / :func:`.mamba2.mamba2_forward`
(every scan backend, ``recompute``, CUDA graphs) and only say where the parts live:

- ``JambaMambaMixer``: Mamba1 with RMSNorms (with weights) on ``dt``, ``B`` and ``C`` after
  ``x_proj``. These feed only the scan's parameters, which the SSM rule holds constant; they
  are computed with their factor ``rsqrt(mean(.^2) + eps)`` through the ``norm`` rule (a
  constant under MambaLRP) so that composites without the SSM rule treat them as every other
  norm. The gate is ``y * silu(z)`` whatever ``hidden_act`` the conv uses.
- ``BambaMixer``, ``NemotronHMamba2Mixer``, ``GraniteMoeHybridMambaLayer``,
  ``Zamba2MambaMixer``: transformers' ``Mamba2Mixer`` computation (gated grouped RMSNorm
  ``w * norm_g(y * silu(z))``, ``dt`` clamped to ``time_step_limit``).
- ``FalconH1Mixer``: the same, with the muP multipliers as linear scalings of the input
  projection, ``in_proj(x * ssm_in_multiplier) * mup_vector`` (a constant per channel of
  ``z, x, B, C, dt``; relevance passes through a scaling unchanged), and its norm optional
  (``mamba_rms_norm``) and before or after the gate (``mamba_norm_before_gate``). The block's
  ``ssm_out_multiplier`` and ``attention_in/out_multiplier`` are scalings in the decoder
  layer, which autograd already treats linearly.

Padding: the mixers receive the family's 2-D padding mask (``attention_mask`` of the mixer
call, from ``create_recurrent_attention_mask``; Falcon-H1's ``mamba_attention_mask``) and
zero padded positions where transformers zeroes them. Decoding caches (``cache`` with a
state) and packed batches are refused: MambaLRP explains whole sequences.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch.nn.functional as F
from torch import Tensor, nn

from ..rules.base import NORM, MambaRule
from ..rules.composites import Composite
from .base import Adapter, Component, register
from .common import mixer_rules, rules_as_components
from .hf_mamba2 import hf_mamba2_parts, reject_packed
from .mamba1 import Mamba1State, hf_mamba1_parts, mamba1_forward, mamba1_piece
from .mamba2 import mamba2_forward, mamba2_piece, mamba2_rules
from .norms import norm_epsilon, rms_norm
from .patching import Patcher

#: transformers' Mamba2-family mixer classes of hybrid models: class name -> defining module
HF_MAMBA2_HYBRID_MIXERS: Dict[str, str] = {
    "BambaMixer": "transformers.models.bamba.modeling_bamba",
    "NemotronHMamba2Mixer": "transformers.models.nemotron_h.modeling_nemotron_h",
    "GraniteMoeHybridMambaLayer": "transformers.models.granitemoehybrid.modeling_granitemoehybrid",
    "Zamba2MambaMixer": "transformers.models.zamba2.modeling_zamba2",
    "FalconH1Mixer": "transformers.models.falcon_h1.modeling_falcon_h1",
}
JAMBA_MIXER = ("JambaMambaMixer", "transformers.models.jamba.modeling_jamba")


def _is_class(module: nn.Module, name: str, module_path: str) -> bool:
    cls = type(module)
    return cls.__name__ == name and cls.__module__ == module_path


def check_padding_mask(attention_mask: Optional[Tensor], where: str) -> Optional[Tensor]:
    """The 2-D ``[b, l]`` padding mask a hybrid's mixer takes, checked.

    Returns:
        ``attention_mask`` (``None`` stays ``None``).

    Raises:
        ValueError: a mask of another rank (a custom 4-D attention mask has no padding
        signal for the SSM: pass the 2-D 0/1 mask instead).

    >>> import torch
    >>> check_padding_mask(torch.ones(2, 5), "layers.0.mamba").shape
    torch.Size([2, 5])
    """
    if attention_mask is not None and attention_mask.dim() != 2:
        raise ValueError(
            f"{where}: the SSM mixer takes a 2-D [batch, length] padding mask, got shape {tuple(attention_mask.shape)}; "
            "pass the model a 0/1 attention_mask of shape [batch, length]"
        )
    return attention_mask


def piece_accepts(module: Any, where: str) -> Callable[[Dict[str, Any]], bool]:
    """Which calls of a hybrid's mixer may run in pieces of the sequence (``recompute="sequence"``):
    the layer's own keyword arguments pass through (the mixer reads only the mask); a filled cache
    and packed sequences are refused as the forward refuses them.

    Returns:
        ``accepts(kwargs) -> bool``.

    Raises:
        ValueError: (from ``accepts``) a filled cache or packed sequences.
    """

    def accepts(kwargs: Dict[str, Any]) -> bool:
        reject_packed(kwargs)
        reject_cache_state(kwargs.get("cache", kwargs.get("cache_params")), getattr(module, "layer_idx", None), where)
        return True

    return accepts


def reject_cache_state(cache: Any, layer_idx: Optional[int], where: str) -> None:
    """Refuse a decoding cache that already holds this mixer's state (a continuation, not a whole
    sequence). A fresh cache (``use_cache=True``) is accepted; the mixer leaves it unwritten.

    Raises:
        ValueError: ``cache`` holds a previous state for layer ``layer_idx``.
    """
    if cache is None:
        return
    has = getattr(cache, "has_previous_state", False)
    filled = has(layer_idx) if callable(has) and layer_idx is not None else has is True
    if filled:
        raise ValueError(f"{where}: MambaLRP explains whole sequences: call the model without a filled cache (use_cache=False)")


class HFJambaMixerAdapter(Adapter):
    """``JambaMambaMixer`` (Mamba1 with RMS-normed ``dt``, ``B``, ``C``)."""

    label = "transformers Jamba Mamba mixer"

    def claims(self, module: nn.Module) -> bool:
        return _is_class(module, *JAMBA_MIXER)

    def affine_parts(self, module: Any) -> Dict[str, nn.Module]:
        return {"in_proj": module.in_proj, "conv1d": module.conv1d, "out_proj": module.out_proj}

    def install(self, module: Any, name: str, composite: Composite, patcher: Patcher, backend: str) -> List[Component]:
        rules = mixer_rules(name, module.act, composite, backend)
        components = rules_as_components(name, rules)
        norms = {}
        for attr in ("dt_layernorm", "b_layernorm", "c_layernorm"):
            norm = getattr(module, attr)
            rule = composite.rule_for(f"{name}.{attr}", NORM, norm)
            components.append(Component(f"{name}.{attr}", NORM, rule))
            norms[attr] = _rms_with_rule(norm, rule)
        parts = dataclasses.replace(
            hf_mamba1_parts(module),
            dt_norm=norms["dt_layernorm"],
            B_norm=norms["b_layernorm"],
            C_norm=norms["c_layernorm"],
            gate_fn=F.silu,  # the scan's gate is silu(z), whatever hidden_act the conv uses
        )

        def forward(
            hidden_states: Tensor, *args, attention_mask: Optional[Tensor] = None, cache: object = None, **kwargs
        ) -> Tensor:
            reject_packed(kwargs)
            reject_cache_state(cache, getattr(module, "layer_idx", None), name)
            return mamba1_forward(parts, rules, hidden_states, check_padding_mask(attention_mask, name))

        def piece(hidden, attention_mask, state, carry):  # recompute="sequence": one piece of the sequence
            mask = check_padding_mask(attention_mask, name)
            out, new = mamba1_piece(parts, rules, hidden, mask, None if state is None else Mamba1State(*state), carry)
            return out, None if new is None else new.tensors()

        forward.sequence_piece = piece  # type: ignore[attr-defined]
        forward.sequence_piece_accepts = piece_accepts(module, name)  # type: ignore[attr-defined]
        patcher.replace_forward(module, forward)
        return components


def _rms_with_rule(norm: Any, rule: MambaRule) -> Callable[[Tensor], Tensor]:
    eps = norm_epsilon(norm)
    return lambda x: rms_norm(x, norm.weight, eps, rule)


class FalconH1InProj:
    """Falcon-H1's scaled input projection ``in_proj(x * ssm_in_multiplier) * mup_vector``
    (calls the ``in_proj`` module, so its linear rule's hook applies)."""

    def __init__(self, mixer: Any) -> None:
        self.in_proj = mixer.in_proj
        self.multiplier = float(mixer.ssm_in_multiplier)
        self.mup_vector = mixer.mup_vector

    def __call__(self, hidden: Tensor) -> Tensor:
        return self.in_proj(hidden * self.multiplier) * self.mup_vector.to(hidden.dtype)


class HFHybridMamba2Adapter(Adapter):
    """The Mamba2-family mixers of Bamba, Nemotron-H, Granite-4.0-H, Zamba2 and Falcon-H1."""

    label = "transformers hybrids' Mamba2 mixers (Bamba, NemotronH, GraniteMoeHybrid, Zamba2, FalconH1)"

    def claims(self, module: nn.Module) -> bool:
        path = HF_MAMBA2_HYBRID_MIXERS.get(type(module).__name__)
        return path is not None and type(module).__module__ == path

    def affine_parts(self, module: Any) -> Dict[str, nn.Module]:
        return {"in_proj": module.in_proj, "conv1d": module.conv1d, "out_proj": module.out_proj}

    def install(self, module: Any, name: str, composite: Composite, patcher: Patcher, backend: str) -> List[Component]:
        falcon = type(module).__name__ == "FalconH1Mixer"
        parts = hf_mamba2_parts(module, in_proj=FalconH1InProj(module) if falcon else None)
        norm_module = None if isinstance(module.norm, nn.Identity) else module.norm
        rules, norm_rule, components = mamba2_rules(name, module.act, norm_module, composite, backend)

        def forward(
            hidden_states: Tensor, *args, attention_mask: Optional[Tensor] = None, cache: object = None, **kwargs
        ) -> Tensor:
            reject_packed(kwargs)
            reject_cache_state(cache, getattr(module, "layer_idx", None), name)
            return mamba2_forward(parts, rules, norm_rule, hidden_states, check_padding_mask(attention_mask, name))

        def piece(hidden, attention_mask, state, carry):  # recompute="sequence": one piece of the sequence
            return mamba2_piece(parts, rules, norm_rule, hidden, check_padding_mask(attention_mask, name), state, carry)

        forward.sequence_piece = piece  # type: ignore[attr-defined]
        forward.sequence_piece_accepts = piece_accepts(module, name)  # type: ignore[attr-defined]
        patcher.replace_forward(module, forward)
        return components


def hybrid_mixer_classes() -> List[Tuple[str, str]]:
    """``(class name, module)`` of every transformers hybrid mixer these adapters take over."""
    return [JAMBA_MIXER, *HF_MAMBA2_HYBRID_MIXERS.items()]


register(HFJambaMixerAdapter())
register(HFHybridMamba2Adapter())
