r"""Conservation over a data set: does relevance sum to the explained logit?

For each example, ``total = sum_t R_t`` against ``explained = f_c(x)`` (the class logit
at the last real token). A conservative method lies on the diagonal (up to what biases
absorb); the report gives the mean absolute gap ``|explained - total|``, the median
relative gap ``|explained - total| / |explained|`` and the correlation of the two.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterable, Mapping, Tuple

import numpy as np
from torch import Tensor, nn

from ..attribution.mamba_lrp import MambaLRP

DEFAULT_COMPOSITES = {"mambalrp": "mambalrp", "gxi": "gradient"}


@dataclass
class ConservationReport:
    """Per-example explained logits and relevance sums of one method."""

    method: str
    explained: np.ndarray
    total: np.ndarray

    def summary(self) -> dict:
        gap = np.abs(self.explained - self.total)
        rel = gap / np.maximum(np.abs(self.explained), 1e-12)
        corr = float(np.corrcoef(self.explained, self.total)[0, 1]) if len(gap) > 1 else float("nan")
        return {
            "method": self.method,
            "n": int(len(gap)),
            "mean_abs_gap": float(gap.mean()),
            "median_rel_gap": float(np.median(rel)),
            "max_rel_gap": float(rel.max()),
            "pearson_r": corr,
        }


def conservation_report(
    model: nn.Module,
    batches: Iterable[Tuple[Tensor, Tensor, Tensor]],
    composites: Mapping[str, str] = DEFAULT_COMPOSITES,
) -> Dict[str, ConservationReport]:
    """The report for each ``{name: composite}`` over ``batches`` of ``(input_ids,
    attention_mask, target classes)``; one forward and one backward per batch and method."""
    methods = {name: MambaLRP(model, composite=c) for name, c in composites.items()}
    explained: Dict[str, list] = {n: [] for n in methods}
    totals: Dict[str, list] = {n: [] for n in methods}
    for ids, mask, target in batches:
        for name, lrp in methods.items():
            r, delta = lrp.attribute(ids, target=[int(t) for t in target], attention_mask=mask, return_convergence_delta=True)
            total = r.sum(-1)
            explained[name].append((total + delta).detach().double().cpu().numpy())
            totals[name].append(total.detach().double().cpu().numpy())
    return {n: ConservationReport(n, np.concatenate(explained[n]), np.concatenate(totals[n])) for n in methods}
