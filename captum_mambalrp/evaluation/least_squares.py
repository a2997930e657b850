r"""An exact weighted linear regression for Captum's ``KernelShap`` / ``Lime``.

KernelShap fits :math:`\min_{c, b} \sum_i w_i (y_i - b - z_i \cdot c)^2` over the sampled
coalitions ``z_i`` (binary), the model outputs ``y_i`` and the Shapley-kernel weights
``w_i``. Captum does it with scikit-learn by default; this closed-form solve (float64
least squares on ``sqrt(w)``-scaled rows) is the same fit with torch alone.
"""

from __future__ import annotations

from typing import Optional

import torch
from captum._utils.models.model import Model
from torch import Tensor
from torch.utils.data import DataLoader


class WeightedLeastSquares(Model):
    """Weighted least squares with an intercept; ``representation()`` is the ``[1, F]`` slope."""

    def __init__(self) -> None:
        self.coef: Optional[Tensor] = None
        self.intercept: Optional[Tensor] = None

    def fit(self, train_data: DataLoader, **kwargs: object) -> dict:
        xs, ys, ws = [], [], []
        for batch in train_data:
            x, y = batch[0], batch[1]
            w = batch[2] if len(batch) > 2 else torch.ones(x.shape[0])
            # solved on the CPU (gelsd is CPU-only; the system is coalitions x tokens, small)
            xs.append(x.reshape(x.shape[0], -1).detach().cpu().double())
            ys.append(y.reshape(-1).detach().cpu().double())
            ws.append(w.reshape(-1).detach().cpu().double())
        device = batch[0].device
        x, y, w = torch.cat(xs), torch.cat(ys), torch.cat(ws)
        design = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], dim=1)
        root = w.clamp(min=0).sqrt()[:, None]
        solution = torch.linalg.lstsq(design * root, y[:, None] * root, driver="gelsd").solution[:, 0]
        self.coef, self.intercept = solution[:-1].float().to(device), solution[-1].float().to(device)
        return {}

    def representation(self) -> Tensor:
        if self.coef is None:
            raise RuntimeError("fit() first")
        return self.coef[None]

    def __call__(self, x: Tensor) -> Tensor:  # type: ignore[override]
        if self.intercept is None:
            raise RuntimeError("fit() first")
        return x.reshape(x.shape[0], -1).float() @ self.representation().T + self.intercept
