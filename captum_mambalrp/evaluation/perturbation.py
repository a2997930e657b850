r"""Faithfulness by input perturbation: token flipping (deletion) and insertion curves.

Tokens are ranked by relevance. *Deletion* replaces them, a fraction ``f`` of the real
tokens per step, most relevant first (MoRF) or least relevant first (LeRF), and tracks
the explained logit ``s_k`` (the class explained, at the last real token). With the
fraction removed ``x_k = min(1, k f)``, ``k = 0..K``, ``K = ceil(1/f)``, the area is the
trapezoid rule

.. math:: A = \sum_k \tfrac{1}{2}(x_{k+1} - x_k)(s_k + s_{k+1}),

and the score of the paper is :math:`\Delta A^F = A(\text{LeRF}) - A(\text{MoRF})`
(higher is better: removing what the explanation calls relevant should hurt most).
*Insertion* starts from all real tokens replaced and puts them back in the same orders;
:math:`\Delta A^I = A_{ins}(\text{MoRF}) - A_{ins}(\text{LeRF})`.

Each distinct perturbed input is forwarded once, in batches of all examples: every curve
starts or ends at the unperturbed and at the fully replaced input, and an insertion curve
visits its deletion twin's inputs in reverse (inserting the most relevant ``j`` tokens keeps
what removing the least relevant ``n - j`` keeps, up to tied relevance and counts rounded
half-way), so the four curves of ``K + 1`` points cost about ``2K`` forwarded rows per
example, not ``4(K + 1)`` (fewer for texts of fewer than ``K`` tokens). A removed token becomes a
neutral token (``"token"``, by default the tokenizer's unknown token), a zero embedding
(``"zero"``) or the mean of the embedding matrix (``"mean"``); all three act on the
embeddings, so the model is fed ``inputs_embeds`` and the length never changes.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Dict, Optional, Sequence

import torch
from torch import Tensor, nn

from ..attribution.mamba_lrp import find_embedding
from .base import Reference
from .scores import LastTokenScores

REPLACEMENTS = ("token", "zero", "mean")  # the kinds of :class:`~.base.Reference`
CURVES = ("morf", "lerf", "morf_insert", "lerf_insert")


@dataclass
class Perturbation:
    """How tokens are removed.

    fraction_per_step: fraction of an example's real tokens removed per step (0.1: 11
        points per curve, from nothing to everything removed).
    replacement: ``"token"`` (the embedding of ``token_id``), ``"zero"`` or ``"mean"``.
    token_id: the neutral token for ``"token"``; ``None`` means :func:`neutral_token_id`.
    """

    fraction_per_step: float = 0.1
    replacement: str = "token"
    token_id: Optional[int] = None

    def __post_init__(self) -> None:
        if not 0 < self.fraction_per_step <= 1:
            raise ValueError(f"fraction_per_step must lie in (0, 1]; got {self.fraction_per_step}")
        if self.replacement not in REPLACEMENTS:
            raise ValueError(f"replacement must be one of {REPLACEMENTS}; got {self.replacement!r}")

    @property
    def steps(self) -> int:
        return math.ceil(1 / self.fraction_per_step - 1e-9)

    def grid(self) -> Tensor:
        """Fractions removed ``x_k``, ``k = 0..K``."""
        return (torch.arange(self.steps + 1, dtype=torch.float64) * self.fraction_per_step).clamp(max=1.0)

    def as_reference(self) -> Reference:
        """The replacement as a method reference (``compare --reference matched``)."""
        return Reference(self.replacement, 0 if self.token_id is None else self.token_id)

    def as_dict(self) -> dict:
        return asdict(self)


def neutral_token_id(tokenizer: object = None) -> int:
    """The tokenizer's unknown token, else its padding token, else 0."""
    for attr in ("unk_token_id", "pad_token_id"):
        value = getattr(tokenizer, attr, None)
        if isinstance(value, int):
            return value
    return 0


def reference_token_id(tokenizer: object = None) -> int:
    """The baselines' reference token: the tokenizer's padding token, else :func:`neutral_token_id`.

    The one fallback ``compare`` and the dashboard share.

    Returns:
        A token id.

    >>> reference_token_id(None)
    0
    """
    value = getattr(tokenizer, "pad_token_id", None)
    return value if isinstance(value, int) else neutral_token_id(tokenizer)


def replacement_vector(embedding: nn.Embedding, config: Perturbation) -> Tensor:
    """The embedding ``[H]`` a removed token takes (:meth:`~.base.Reference.vector`)."""
    token = 0 if config.token_id is None else config.token_id
    return Reference(config.replacement, token).vector(embedding)


def removal_ranks(
    relevance: Tensor, mask: Tensor, most_relevant_first: bool, generator: Optional[torch.Generator] = None
) -> Tensor:
    """Rank of each position in the removal order ``[B, L]`` (0 = removed first).

    Real tokens are ordered by relevance (descending for MoRF, ascending for LeRF);
    ties are broken at random with ``generator`` (else by position); padded positions
    rank last.
    """
    batch, length = relevance.shape
    key = torch.nan_to_num(relevance.double(), nan=0.0)
    key = key if most_relevant_first else -key
    key = key.masked_fill(~mask.bool(), -math.inf)
    if generator is None:
        perm = torch.arange(length).expand(batch, length)
    else:
        perm = torch.stack([torch.randperm(length, generator=generator) for _ in range(batch)])
    perm = perm.to(relevance.device)
    order = perm.gather(1, torch.argsort(key.gather(1, perm), dim=1, descending=True, stable=True))
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(length, device=order.device).expand(batch, length).contiguous())
    return ranks


def removed_counts(n_real: Tensor, config: Perturbation) -> Tensor:
    """Tokens removed at each step ``[K + 1, B]``: ``floor(x_k n + 1/2)`` (halves round up)."""
    return torch.floor(config.grid()[:, None] * n_real.double()[None, :] + 0.5 + 1e-9).long()


@torch.no_grad()
def perturbation_curves(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Optional[Tensor],
    relevance: Tensor,
    target: Tensor,
    config: Optional[Perturbation] = None,
    curves: Sequence[str] = CURVES,
    generator: Optional[torch.Generator] = None,
    embedding: Optional[nn.Embedding] = None,
) -> Dict[str, Tensor]:
    """Explained logit along each curve: ``{name: [B, K + 1]}`` (float64), for ``curves``
    among ``"morf"``, ``"lerf"`` (deletion) and ``"morf_insert"``, ``"lerf_insert"``.

    Each distinct perturbed input (per example) is forwarded once, ``len(curves)`` x the batch
    rows per forward (as many as one step of all curves).
    """
    config = config or Perturbation()
    unknown = [c for c in curves if c not in CURVES]
    if unknown:
        raise ValueError(f"unknown curves {unknown}; choose among {CURVES}")
    embedding = embedding or find_embedding(model)
    if embedding is None:
        raise ValueError("cannot find the model's token embedding; pass embedding=...")
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    real = mask.bool()
    ranks = {True: removal_ranks(relevance, mask, True, generator), False: removal_ranks(relevance, mask, False, generator)}
    counts = removed_counts(real.sum(1).cpu(), config).to(input_ids.device)
    embeds = embedding(input_ids)
    fill = replacement_vector(embedding, config).to(embeds.dtype)
    scorer = LastTokenScores(model)
    n, batch, length = len(curves), input_ids.shape[0], input_ids.shape[1]
    steps = config.steps + 1
    swap = torch.empty(steps, n, batch, length, dtype=torch.bool, device=input_ids.device)  # replaced positions
    for k in range(steps):
        m = counts[k][:, None]
        for c, name in enumerate(curves):
            first = ranks[name.startswith("morf")] < m
            swap[k, c] = first if not name.endswith("_insert") else real & ~first
    # one row per (example, replaced positions): the example's index, then its mask
    example = torch.arange(batch, device=input_ids.device).expand(steps, n, batch)
    keys = torch.cat([example.reshape(-1, 1), swap.reshape(-1, length).long()], dim=1)
    distinct, which = torch.unique(keys, dim=0, return_inverse=True)
    rows = distinct[:, 0]
    classes = target.to(input_ids.device)[rows]
    scores = torch.empty(len(distinct), dtype=torch.float64)
    chunk = n * batch
    for start in range(0, len(distinct), chunk):
        part = slice(start, start + chunk)
        x = torch.where(distinct[part, 1:].bool()[..., None], fill, embeds[rows[part]])
        got = scorer(x, mask[rows[part]])
        scores[part] = got[torch.arange(len(x), device=got.device), classes[part]].double().cpu()
    out = scores[which.cpu()].reshape(steps, n, batch).permute(1, 2, 0)
    return {name: out[i].contiguous() for i, name in enumerate(curves)}


def area(curve: Tensor, grid: Tensor) -> Tensor:
    """Trapezoid area under ``curve [..., K + 1]`` over the fractions ``grid``."""
    return torch.trapezoid(curve.double(), grid.double().to(curve.device), dim=-1)


def flipping_scores(curves: Dict[str, Tensor], config: Perturbation) -> Dict[str, Tensor]:
    r"""Areas of the curves present and the scores, each ``[B]``:

    - ``dAF`` = A(LeRF) - A(MoRF) and ``dAI`` = A_ins(MoRF) - A_ins(LeRF) (trapezoid areas);
    - ``AOPC`` (Samek et al. 2017), the area over the MoRF perturbation curve,
      :math:`\frac{1}{K+1}\sum_{k=0}^{K} (s_0 - s^{MoRF}_k)`;
    - ``ABPC`` (Schulz et al. 2020), the area between the curves,
      :math:`\frac{1}{K+1}\sum_{k=0}^{K} (s^{LeRF}_k - s^{MoRF}_k)` (ΔA^F with the mean of
      the points in place of the trapezoid rule).

    Higher is better for all four.

    >>> c = {"morf": torch.tensor([[2.0, 0.0, 0.0]]), "lerf": torch.tensor([[2.0, 2.0, 1.0]])}
    >>> {k: round(float(v), 3) for k, v in flipping_scores(c, Perturbation(0.5)).items()}
    {'A_morf': 0.5, 'A_lerf': 1.75, 'AOPC': 1.333, 'dAF': 1.25, 'ABPC': 1.0}
    """
    grid = config.grid()
    out = {f"A_{name}": area(c, grid) for name, c in curves.items()}
    if "morf" in curves:
        morf = curves["morf"].double()
        out["AOPC"] = (morf[:, :1] - morf).mean(-1)
    if "A_morf" in out and "A_lerf" in out:
        out["dAF"] = out["A_lerf"] - out["A_morf"]
        out["ABPC"] = (curves["lerf"].double() - curves["morf"].double()).mean(-1)
    if "A_morf_insert" in out and "A_lerf_insert" in out:
        out["dAI"] = out["A_morf_insert"] - out["A_lerf_insert"]
    return out
