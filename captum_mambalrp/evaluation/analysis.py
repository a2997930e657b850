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


def tensor_rows(relevance: Tensor, mask: Optional[Tensor]) -> List[np.ndarray]:
    """``[B, L]`` relevance to per-example arrays of the real tokens."""
    mask = torch.ones_like(relevance, dtype=torch.bool) if mask is None else mask.bool()
    return [relevance[i][mask[i]].detach().cpu().double().numpy() for i in range(relevance.shape[0])]


def find_blocks(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    """The residual blocks of a Mamba model: modules with a ``mixer`` child, in order."""
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
    layers = [find_embedding(model)] + [m for _, m in blocks]
    names = ["embedding"] + [n for n, _ in blocks]
    attr = LayerMambaLRP(model, layers, composite=composite)
    out, deltas = attr.attribute(input_ids, target=list(target), attention_mask=attention_mask, return_convergence_delta=True)
    relevance = torch.stack([r.sum(-1) for r in out])
    explained = deltas[0] + out[0].reshape(out[0].shape[0], -1).sum(1)
    return LayerRelevance(names, relevance.detach().float(), explained.detach().float())


def layer_profiles(per_layer: Dict[str, Sequence[np.ndarray]], max_distance: Optional[int] = None) -> Dict[str, Profile]:
    """The distance profile at every layer (``{layer name: per-example relevance}``)."""
    return {name: distance_profile(rows, max_distance) for name, rows in per_layer.items()}
