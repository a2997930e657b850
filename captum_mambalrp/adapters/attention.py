"""Attention layers of transformers models (pure transformers and the attention of hybrids).

transformers' attention modules compute ``q``, ``k``, ``v`` (linear projections, RoPE with
``cos``/``sin`` from positions, Qwen3's per-head RMSNorm, Falcon-H1's key multiplier) and then
call the function registered under ``config._attn_implementation`` in ``AttentionInterface``
(eager, sdpa, flash, ...). MambaLRP takes over only that call: while attributing, the config of
each claimed module names :func:`lrp_attention`, registered under ``ATTN_IMPLEMENTATION`` with
transformers' sdpa mask (causal, sliding-window and padding masks as one boolean ``[b, 1, q, k]``
mask, or none for a plain causal layer without padding). :func:`lrp_attention` applies the
attention rule to ``q``, ``k``, ``v`` (``rules.attention``) and runs torch's
``scaled_dot_product_attention`` with plain autograd: the values of eager attention, a fused
kernel where torch has one (flash for a plain causal layer on CUDA); a boolean mask is turned
into eager's additive form, so that fully masked rows (left padding) stay finite. Everything
around the call is linear, a norm or a linear layer, and gets its rule from the install walk
(the adapter wraps its children).

The user's ``attn_implementation`` is restored afterwards (the config's stored value itself),
whatever it was: eager, sdpa, flash or a custom function.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Set, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..rules.base import ATTENTION, MambaRule
from ..rules.composites import Composite
from .base import Adapter, Component, register
from .patching import Patcher

#: the name under which :func:`lrp_attention` is registered in transformers' interfaces
ATTN_IMPLEMENTATION = "captum_mambalrp"

#: attention classes whose forward was read and found to call the attention interface with
#: ``q``, ``k``, ``v`` only after linear steps (projections, RoPE, norms, multipliers)
SUPPORTED_ATTENTION = (
    "LlamaAttention",
    "Qwen3Attention",
    "Qwen3MoeAttention",
    "JambaAttention",
    "BambaAttention",
    "FalconH1Attention",
    "NemotronHAttention",
    "GraniteMoeHybridAttention",
    "Zamba2Attention",
)

# attention module -> its rule, while an installation holds it (keyed by id; removed on restore)
_ACTIVE: Dict[int, MambaRule] = {}
_registered = False


def _register_implementation() -> None:
    """Register :func:`lrp_attention` and the sdpa mask under ``ATTN_IMPLEMENTATION`` (once)."""
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTN_IMPLEMENTATION, lrp_attention)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)
    _registered = True


def _repeat_heads(x: Tensor, n_rep: int) -> Tensor:
    """``[b, h_kv, l, d]`` -> ``[b, h_kv * n_rep, l, d]`` (GQA/MQA: each key/value head serves
    ``n_rep`` query heads; the gradients of the copies add up)."""
    if n_rep == 1:
        return x
    b, h, length, d = x.shape
    return x[:, :, None].expand(b, h, n_rep, length, d).reshape(b, h * n_rep, length, d)


def _as_additive(mask: Optional[Tensor], q_len: int, k_len: int, dtype: torch.dtype, causal: bool) -> Optional[Tensor]:
    """The mask as an additive float mask for scores ``[b, h, q_len, k_len]`` of ``dtype``: a float
    mask (transformers' eager form) is cut to ``k_len``; a boolean one (sdpa's) becomes
    ``0`` / ``finfo.min``. ``None`` stays ``None`` (a causal layer then uses ``is_causal``)."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros((), dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
    return mask[..., :k_len].to(dtype)


def lrp_attention(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Optional[Tensor],
    scaling: Optional[float] = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> Tuple[Tensor, None]:
    """Attention ``softmax(q k^T * scaling + mask) v`` with ``module``'s attention rule applied to
    ``q, k, v [b, heads, l, head_dim]`` (transformers' ``AttentionInterface`` signature).

    The rule only rewrites the gradients of ``q``, ``k``, ``v``; the attention itself is
    ``torch.nn.functional.scaled_dot_product_attention`` with plain autograd (memory linear in the
    length where a fused kernel applies). Dropout is not applied.

    Returns:
        ``(output [b, l, heads, head_dim], None)``, as transformers' sdpa attention.

    Raises:
        RuntimeError: ``module`` was not taken over by an installation (its rule is unknown).
        TypeError: an attention variant without a rule (logit soft-capping, sinks).
    """
    rule = _ACTIVE.get(id(module))
    if rule is None:
        raise RuntimeError(
            f"{type(module).__name__} called MambaLRP's attention without being installed; "
            f"set config._attn_implementation back to the model's own implementation"
        )
    extra = [k for k in ("softcap", "s_aux", "sinks") if kwargs.get(k) is not None]
    if extra or getattr(module, "sinks", None) is not None:  # not in the supported classes: a changed class
        raise TypeError(
            f"MambaLRP has no rule for the attention variant of {type(module).__name__} ({', '.join(extra) or 'sinks'}): "
            "its transformers version adds a step the attention rules do not cover"
        )
    query, key, value = rule.attention(query, key, value)
    n_rep = query.shape[1] // key.shape[1]
    key, value = _repeat_heads(key, n_rep), _repeat_heads(value, n_rep)
    q_len, k_len = query.shape[-2], key.shape[-2]
    mask = _as_additive(attention_mask, q_len, k_len, query.dtype, bool(getattr(module, "is_causal", False)))
    causal = mask is None and bool(getattr(module, "is_causal", False)) and q_len > 1
    if causal and q_len != k_len:  # queries at the end of a longer key sequence (a cache)
        keep = torch.ones(q_len, k_len, dtype=torch.bool, device=query.device).tril(k_len - q_len)
        mask, causal = _as_additive(keep, q_len, k_len, query.dtype, True), False
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, is_causal=causal, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


def _configs(config: Any) -> List[Any]:
    """``config`` and its sub-configs (each holds its own ``_attn_implementation``)."""
    found, stack, seen = [], [config], set()
    while stack:
        c = stack.pop()
        if c is None or id(c) in seen or not hasattr(c, "_attn_implementation_internal"):
            continue
        seen.add(id(c))
        found.append(c)
        stack.extend(getattr(c, k, None) for k in getattr(c, "sub_configs", {}) or {})
    return found


def use_lrp_attention(config: Any, patcher: Patcher) -> None:
    """Point ``config`` (and its sub-configs) at :func:`lrp_attention` until ``patcher`` restores;
    the stored value (``_attn_implementation_internal``) comes back exactly as it was."""
    _register_implementation()
    key = "_attn_implementation_internal"
    for c in _configs(config):
        had, previous = key in c.__dict__, c.__dict__.get(key)
        if previous == ATTN_IMPLEMENTATION:
            continue  # already switched by this installation (shared config)
        c.__dict__[key] = ATTN_IMPLEMENTATION

        def undo(c: Any = c, had: bool = had, previous: Any = previous) -> None:
            if had:
                c.__dict__[key] = previous
            else:
                c.__dict__.pop(key, None)

        patcher.add_undo(undo)


def activate_attention_rule(module: nn.Module, rule: MambaRule, patcher: Patcher) -> None:
    """Make ``rule`` the attention rule :func:`lrp_attention` applies for ``module`` until
    ``patcher`` restores (the previous rule, if any, comes back then)."""
    key, previous = id(module), _ACTIVE.get(id(module))
    _ACTIVE[key] = rule

    def undo() -> None:
        if previous is None:
            _ACTIVE.pop(key, None)
        else:
            _ACTIVE[key] = previous

    patcher.add_undo(undo)


class AttentionAdapter(Adapter):
    """transformers attention layers (``SUPPORTED_ATTENTION``): the attention rule on ``q, k, v``.

    The module's own forward still runs (projections, RoPE, norms, cache); only the attention
    function it calls is MambaLRP's. Its children (``q_proj`` ..., Qwen3's ``q_norm``/``k_norm``,
    Zamba2's LoRA adapters) are installed by the walk as usual.
    """

    label = "transformers attention (" + ", ".join(SUPPORTED_ATTENTION) + ")"
    recomputed_whole = True
    wraps_children = True

    def claims(self, module: nn.Module) -> bool:
        cls = type(module)
        return (
            cls.__name__ in SUPPORTED_ATTENTION
            and cls.__module__.startswith("transformers.")
            and hasattr(getattr(module, "config", None), "_attn_implementation_internal")
        )

    def affine_parts(self, module: nn.Module) -> Dict[str, nn.Module]:
        return {}

    def install(self, module: nn.Module, name: str, composite: Composite, patcher: Patcher, backend: str) -> List[Component]:
        rule = composite.rule_for(f"{name}.attention", ATTENTION, module)
        activate_attention_rule(module, rule, patcher)
        use_lrp_attention(module.config, patcher)
        return [Component(f"{name}.attention", ATTENTION, rule)]


def active_modules() -> Set[int]:
    """ids of the attention modules an installation holds now (empty after every restore)."""
    return set(_ACTIVE)


register(AttentionAdapter())
