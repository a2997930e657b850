"""Adapter for transformers' ``Mamba2Mixer`` (``Mamba2Model``, ``Mamba2ForCausalLM``; Codestral-style
configurations with several groups included)."""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional

import torch.nn.functional as F
from torch import Tensor, nn

from ..rules.composites import Composite
from .base import Adapter, Component, register
from .mamba2 import GatedNorm, Mamba2Parts, mamba2_forward, mamba2_piece, mamba2_rules
from .patching import Patcher

# keyword arguments of packed (varlen) batches: several sequences in one row
PACKED_KWARGS = ("seq_idx", "cu_seqlens", "cu_seq_lens_q", "cu_seq_lens_k")


def reject_packed(kwargs: Dict[str, object]) -> None:
    packed = [k for k in PACKED_KWARGS if kwargs.get(k) is not None]
    if packed:
        raise ValueError(
            f"MambaLRP does not explain packed (varlen) batches ({', '.join(packed)} given): pass one "
            "sequence per row, with an attention_mask for padding where the model takes one."
        )


def silu_or(activation: str, act: nn.Module):
    """``F.silu`` when the config names SiLU (so the identity rule is exact), else the module's forward."""
    return F.silu if activation in ("silu", "swish") else act.forward


def hf_gated_norm(norm: Any) -> Optional[GatedNorm]:
    """The gated grouped RMSNorm of a transformers Mamba2-family mixer, or ``None`` for none
    (``nn.Identity``: Falcon-H1 with ``mamba_rms_norm=False``).

    Groups come from ``group_size`` (Mamba2, Bamba, Nemotron-H, Granite, Zamba2) or ``n_groups``
    (Falcon-H1); ``norm_before_gate`` from the module (Falcon-H1), else ``False``
    (``w * norm_g(y * silu(z))``). transformers before the grouped norm (e.g. 5.17) normalises
    over all channels at once.

    Returns:
        A :class:`GatedNorm` reading the module's weight and epsilon, or ``None``.
    """
    if isinstance(norm, nn.Identity):
        return None
    channels = int(norm.weight.shape[-1])
    if hasattr(norm, "group_size"):
        group_size = int(norm.group_size)
    else:
        group_size = channels // int(getattr(norm, "n_groups", 1))
    return GatedNorm(norm.weight, float(norm.variance_epsilon), group_size, bool(getattr(norm, "norm_before_gate", False)))


def hf_mamba2_parts(mixer: Any, in_proj: Optional[Callable[[Tensor], Tensor]] = None) -> Mamba2Parts:
    """Parts of transformers' ``Mamba2Mixer`` and of the hybrids' mixers built like it (Bamba,
    Nemotron-H, Granite-4.0-H, Zamba2, Falcon-H1): the same attribute names throughout.
    ``in_proj`` replaces the input projection (Falcon-H1's scaled one)."""
    return Mamba2Parts(
        in_proj=mixer.in_proj if in_proj is None else in_proj,
        conv1d=mixer.conv1d,
        out_proj=mixer.out_proj,
        A_log=mixer.A_log,
        D=mixer.D,
        dt_bias=mixer.dt_bias,
        n_heads=int(mixer.num_heads),
        head_dim=int(mixer.head_dim),
        n_groups=int(mixer.n_groups),
        d_state=int(mixer.ssm_state_size),
        act=silu_or(mixer.activation, mixer.act),
        norm=hf_gated_norm(mixer.norm),
        dt_limit=(float(mixer.time_step_limit[0]), float(mixer.time_step_limit[1])),
        gate_fn=F.silu,  # the gated norm (and Falcon-H1's plain gate) use SiLU whatever the conv's activation
    )


class HFMamba2Adapter(Adapter):
    label = "transformers Mamba2 mixer (Mamba2, Codestral-style n_groups > 1)"

    def claims(self, module: nn.Module) -> bool:
        cls = type(module)
        return cls.__name__ == "Mamba2Mixer" and cls.__module__.startswith("transformers.models.mamba2.")

    def affine_parts(self, module: Any) -> Dict[str, nn.Module]:
        return {"in_proj": module.in_proj, "conv1d": module.conv1d, "out_proj": module.out_proj}

    def install(self, module: Any, name: str, composite: Composite, patcher: Patcher, backend: str) -> List[Component]:
        parts = hf_mamba2_parts(module)
        rules, norm_rule, components = mamba2_rules(name, module.act, module.norm, composite, backend)

        def forward(hidden_states: Tensor, *args, attention_mask: Optional[Tensor] = None, **kwargs) -> Tensor:
            reject_packed(kwargs)
            return mamba2_forward(parts, rules, norm_rule, hidden_states, attention_mask)

        def piece(hidden, attention_mask, state, carry):  # recompute="sequence": one piece of the sequence
            return mamba2_piece(parts, rules, norm_rule, hidden, attention_mask, state, carry)

        forward.sequence_piece = piece  # type: ignore[attr-defined]
        patcher.replace_forward(module, forward)
        return components


register(HFMamba2Adapter())
