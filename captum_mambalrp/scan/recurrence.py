"""The one linear recurrence every scan in this package is built on."""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor


def linear_recurrence(
    decay: Tensor, inputs: Tensor, h0: Optional[Tensor] = None, reverse: bool = False
) -> Tuple[Tensor, Tensor]:
    """``h_t = decay_t * h_{t-1} + inputs_t`` along dim ``-2`` (time).

    ``decay`` broadcasts against ``inputs`` (Mamba1: one decay per channel and state;
    Mamba2: one per head). With ``reverse=True`` the recurrence runs from the last step
    to the first (``h_t = decay_t * h_{t+1} + inputs_t``), which is the adjoint scan of
    the backward pass. Returns all states (shaped like ``inputs``) and the last one.
    Differentiable; under ``torch.no_grad`` it keeps no graph.
    """
    steps = inputs.shape[-2]
    h = torch.zeros_like(inputs.select(-2, 0)) if h0 is None else h0
    states = [h] * steps
    order = range(steps - 1, -1, -1) if reverse else range(steps)
    for t in order:
        h = torch.addcmul(inputs.select(-2, t), decay.select(-2, t), h)
        states[t] = h
    return torch.stack(states, dim=-2), h
