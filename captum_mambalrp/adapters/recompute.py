"""Recomputing mixers in the backward pass (activation checkpointing), per instance."""

from __future__ import annotations

from typing import Callable, Union

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

Recompute = Union[bool, str]
#: with ``recompute="auto"``, mixers are recomputed when a batch holds more tokens than this
#: (per device type; others use "cpu"). A Mamba-130M-shaped model keeps about 1.5 MiB per
#: token without recomputation: 24 GiB at 16k tokens, a GPU's easy share, a CPU's whole RAM.
RECOMPUTE_AUTO_TOKENS = {"cuda": 16384, "cpu": 4096}


def check_recompute(recompute: Recompute) -> Recompute:
    if recompute not in (True, False, "auto"):
        raise ValueError(f"recompute must be True, False or 'auto'; got {recompute!r}")
    return recompute


def recomputing(forward: Callable[..., Tensor], recompute: Recompute) -> Callable[..., Tensor]:
    """``forward`` wrapped so that, when ``recompute`` applies, it keeps only its inputs
    for the backward pass and runs again there (``torch.utils.checkpoint``, non-reentrant).

    Memory kept per mixer drops from all its intermediate tensors to its input; the cost is
    one more mixer forward in the backward pass.
    """

    def run(hidden_states: Tensor, *args, **kwargs) -> Tensor:
        tokens = hidden_states.shape[0] * hidden_states.shape[1]
        limit = RECOMPUTE_AUTO_TOKENS.get(hidden_states.device.type, RECOMPUTE_AUTO_TOKENS["cpu"])
        if torch.is_grad_enabled() and (recompute is True or (recompute == "auto" and tokens > limit)):
            # mixers draw no random numbers: no RNG state to keep (and none to read while a
            # CUDA graph is being captured)
            return checkpoint(forward, hidden_states, *args, use_reentrant=False, preserve_rng_state=False, **kwargs)
        return forward(hidden_states, *args, **kwargs)

    return run
