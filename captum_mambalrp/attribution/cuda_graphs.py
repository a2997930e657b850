"""CUDA-graph replay of MambaLRP's pass: ``MambaLRP(model, cuda_graph=True)``.

One attribution launches a few dozen kernels per layer; at a few thousand tokens the GPU
then waits for Python more than it computes. With ``cuda_graph=True`` the first call for
an *input signature* (the shapes, dtypes and devices of the forward's tensors, its plain
arguments, the model's weights and rules) runs eagerly, on a side stream, which also
warms up Triton's and mamba-ssm's kernels, and then records the same pass, on static
copies of its inputs, as a CUDA graph. A later call with that signature copies its tensors
and targets into the static buffers and replays the graph: the same kernels, launched
without Python in between. Results are copied out, so they stay valid after the next call.

The targets are part of the graph's inputs, not of its signature: each call may explain
other classes or positions (``classes < 0`` means "the predicted class", picked on the
device). A graph keeps the memory of one pass (its own pool, shared by the graphs of one
cache); the cache keeps the :data:`GRAPH_CACHE_SIZE` most recently used.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Hashable, List, Optional, Tuple

import torch
from torch import Tensor

from .engine import Selector
from .inputs import ForwardCall
from .targets import TargetLike, TargetSelector, pick_scores, plan_targets

#: graphs kept per ``MambaLRP`` instance (least recently used dropped first)
GRAPH_CACHE_SIZE = 8

PassFn = Callable[[ForwardCall, Selector], Tuple[Tensor, Tensor]]
_PLAIN = (type(None), bool, int, float, str)


def _slots(call: ForwardCall) -> List[Any]:
    """The forward's arguments in a fixed order: positional, keywords (sorted), the mask."""
    return [*call.args, *(call.kwargs[k] for k in sorted(call.kwargs)), call.mask]


def signature(call: ForwardCall) -> Tuple[Hashable, ...]:
    """What a graph is recorded for: tensors by shape, dtype and device; plain values as they are."""
    sig: List[Hashable] = [call.token_ids, tuple(sorted(call.kwargs)), len(call.args)]
    for value in _slots(call):
        if isinstance(value, Tensor):
            sig.append(("tensor", tuple(value.shape), value.dtype, value.device, value.requires_grad))
        elif isinstance(value, _PLAIN):
            sig.append(value)
        else:
            raise TypeError(
                f"cuda_graph=True: a forward argument of type {type(value).__name__} cannot be part of a "
                "CUDA graph's inputs; pass tensors or plain values (None, bool, int, float, str), or use "
                "cuda_graph=False"
            )
    return tuple(sig)


def static_copy(call: ForwardCall) -> Tuple[ForwardCall, List[Tensor]]:
    """``call`` with each tensor replaced by a copy the graph reads, and those copies in slot order."""
    buffers: List[Tensor] = []

    def static(value: Any) -> Any:
        if not isinstance(value, Tensor):
            return value
        buffers.append(value.detach().clone())
        return buffers[-1]

    args = tuple(static(a) for a in call.args)
    kwargs = {k: static(call.kwargs[k]) for k in sorted(call.kwargs)}
    mask = static(call.mask)
    return ForwardCall(args, kwargs, mask, call.token_ids, call.last_logits), buffers


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    buffers: List[Tensor]
    positions: Tensor
    classes: Tensor
    score_shape: Tuple[int, ...]
    relevance: Tensor
    explained: Tensor


class GraphCache:
    """CUDA graphs of one attribution pass, keyed by input signature (least recently used out)."""

    def __init__(self, size: int = GRAPH_CACHE_SIZE) -> None:
        self.size = size
        self._graphs: OrderedDict[Hashable, _Graph] = OrderedDict()
        self._pool: Optional[Any] = None  # torch.cuda.graph_pool_handle()
        self._state: Hashable = None
        self.captures = 0  # graphs recorded so far
        self.replays = 0

    def __len__(self) -> int:
        return len(self._graphs)

    def clear(self) -> None:
        """Drop every graph (and, once no graph holds it, their memory)."""
        self._graphs.clear()
        self._pool = None

    def relevance(self, call: ForwardCall, target: TargetLike, run: PassFn, state: Hashable) -> Tuple[Tensor, Tensor]:
        """``run(call, selector)`` through a graph: replayed when one exists for this call's
        signature, else computed eagerly and recorded. ``state`` names what the graphs
        depend on besides the call (weights, rules); when it changes, every graph is dropped."""
        if state != self._state:
            self.clear()
            self._state = state
        key = signature(call)
        entry = self._graphs.get(key)
        if entry is None:
            return self._record(key, call, target, run)
        self._graphs.move_to_end(key)
        plan = plan_targets(entry.score_shape, target, call.target_mask)
        positions, classes = plan.tensors(entry.positions.device)
        with torch.no_grad():
            for buffer, value in zip(entry.buffers, (v for v in _slots(call) if isinstance(v, Tensor))):
                buffer.copy_(value)
            entry.positions.copy_(positions)
            entry.classes.copy_(classes)
        entry.graph.replay()
        self.replays += 1
        return entry.relevance.clone(), entry.explained.clone()

    def _record(self, key: Hashable, call: ForwardCall, target: TargetLike, run: PassFn) -> Tuple[Tensor, Tensor]:
        device = next(v for v in _slots(call) if isinstance(v, Tensor)).device
        current = torch.cuda.current_stream(device)
        side = torch.cuda.Stream(device)
        side.wait_stream(current)
        with torch.cuda.stream(side):
            # the eager pass: this call's answer, and the warm-up (kernel compilation,
            # autotuning, workspaces) that must not happen while recording
            selector = TargetSelector(target, call.target_mask)
            result = run(call, selector)
            static_call, buffers = static_copy(call)
            plan = selector.plan
            assert plan is not None  # planned by the eager pass
            positions, classes = plan.tensors(device)
        current.wait_stream(side)
        for t in result:
            t.record_stream(current)
        graph = torch.cuda.CUDAGraph()
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        score_shape: List[Tuple[int, ...]] = []

        def select(scores: Tensor) -> Tensor:
            score_shape.append(tuple(scores.shape))
            return pick_scores(scores, positions, classes)[0]

        try:
            with torch.cuda.graph(graph, pool=self._pool):
                relevance, explained = run(static_call, select)
        except RuntimeError as e:
            raise RuntimeError(
                f"cuda_graph=True: recording the attribution as a CUDA graph failed ({str(e).splitlines()[0]}). Something in the "
                "model's forward synchronises with the CPU (.item(), .tolist(), printing a tensor, a branch on "
                "a tensor's value) or is not allowed in a graph; use cuda_graph=False for this model."
            ) from e
        self._graphs[key] = _Graph(graph, buffers, positions, classes, score_shape[0], relevance, explained)
        self.captures += 1
        while len(self._graphs) > self.size:
            self._graphs.popitem(last=False)
        return result
