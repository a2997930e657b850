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
- ``MixerModel``: the embedding, the blocks, and the final ``norm_f(hidden + residual)``;
- hybrids: the attention block ``MHA`` (``attn_layer_idx``; the attention rule of the composite,
  AttnLRP or CP-LRP, through :func:`.attention.lrp_attention`) and ``GatedMLP``
  (``d_intermediate > 0``; :func:`.mlp.mlp_forward`); ``Mamba3`` is in :mod:`.mamba3`.

No mamba-ssm kernel is called while attributing; the adapters only read the modules'
parameters and settings. Rotary attention (flash-attn's ``RotaryEmbedding``), tensor
parallelism and packed (varlen) batches are refused.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..rules.base import ACTIVATION, ATTENTION, GATE, MambaRule
from ..rules.composites import Composite
from .attention import activate_attention_rule, lrp_attention
from .base import Adapter, Component, find_adapter, register
from .common import mixer_rules, rules_as_components
from .hf_mamba2 import reject_packed
from .install import UnsupportedModelError
from .mamba1 import Mamba1Parts, Mamba1State, mamba1_forward, mamba1_piece
from .mamba2 import GatedNorm, Mamba2Parts, mamba2_forward, mamba2_piece, mamba2_rules
from .mlp import MLPParts, mlp_forward
from .patching import Patcher


def is_mamba_ssm_class(module: nn.Module, name: str, module_path: str) -> bool:
    cls = type(module)
    return cls.__name__ == name and cls.__module__ == module_path


def reject_inference_params(inference_params: object) -> None:
    if inference_params is not None:
        raise ValueError("MambaLRP explains whole sequences: call the model without inference_params (no decoding cache)")


def mamba_ssm1_parts(mixer: Any) -> Mamba1Parts:
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


def mamba_ssm2_parts(mixer: Any) -> Mamba2Parts:
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

    def affine_parts(self, module: Any) -> Dict[str, nn.Module]:
        return {"in_proj": module.in_proj, "conv1d": module.conv1d, "out_proj": module.out_proj}

    def install(self, module: Any, name: str, composite: Composite, patcher: Patcher, backend: str) -> List[Component]:
        parts = mamba_ssm1_parts(module)
        rules = mixer_rules(name, module.act, composite, backend)

        def forward(hidden_states: Tensor, inference_params: object = None, **kwargs) -> Tensor:
            reject_inference_params(inference_params)
            return mamba1_forward(parts, rules, hidden_states)

        def piece(hidden, attention_mask, state, carry):  # recompute="sequence": one piece of the sequence
            out, new = mamba1_piece(parts, rules, hidden, attention_mask, None if state is None else Mamba1State(*state), carry)
            return out, None if new is None else new.tensors()

        def accepts(kwargs: Dict[str, Any]) -> bool:  # which calls run in pieces (a decoding cache is refused)
            reject_inference_params(kwargs.get("inference_params"))
            return True

        forward.sequence_piece = piece  # type: ignore[attr-defined]
        forward.sequence_piece_accepts = accepts  # type: ignore[attr-defined]
        patcher.replace_forward(module, forward)
        return rules_as_components(name, rules)


class MambaSSM2Adapter(Adapter):
    label = "mamba-ssm Mamba2 mixer"

    def claims(self, module: nn.Module) -> bool:
        return is_mamba_ssm_class(module, "Mamba2", "mamba_ssm.modules.mamba2")

    def affine_parts(self, module: Any) -> Dict[str, nn.Module]:
        return {"in_proj": module.in_proj, "conv1d": module.conv1d, "out_proj": module.out_proj}

    def install(self, module: Any, name: str, composite: Composite, patcher: Patcher, backend: str) -> List[Component]:
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

        def piece(hidden, attention_mask, state, carry):  # recompute="sequence": one piece of the sequence
            return mamba2_piece(parts, rules, norm_rule, hidden, attention_mask, state, carry)

        def accepts(kwargs: Dict[str, Any]) -> bool:  # [b, l, d] calls run in pieces; (b * l, d) rows whole
            reject_inference_params(kwargs.get("inference_params"))
            reject_packed({k: kwargs.get(k) for k in ("seq_idx", "cu_seqlens")})
            return kwargs.get("seqlen") is None

        forward.sequence_piece = piece  # type: ignore[attr-defined]
        forward.sequence_piece_accepts = accepts  # type: ignore[attr-defined]
        patcher.replace_forward(module, forward)
        return components


class MambaSSMBlockAdapter(Adapter):
    """``Block``: the residual add fused with the norm, computed with the norm as a module (and,
    with ``d_intermediate > 0``, the second add + ``norm2`` before the MLP)."""

    label = "mamba-ssm Block (residual add + norm, fused or not)"
    wraps_children = True  # the norm and the mixer inside are installed as usual

    def claims(self, module: nn.Module) -> bool:
        return is_mamba_ssm_class(module, "Block", "mamba_ssm.modules.block")

    def affine_parts(self, module: Any) -> Dict[str, nn.Module]:
        return {}

    def install(self, module: Any, name: str, composite: Composite, patcher: Patcher, backend: str) -> List[Component]:
        mixer, mlp = module.mixer, module.mlp
        for part, child in (("mixer", mixer), ("mlp", mlp)):
            if child is not None and find_adapter(child) is None:
                raise UnsupportedModelError(
                    f"MambaLRP has no rule for module {name + '.' + part!r} ({type(child).__name__}): the block's {part} "
                    "is not a module MambaLRP takes over (mamba-ssm's Mamba, Mamba2, Mamba3, MHA, GatedMLP)."
                )

        def forward(
            hidden_states: Tensor, residual: Optional[Tensor] = None, inference_params: object = None, **mixer_kwargs
        ) -> tuple:
            residual = hidden_states if residual is None else hidden_states + residual
            hidden = module.norm(residual.to(dtype=module.norm.weight.dtype))
            if module.residual_in_fp32:
                residual = residual.to(torch.float32)
            hidden = mixer(hidden, inference_params=inference_params, **mixer_kwargs)
            if mlp is not None:  # d_intermediate > 0: a second residual add + norm, then the MLP
                residual = hidden + residual
                hidden = module.norm2(residual.to(dtype=module.norm2.weight.dtype))
                if module.residual_in_fp32:
                    residual = residual.to(torch.float32)
                hidden = mlp(hidden)
            return hidden, residual

        patcher.replace_forward(module, forward)
        return []


class MambaSSMMixerModelAdapter(Adapter):
    """``MixerModel``: embedding, blocks, and ``norm_f`` of the last residual sum as a module."""

    label = "mamba-ssm MixerModel (backbone of MambaLMHeadModel)"
    wraps_children = True

    def claims(self, module: nn.Module) -> bool:
        return is_mamba_ssm_class(module, "MixerModel", "mamba_ssm.models.mixer_seq_simple")

    def affine_parts(self, module: Any) -> Dict[str, nn.Module]:
        return {}

    def install(self, module: Any, name: str, composite: Composite, patcher: Patcher, backend: str) -> List[Component]:
        def forward(input_ids: Tensor, inference_params: object = None, **mixer_kwargs) -> Tensor:
            hidden, residual = module.embedding(input_ids), None
            for layer in module.layers:
                hidden, residual = layer(hidden, residual, inference_params=inference_params, **mixer_kwargs)
            residual = hidden if residual is None else hidden + residual
            return module.norm_f(residual.to(dtype=module.norm_f.weight.dtype))

        patcher.replace_forward(module, forward)
        return []


class MambaSSMAttentionAdapter(Adapter):
    """mamba-ssm's attention block ``MHA`` (the layers ``attn_layer_idx`` of a hybrid
    ``MambaLMHeadModel``): its forward computed in torch, whatever kernel it would call
    (flash-attn or ``F.scaled_dot_product_attention``), with the attention rule on ``q, k, v``
    (:func:`.attention.lrp_attention`, the function transformers' attention layers run):

        qkv, [x_up, x_gate] = split(in_proj(x))      # the optional gated MLP half (mlp_dim > 0)
        qkv   = conv1d(qkv)                          # optional causal depthwise conv (d_conv > 0)
        o     = softmax(q k^T * scale + causal) v    # GQA/MQA: key/value heads repeated
        out   = out_proj(cat(o, x_up * silu(x_gate)))

    The MLP half gets the Mamba gate's rules (identity on the SiLU, half rule on the product).
    Rotary embeddings (``rotary_emb_dim > 0``, flash-attn's ``RotaryEmbedding``) are refused.
    """

    label = "mamba-ssm attention (MHA)"
    recomputed_whole = True

    def claims(self, module: nn.Module) -> bool:
        return is_mamba_ssm_class(module, "MHA", "mamba_ssm.modules.mha")

    def affine_parts(self, module: Any) -> Dict[str, nn.Module]:
        parts = {"in_proj": module.in_proj, "out_proj": module.out_proj}
        if module.d_conv > 0:
            parts["conv1d"] = module.conv1d
        return parts

    def install(self, module: Any, name: str, composite: Composite, patcher: Patcher, backend: str) -> List[Component]:
        if module.rotary_emb_dim > 0:
            raise UnsupportedModelError(
                f"MambaLRP has no rule for module {name!r} (MHA): rotary embeddings (rotary_emb_dim > 0, flash-attn's "
                "RotaryEmbedding) are not covered; use attention without rotary_emb_dim."
            )
        rule = composite.rule_for(f"{name}.attention", ATTENTION, module)
        components = [Component(f"{name}.attention", ATTENTION, rule)]
        act_rule = gate_rule = rule
        if module.mlp_dim > 0:
            act_rule = composite.rule_for(f"{name}.mlp_act", ACTIVATION)
            gate_rule = composite.rule_for(f"{name}.mlp_gate", GATE)
            components += [Component(f"{name}.mlp_act", ACTIVATION, act_rule), Component(f"{name}.mlp_gate", GATE, gate_rule)]
        activate_attention_rule(module, rule, patcher)

        def forward(x: Tensor, inference_params: object = None, **kwargs) -> Tensor:
            reject_inference_params(inference_params)
            return mha_forward(module, act_rule, gate_rule, x)

        patcher.replace_forward(module, forward)
        return components


def mha_forward(module: Any, act_rule: MambaRule, gate_rule: MambaRule, x: Tensor) -> Tensor:
    """``MHA``'s forward on ``x [b, l, d]`` with the attention rule registered for ``module``
    (:func:`activate_attention_rule`) and ``act_rule``/``gate_rule`` on its MLP half.

    Returns:
        ``[b, l, d]``, equal in value to ``MHA.forward`` without a cache.
    """
    batch, length, _ = x.shape
    qkv = module.in_proj(x)
    x_mlp = None
    if module.mlp_dim > 0:
        qkv, x_mlp = qkv.split([qkv.shape[-1] - module.mlp_dim, module.mlp_dim], dim=-1)
        up, gate = x_mlp.chunk(2, dim=-1)
        x_mlp = gate_rule.gate(up, act_rule.activation(gate, F.silu))
    if module.d_conv > 0:
        qkv = module.conv1d(qkv.transpose(1, 2))[..., :length].transpose(1, 2)
    heads, heads_kv, dim = module.num_heads, module.num_heads_kv, module.head_dim
    q, kv = qkv.split([heads * dim, heads_kv * 2 * dim], dim=-1)
    q = q.reshape(batch, length, heads, dim).transpose(1, 2)
    k, v = kv.reshape(batch, length, 2, heads_kv, dim).permute(2, 0, 3, 1, 4)  # [b, h_kv, l, d] each
    causal = torch.ones(length, length, dtype=torch.bool, device=x.device).tril()[None, None] if module.causal else None
    context, _ = lrp_attention(module, q, k, v, causal, scaling=module.softmax_scale)
    context = context.reshape(batch, length, heads * dim)
    if x_mlp is not None:
        context = torch.cat([context, x_mlp.to(context.dtype)], dim=-1)
    return module.out_proj(context)


class MambaSSMGatedMLPAdapter(Adapter):
    """mamba-ssm's ``GatedMLP`` (``d_intermediate > 0``): ``fc2(y * act(gate))`` with
    ``y, gate = fc1(x).chunk(2)``, through :func:`.mlp.mlp_forward` (identity rule on the
    activation, half rule on the product)."""

    label = "mamba-ssm GatedMLP"
    recomputed_whole = True

    def claims(self, module: nn.Module) -> bool:
        return is_mamba_ssm_class(module, "GatedMLP", "mamba_ssm.modules.mlp")

    def affine_parts(self, module: Any) -> Dict[str, nn.Module]:
        return {"fc1": module.fc1, "fc2": module.fc2}

    def install(self, module: Any, name: str, composite: Composite, patcher: Patcher, backend: str) -> List[Component]:
        act = nn.SiLU() if module.activation is F.silu else _ActivationModule(module.activation)
        act_rule = composite.rule_for(f"{name}.act", ACTIVATION, act)
        gate_rule = composite.rule_for(f"{name}.gate", GATE)
        fc1 = module.fc1

        def project(x: Tensor) -> Tuple[Tensor, Optional[Tensor]]:
            up, gate = fc1(x).chunk(2, dim=-1)
            return gate, up

        parts = MLPParts(project=project, act_module=act, down=module.fc2, affine={})

        def forward(x: Tensor, *args, **kwargs) -> Tensor:
            return mlp_forward(parts, act_rule, gate_rule, x)

        patcher.replace_forward(module, forward)
        return [Component(f"{name}.act", ACTIVATION, act_rule), Component(f"{name}.gate", GATE, gate_rule)]


class _ActivationModule(nn.Module):
    """A function activation (``GatedMLP.activation``, e.g. ``F.silu``) as a module, for the rules."""

    def __init__(self, fn: Any) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: Tensor) -> Tensor:
        return self.fn(x)


for _adapter in (
    MambaSSM1Adapter(),
    MambaSSM2Adapter(),
    MambaSSMAttentionAdapter(),
    MambaSSMGatedMLPAdapter(),
    MambaSSMBlockAdapter(),
    MambaSSMMixerModelAdapter(),
):
    register(_adapter)
