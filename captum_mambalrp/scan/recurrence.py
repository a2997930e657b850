"""The one linear recurrence every torch scan in this package is built on.

Time is the *first* axis (time-major), so each step reads and writes one contiguous
slice ``[..., n]``: on the CPU a step is one fused ``addcmul`` on a block that stays
in cache, whatever the layout the caller started from.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def linear_recurrence(
    decay: Tensor, inputs: Tensor, h0: Optional[Tensor] = None, reverse: bool = False, inplace: bool = False
) -> Tensor:
    """All states of ``h_t = decay_t * h_{t-1} + inputs_t`` along dim 0 (time).

    ``decay[t]`` broadcasts against ``inputs[t]`` (Mamba1: one decay per channel and
    state; Mamba2: one per head). ``h0`` is the state before the first step (none: zero).

    With ``reverse=True`` the recurrence runs from the last step to the first,
    ``h_t = decay_t * h_{t+1} + inputs_t`` (the adjoint scan of the backward pass);
    ``decay`` may then have one entry fewer than ``inputs`` when ``h0`` is None (the
    last step has no successor).

    ``inplace=True`` overwrites ``inputs`` with the states and returns it (no graph;
    the memory-lean path of the relevance scan). Otherwise the result is a new,
    differentiable tensor (the plain-gradient ablation, which keeps every state).
    """
    steps = inputs.shape[0]
    if steps == 0:
        return inputs
    order = range(steps - 1, -1, -1) if reverse else range(steps)
    first = order[0]
    if inplace:
        if h0 is not None:
            inputs[first].addcmul_(decay[first], h0)
        prev = first
        for t in order[1:]:
            inputs[t].addcmul_(decay[t], inputs[prev])
            prev = t
        return inputs
    states = []
    h = h0
    for t in order:
        h = inputs[t] if h is None else torch.addcmul(inputs[t], decay[t], h)
        states.append(h)
    if reverse:
        states.reverse()
    return torch.stack(states, dim=0)
