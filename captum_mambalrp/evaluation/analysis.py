r"""Where relevance lies: along the sequence (distance from the explained position) and
through depth (relevance at every block with :class:`~captum_mambalrp.LayerMambaLRP`).

Distance profile: with ``p`` the explained (last real) position of an example, token ``s``
sits at distance ``p - s``. Each example's relevance is divided by ``sum_s |R_s|`` so that
every example weighs the same; the profile is the mean (and standard error) of that share
over the examples that have a token at each distance.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor, nn

from ..attribution.layer import LayerMambaLRP
from ..attribution.mamba_lrp import find_embedding


@dataclass
class Profile:
    """Mean normalised relevance per distance (``distance[i]`` tokens before the explained one)."""

    distance: np.ndarray
    mean: np.ndarray
    se: np.ndarray
    count: np.ndarray

    def as_dict(self) -> dict:
        return {k: getattr(self, k).tolist() for k in ("distance", "mean", "se", "count")}


def normalized_by_distance(relevance: Sequence[np.ndarray]) -> List[np.ndarray]:
    """Per example (real tokens only, in order), ``R / sum|R|`` re-indexed by distance
    from the last token (index 0 = the explained position itself)."""
    out = []
    for r in relevance:
        r = np.asarray(r, dtype=np.float64)
        total = np.abs(r).sum()
        out.append((r / total if total > 0 else r)[::-1])
    return out


def distance_profile(relevance: Sequence[np.ndarray], max_distance: Optional[int] = None) -> Profile:
    """The distance profile of per-example relevance vectors (real tokens, in order)."""
    rows = normalized_by_distance(relevance)
    width = max((len(r) for r in rows), default=0)
    width = width if max_distance is None else min(width, max_distance + 1)
    table = np.full((len(rows), width), np.nan)
    for i, r in enumerate(rows):
        table[i, : min(len(r), width)] = r[:width]
    count = (~np.isnan(table)).sum(0)
    mean = np.nanmean(table, axis=0) if len(rows) else np.zeros(0)
    std = np.array([np.nanstd(table[:, j], ddof=1) if count[j] > 1 else np.nan for j in range(width)])
    return Profile(np.arange(width), mean, std / np.sqrt(np.maximum(count, 1)), count)


def _mamba_mixers(model: nn.Module) -> List[str]:
    """Names of the modules an adapter takes over as a sequence mixer (not block wrappers)."""
    from ..adapters import find_adapter

    names = []
    for name, module in model.named_modules():
        adapter = find_adapter(module)
        if adapter is not None and not adapter.wraps_children:
            names.append(name)
    return names


def find_blocks(model: nn.Module, mamba_only: bool = False) -> List[Tuple[str, nn.Module]]:
    """The residual blocks of a model, in order: the entries of the first ``nn.ModuleList``
    that holds a Mamba mixer (one that an adapter of :mod:`captum_mambalrp.adapters` takes over).

    This finds ``backbone.layers`` of transformers' Mamba and Mamba2, ``layers`` of mamba-ssm
    and Vision Mamba, and the ``model.layers`` of hybrid models whose layer list mixes attention
    and Mamba layers: every entry is returned (relevance is conserved at each block output),
    or only the entries holding a Mamba mixer with ``mamba_only=True``. A model without such a
    list falls back to the modules with a ``mixer`` child.

    Returns:
        ``[(qualified name, block)]``, empty when the model has no Mamba mixer.

    >>> from torch import nn
    >>> find_blocks(nn.Sequential(nn.Linear(2, 2)))
    []
    """
    mixers = _mamba_mixers(model)
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or not len(module):
            continue
        prefix = f"{name}." if name else ""
        blocks = [(f"{prefix}{i}", block) for i, block in enumerate(module)]
        holds = [any(m == n or m.startswith(n + ".") for m in mixers) for n, _ in blocks]
        if any(holds):
            return [b for b, h in zip(blocks, holds) if h or not mamba_only]
    return [(name, m) for name, m in model.named_modules() if isinstance(getattr(m, "mixer", None), nn.Module)]


@dataclass
class LayerRelevance:
    """Token relevance at the embedding output and at each block output: ``relevance[k]``
    is ``[B, L]`` (summed over the hidden size) for ``names[k]``, and ``explained [B]``."""

    names: List[str]
    relevance: Tensor
    explained: Tensor

    def sums(self) -> Tensor:
        """``[K, B]`` total relevance per layer (equal across layers when conserved)."""
        return self.relevance.sum(-1)


def layer_relevance(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Optional[Tensor],
    target: Sequence[int],
    composite: str = "mambalrp",
) -> LayerRelevance:
    """MambaLRP relevance at the token embedding and after every block, in one pass."""
    blocks = find_blocks(model)
    embedding = find_embedding(model)
    if embedding is None:
        raise ValueError("cannot find the model's token embedding (get_input_embeddings())")
    layers: List[nn.Module] = [embedding] + [m for _, m in blocks]
    names = ["embedding"] + [n for n, _ in blocks]
    attr = LayerMambaLRP(model, layers, composite=composite)
    out, deltas = attr.attribute(input_ids, target=list(target), attention_mask=attention_mask, return_convergence_delta=True)
    relevance = torch.stack([r.sum(-1) for r in out])
    explained = deltas[0] + out[0].reshape(out[0].shape[0], -1).sum(1)
    return LayerRelevance(names, relevance.detach().float(), explained.detach().float())


def layer_profiles(per_layer: Dict[str, Sequence[np.ndarray]], max_distance: Optional[int] = None) -> Dict[str, Profile]:
    """The distance profile at every layer (``{layer name: per-example relevance}``)."""
    return {name: distance_profile(rows, max_distance) for name, rows in per_layer.items()}
