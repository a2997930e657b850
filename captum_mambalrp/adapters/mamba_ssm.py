"""Adapters for mamba-ssm's models (``mamba_ssm.models.mixer_seq_simple.MambaLMHeadModel``).

mamba-ssm computes with fused CUDA/Triton kernels: the selective scan (Mamba1), the chunked
SSD scan with conv, gate and grouped norm (Mamba2), and the residual add fused with the
(RMS)norm (``Block`` and ``MixerModel`` with ``fused_add_norm``). MambaLRP takes over, per
instance and reversibly:

- the mixers ``Mamba`` (reusing :func:`.mamba1.mamba1_forward`) and ``Mamba2`` (reusing
  :func:`.mamba2.mamba2_forward`), whatever kernel they would call;
- ``Block``: ``residual = hidden + residual; hidden = mixer(norm(residual))`` with the norm
  called as a module (so the norm rule applies) and the residual kept in float32 when the
  block says so; the addition passes relevance on unchanged (conservative);
- ``MixerModel``: the embedding, the blocks, and the final ``norm_f(hidden + residual)``.

No mamba-ssm kernel is called while attributing; the adapters only read the modules'
parameters and settings. Attention blocks (``MHA``), gated MLPs (``d_intermediate > 0``),
tensor parallelism and packed (varlen) batches are refused.
"""

from __future__ import annotations

from typing import Dict, List, Optional

import torch
from torch import Tensor, nn

from ..rules.composites import Composite
from .base import Adapter, Component, find_adapter, register
from .common import mixer_rules, rules_as_components
from .hf_mamba2 import reject_packed
from .install import UnsupportedModelError
from .mamba1 import Mamba1Parts, mamba1_forward
from .mamba2 import GatedNorm, Mamba2Parts, mamba2_forward, mamba2_rules
from .patching import Patcher


def is_mamba_ssm_class(module: nn.Module, name: str, module_path: str) -> bool:
    cls = type(module)
    return cls.__name__ == name and cls.__module__ == module_path


def reject_inference_params(inference_params: object) -> None:
    if inference_params is not None:
        raise ValueError("MambaLRP explains whole sequences: call the model without inference_params (no decoding cache)")


def mamba_ssm1_parts(mixer: nn.Module) -> Mamba1Parts:
    """Parts of mamba-ssm's ``Mamba`` (the same computation as transformers' ``MambaMixer``)."""
    return Mamba1Parts(
        in_proj=mixer.in_proj,
        conv1d=mixer.conv1d,
        x_proj=mixer.x_proj,
        dt_proj=mixer.dt_proj,
        out_proj=mixer.out_proj,
        A_log=mixer.A_log,
        D=mixer.D,
        dt_rank=int(mixer.dt_rank),
        d_state=int(mixer.d_state),
        act=mixer.act.forward,
    )


def mamba_ssm2_parts(mixer: nn.Module) -> Mamba2Parts:
    """Parts of mamba-ssm's ``Mamba2`` (``D_has_hdim``, ``rmsnorm``, ``norm_before_gate``,
    ``dt_limit`` and the gated-MLP split ``d_ssm < d_inner`` included)."""
    d_ssm, groups, state, heads = mixer.d_ssm, mixer.ngroups, mixer.d_state, mixer.nheads
    d_mlp = (mixer.in_proj.out_features - 2 * d_ssm - 2 * groups * state - heads) // 2
    norm = None
    if mixer.rmsnorm:
        group_size = mixer.norm.group_size or d_ssm
        norm = GatedNorm(mixer.norm.weight, float(mixer.norm.eps), int(group_size), bool(mixer.norm.norm_before_gate))
    return Mamba2Parts(
        in_proj=mixer.in_proj,
        conv1d=mixer.conv1d,
        out_proj=mixer.out_proj,
        A_log=mixer.A_log,
        D=mixer.D,
        dt_bias=mixer.dt_bias,
        n_heads=int(heads),
        head_dim=int(mixer.headdim),
        n_groups=int(groups),
        d_state=int(state),
        act=mixer.act.forward,
        norm=norm,
        dt_limit=(float(mixer.dt_limit[0]), float(mixer.dt_limit[1])),
        d_mlp=int(d_mlp),
    )


class MambaSSM1Adapter(Adapter):
    label = "mamba-ssm Mamba (Mamba1) mixer"

    def claims(self, module: nn.Module) -> bool:
        # Vision Mamba's fork of this class (bimamba_type "v1"/"v2") computes something else
        return is_mamba_ssm_class(module, "Mamba", "mamba_ssm.modules.mamba_simple") and getattr(
            module, "bimamba_type", "none"
        ) in (None, "none")

    def affine_parts(self, module: nn.Module) -> Dict[str, nn.Module]:
        return {"in_proj": module.in_proj, "conv1d": module.conv1d, "out_proj": module.out_proj}

    def install(self, module: nn.Module, name: str, composite: Composite, patcher: Patcher, backend: str) -> List[Component]:
        parts = mamba_ssm1_parts(module)
        rules = mixer_rules(name, module.act, composite, backend)

        def forward(hidden_states: Tensor, inference_params: object = None, **kwargs) -> Tensor:
            reject_inference_params(inference_params)
            return mamba1_forward(parts, rules, hidden_states)

        patcher.replace_forward(module, forward)
        return rules_as_components(name, rules)


class MambaSSM2Adapter(Adapter):
    label = "mamba-ssm Mamba2 mixer"

    def claims(self, module: nn.Module) -> bool:
        return is_mamba_ssm_class(module, "Mamba2", "mamba_ssm.modules.mamba2")

    def affine_parts(self, module: nn.Module) -> Dict[str, nn.Module]:
        return {"in_proj": module.in_proj, "conv1d": module.conv1d, "out_proj": module.out_proj}

    def install(self, module: nn.Module, name: str, composite: Composite, patcher: Patcher, backend: str) -> List[Component]:
        if getattr(module, "process_group", None) is not None:
            raise UnsupportedModelError(
                f"MambaLRP has no rule for module {name!r} (Mamba2): tensor-parallel mixers (process_group "
                "set) are not covered; load the model without tensor parallelism."
            )
        parts = mamba_ssm2_parts(module)
        rules, norm_rule, components = mamba2_rules(name, module.act, module.norm if module.rmsnorm else None, composite, backend)

        def forward(
            u: Tensor,
            seqlen: Optional[int] = None,
            seq_idx: Optional[Tensor] = None,
            cu_seqlens: Optional[Tensor] = None,
            inference_params: object = None,
            **kwargs,
        ) -> Tensor:
            reject_inference_params(inference_params)
            reject_packed({"seq_idx": seq_idx, "cu_seqlens": cu_seqlens, **kwargs})
            if seqlen is None:
                return mamba2_forward(parts, rules, norm_rule, u)
            # (batch * seqlen, d) rows, as under sequence parallelism
            out = mamba2_forward(parts, rules, norm_rule, u.reshape(-1, seqlen, u.shape[-1]))
            return out.reshape(-1, out.shape[-1])

        patcher.replace_forward(module, forward)
        return components


class MambaSSMBlockAdapter(Adapter):
    """``Block``: the residual add fused with the norm, computed with the norm as a module."""

    label = "mamba-ssm Block (residual add + norm, fused or not)"
    wraps_children = True  # the norm and the mixer inside are installed as usual

    def claims(self, module: nn.Module) -> bool:
        return is_mamba_ssm_class(module, "Block", "mamba_ssm.modules.block")

    def affine_parts(self, module: nn.Module) -> Dict[str, nn.Module]:
        return {}

    def install(self, module: nn.Module, name: str, composite: Composite, patcher: Patcher, backend: str) -> List[Component]:
        mixer = module.mixer
        if find_adapter(mixer) is None:
            raise UnsupportedModelError(
                f"MambaLRP has no rule for module {name + '.mixer'!r} ({type(mixer).__name__}): the block's mixer "
                "is not a Mamba or Mamba2 mixer (attention layers of hybrid models, set by attn_layer_idx, "
                "are not covered)."
            )
        if module.mlp is not None:
            raise UnsupportedModelError(
                f"MambaLRP has no rule for module {name + '.mlp'!r} ({type(module.mlp).__name__}): blocks with an "
                "MLP after the mixer (d_intermediate > 0) are not covered."
            )

        def forward(
            hidden_states: Tensor, residual: Optional[Tensor] = None, inference_params: object = None, **mixer_kwargs
        ) -> tuple:
            residual = hidden_states if residual is None else hidden_states + residual
            hidden = module.norm(residual.to(dtype=module.norm.weight.dtype))
            if module.residual_in_fp32:
                residual = residual.to(torch.float32)
            return mixer(hidden, inference_params=inference_params, **mixer_kwargs), residual

        patcher.replace_forward(module, forward)
        return []


class MambaSSMMixerModelAdapter(Adapter):
    """``MixerModel``: embedding, blocks, and ``norm_f`` of the last residual sum as a module."""

    label = "mamba-ssm MixerModel (backbone of MambaLMHeadModel)"
    wraps_children = True

    def claims(self, module: nn.Module) -> bool:
        return is_mamba_ssm_class(module, "MixerModel", "mamba_ssm.models.mixer_seq_simple")

    def affine_parts(self, module: nn.Module) -> Dict[str, nn.Module]:
        return {}

    def install(self, module: nn.Module, name: str, composite: Composite, patcher: Patcher, backend: str) -> List[Component]:
        def forward(input_ids: Tensor, inference_params: object = None, **mixer_kwargs) -> Tensor:
            hidden, residual = module.embedding(input_ids), None
            for layer in module.layers:
                hidden, residual = layer(hidden, residual, inference_params=inference_params, **mixer_kwargs)
            residual = hidden if residual is None else hidden + residual
            return module.norm_f(residual.to(dtype=module.norm_f.weight.dtype))

        patcher.replace_forward(module, forward)
        return []


for _adapter in (MambaSSM1Adapter(), MambaSSM2Adapter(), MambaSSMBlockAdapter(), MambaSSMMixerModelAdapter()):
    register(_adapter)
