"""Running a batch in parts (``recompute="auto"``): where keeping every tensor of the whole
batch would not fit, but keeping them for fewer sequences would, the batch runs in parts of
as many sequences as fit, each a pass without recomputation, and the parts' relevance is put
back together. Each sequence's relevance is its own (the rules act per example; the explained
score is a sum over examples), so the result is the whole batch's, without the recomputation
that one pass over the batch would need. A part costs what a pass without recomputation costs
(on an H200 at Nemotron-H-8B shape, bf16: 2.30x the forward for one sequence of 4096 tokens,
where 16 of them in one recomputing pass took 2.66x; docs/benchmarks_history.md, run 8).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, List, Sequence, Tuple, Union

import torch
from torch import Tensor

from .inputs import ForwardCall
from .targets import TargetLike


def _part(value: Any, batch: int, start: int, end: int) -> Any:
    """``value`` for the examples ``start:end`` of a batch of ``batch``: a tensor whose first
    dimension is the batch is sliced, tuples and lists element by element; anything else
    (scalars, tensors of other shapes, a cache slot) passes unchanged."""
    if isinstance(value, Tensor):
        return value[start:end] if value.dim() >= 1 and value.shape[0] == batch else value
    if isinstance(value, tuple):
        return tuple(_part(v, batch, start, end) for v in value)
    if isinstance(value, list):
        return [_part(v, batch, start, end) for v in value]
    return value


def call_part(call: ForwardCall, batch: int, start: int, end: int) -> ForwardCall:
    """The forward call of examples ``start:end``."""
    return replace(
        call,
        args=_part(call.args, batch, start, end),
        kwargs={k: _part(v, batch, start, end) for k, v in call.kwargs.items()},
        mask=_part(call.mask, batch, start, end),
    )


def target_part(target: TargetLike, batch: int, start: int, end: int) -> TargetLike:
    """The target of examples ``start:end``: a per-example list or 1-D tensor is sliced; one
    target for all (``None``, a class, a ``(position, class)`` pair) is kept."""
    if isinstance(target, Tensor) and target.dim() == 1 and target.numel() == batch and batch > 1:
        return target[start:end]
    if isinstance(target, list) and len(target) == batch:
        return target[start:end]
    return target


def bounds(batch: int, size: int) -> List[Tuple[int, int]]:
    """``[(start, end), ...]`` covering ``batch`` examples in parts of ``size`` (the last shorter).

    >>> bounds(5, 2)
    [(0, 2), (2, 4), (4, 5)]
    """
    return [(s, min(s + size, batch)) for s in range(0, batch, size)]


def joined(parts: Sequence[Tuple[Union[Tensor, List[Tensor]], Tensor]]) -> Tuple[Any, Tensor]:
    """The parts' results ``(relevance, explained)`` put back in batch order: one relevance
    tensor, or one per layer read (``LayerMambaLRP``)."""
    first = parts[0][0]
    explained = torch.cat([p[1] for p in parts])
    if isinstance(first, Tensor):
        return torch.cat([p[0] for p in parts]), explained  # type: ignore[misc]
    return [torch.cat([p[0][i] for p in parts]) for i in range(len(first))], explained  # type: ignore[index]
