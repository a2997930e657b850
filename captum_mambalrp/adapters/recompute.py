"""Recomputing mixers in the backward pass (activation checkpointing), per instance, and how
``recompute="auto"`` decides from memory.

Modes (``MambaLRP(model, recompute=...)``):

- ``False``: every mixer keeps its intermediate tensors for the backward pass (fastest);
- ``True``: each mixer keeps only its input and runs again in the backward pass
  (``torch.utils.checkpoint``, non-reentrant): one more mixer forward per layer;
- ``"offload"``: as ``True``, and the kept input waits in pinned host memory, copied back
  when the backward pass reaches the mixer (GPU memory: one mixer's working set plus the
  residual stream, not one input per layer);
- ``"auto"`` (default): chosen per pass from the memory it would need and the memory free,
  by :class:`RecomputePlan`.

**The estimate** (per mixer and token, :func:`mixer_bytes_per_token`). Kept without
recomputation: about ``in_proj.out_features * (3 * s_model + 2.75 * s_compute)`` bytes
(``s_model`` the model dtype's size, ``s_compute`` the compute dtype's: 4, or 8 for float64),
fitted with some margin to the peaks measured on the H200 at Mamba-130M shape (Mamba1 fp32
39 B per inner channel, bf16 30 B; Mamba2 37 and 25 B; this estimate: 46 and 34 B). Kept
with recomputation: the mixer's input, ``d_model * s_model``. The backward pass of one mixer
needs its kept tensors once more as working set.

**The decision** (:meth:`RecomputePlan.choose`, once per pass, at the first mixer call, when
the number of tokens is known): with ``budget = AUTO_MEMORY_FRACTION * available`` (CUDA:
free device memory plus what torch's caching allocator holds unused; CPU: ``MemAvailable``
of ``/proc/meminfo``, else ``DEFAULT_HOST_BUDGET``), keep everything when the sum over
mixers of what they keep, plus one mixer's working set, fits; else recompute when the inputs
plus one working set fit; else offload (CUDA only; on the CPU the host memory *is* the
budget, so it recomputes; nor when the parked inputs would not fit 85 % of the host's
``MemAvailable``). When even one mixer's working set is over the budget, it warns
(``ResourceWarning``) that the pass will likely run out of memory. Offloading is never chosen
while a CUDA graph is captured, nor when relevance is read inside a mixer.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Union

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ..scan.precision import compute_dtype

Recompute = Union[bool, str]
MODES = (True, False, "auto", "offload")
#: share of the available memory that ``"auto"`` plans to use
AUTO_MEMORY_FRACTION = 0.85
#: host memory assumed available when it cannot be read
DEFAULT_HOST_BUDGET = 16 * 2**30
#: without a pass plan (a mixer called outside :func:`relevance_pass`), ``"auto"`` falls back
#: to recomputing above this many tokens per batch (per device type; others use "cpu")
RECOMPUTE_AUTO_TOKENS = {"cuda": 16384, "cpu": 4096}


def check_recompute(recompute: Recompute) -> Recompute:
    """``recompute`` if it is a known mode.

    Returns:
        ``recompute``.

    Raises:
        ValueError: not one of ``True``, ``False``, ``"auto"``, ``"offload"``.
    """
    if not any(recompute is m if isinstance(m, bool) else recompute == m for m in MODES):
        raise ValueError(f"recompute must be True, False, 'auto' or 'offload'; got {recompute!r}")
    return recompute


def mixer_bytes_per_token(mixer: nn.Module, dtype: torch.dtype) -> Dict[str, float]:
    """Estimated bytes per token a mixer keeps for the backward pass: ``"kept"`` without
    recomputation, ``"input"`` with it (see the module docstring for the constants).

    Returns:
        ``{"kept": ..., "input": ...}`` (bytes per token).

    >>> m = nn.Module(); m.in_proj = nn.Linear(8, 32)
    >>> mixer_bytes_per_token(m, torch.float32)
    {'kept': 736.0, 'input': 32.0}
    """
    s_model = torch.tensor([], dtype=dtype).element_size()
    s_compute = torch.tensor([], dtype=compute_dtype(dtype)).element_size()
    proj = getattr(mixer, "in_proj", None)
    if isinstance(proj, nn.Linear):
        width, d_model = proj.out_features, proj.in_features
    else:  # an unknown mixer: count its largest linear layer
        linears = [m for m in mixer.modules() if isinstance(m, nn.Linear)]
        width = max((m.out_features for m in linears), default=0)
        d_model = max((m.in_features for m in linears), default=0)
    return {"kept": float(width * (3 * s_model + 2.75 * s_compute)), "input": float(d_model * s_model)}


def available_memory(device: torch.device) -> int:
    """Bytes a pass on ``device`` may still take: CUDA, free device memory plus what torch's
    caching allocator holds unused; elsewhere ``MemAvailable`` (Linux), else
    ``DEFAULT_HOST_BUDGET``."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return DEFAULT_HOST_BUDGET


@dataclass
class RecomputePlan:
    """The decision of ``recompute="auto"`` for one pass over ``mixers``.

    ``budget``: bytes the pass may take (default: ``AUTO_MEMORY_FRACTION *``
    :func:`available_memory` at the first mixer call); tests pass their own.
    ``allow_offload``: False when relevance is read inside a mixer (an offloaded mixer runs
    without a graph in the forward pass, so such a read would see none); ``"offload"`` then
    recomputes with its input kept on the device, and ``"auto"`` never chooses it.
    """

    mixers: Sequence[nn.Module]
    budget: Optional[float] = None
    allow_offload: bool = True
    mode: Optional[Recompute] = None
    needed: Dict[str, float] = field(default_factory=dict)

    def choose(self, hidden: Tensor) -> Recompute:
        """``False``, ``True`` or ``"offload"`` for a pass whose mixers see ``hidden [b, l, d]``
        (decided at the first call of a pass, then kept)."""
        if self.mode is not None:
            return self.mode
        tokens = hidden.shape[0] * hidden.shape[1]
        per = [mixer_bytes_per_token(m, hidden.dtype) for m in self.mixers] or [mixer_bytes_per_token(nn.Module(), hidden.dtype)]
        working = max(p["kept"] for p in per) * tokens  # one mixer's tensors during its backward pass
        keep = sum(p["kept"] for p in per) * tokens + working
        inputs = sum(p["input"] for p in per) * tokens + working
        budget = self.budget if self.budget is not None else AUTO_MEMORY_FRACTION * available_memory(hidden.device)
        # the offloaded inputs need host memory: sum of inputs (recompute's figure minus one working set)
        self.needed = {"keep": keep, "recompute": inputs, "offload": working, "budget": budget}
        if keep <= budget:
            self.mode = False
        elif inputs <= budget or hidden.device.type != "cuda" or not self.allow_offload:
            self.mode = True
        elif torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            self.mode = True  # no pinned host allocations inside a CUDA graph's capture
        elif inputs - working > AUTO_MEMORY_FRACTION * available_memory(torch.device("cpu")):
            self.mode = True  # the parked inputs would not fit the host's memory either
        else:
            self.mode = "offload"
        if working > budget:
            warnings.warn(
                f"MambaLRP: {tokens} tokens need about {working / 2**30:.1f} GiB for one mixer's backward pass "
                f"alone (estimate), more than the {budget / 2**30:.1f} GiB available; expect to run out of "
                "memory: attribute shorter inputs or smaller batches",
                ResourceWarning,
                stacklevel=2,
            )
        return self.mode


_PLAN: contextvars.ContextVar[Optional[RecomputePlan]] = contextvars.ContextVar("recompute_plan", default=None)


@contextlib.contextmanager
def planned(plan: RecomputePlan) -> Iterator[RecomputePlan]:
    """Mixers called inside the block decide ``"auto"`` by ``plan`` (set by the engine for
    one forward and backward pass).

    Returns:
        a context manager yielding ``plan``.
    """
    token = _PLAN.set(plan)
    try:
        yield plan
    finally:
        _PLAN.reset(token)


class _OffloadedMixer(torch.autograd.Function):
    """A mixer run without a graph, its input parked in pinned host memory; the backward
    pass copies it back, runs the mixer again with a graph and back-propagates through it."""

    @staticmethod
    def forward(ctx, hidden: Tensor, run: Callable[[Tensor], Tensor]) -> Tensor:  # type: ignore[override]
        ctx.run, ctx.device, ctx.dtype = run, hidden.device, hidden.dtype
        host = torch.empty(hidden.shape, dtype=hidden.dtype, pin_memory=hidden.is_cuda)
        ctx.host = host.copy_(hidden.detach(), non_blocking=hidden.is_cuda)
        with torch.no_grad():
            return run(hidden)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        hidden = ctx.host.to(ctx.device, non_blocking=True).requires_grad_(True)
        ctx.host = None
        with torch.enable_grad():
            out = ctx.run(hidden)
        (grad_hidden,) = torch.autograd.grad(out, hidden, grad)
        return grad_hidden, None


def offloaded(forward: Callable[..., Tensor], hidden_states: Tensor, *args, **kwargs) -> Tensor:
    """``forward(hidden_states, *args, **kwargs)`` keeping nothing on the device for the
    backward pass but the output's graph node: the input waits in pinned host memory."""
    return _OffloadedMixer.apply(hidden_states, lambda h: forward(h, *args, **kwargs))


def recomputing(forward: Callable[..., Tensor], recompute: Recompute) -> Callable[..., Tensor]:
    """``forward`` wrapped so that, when ``recompute`` applies, it keeps only its inputs
    for the backward pass and runs again there (``torch.utils.checkpoint``, non-reentrant),
    or parks them in host memory (``"offload"``).

    Memory kept per mixer drops from all its intermediate tensors to its input (to nothing on
    the device, offloaded); the cost is one more mixer forward in the backward pass (and two
    copies of its input, offloaded).
    """

    def run(hidden_states: Tensor, *args, **kwargs) -> Tensor:
        mode = recompute
        plan = _PLAN.get()
        if mode == "offload" and plan is not None and not plan.allow_offload:
            mode = True
        if mode == "auto":
            if plan is not None:
                mode = plan.choose(hidden_states)
            else:
                tokens = hidden_states.shape[0] * hidden_states.shape[1]
                mode = tokens > RECOMPUTE_AUTO_TOKENS.get(hidden_states.device.type, RECOMPUTE_AUTO_TOKENS["cpu"])
        if not torch.is_grad_enabled() or mode is False:
            return forward(hidden_states, *args, **kwargs)
        if mode == "offload":
            return offloaded(forward, hidden_states, *args, **kwargs)
        # mixers draw no random numbers: no RNG state to keep (and none to read while a
        # CUDA graph is being captured)
        return checkpoint(forward, hidden_states, *args, use_reentrant=False, preserve_rng_state=False, **kwargs)

    return run


def plan_for(
    model: nn.Module, mixer_names: List[str], read_at: Sequence[Optional[nn.Module]] = (), budget: Optional[float] = None
) -> RecomputePlan:
    """The ``"auto"`` plan of one pass over ``model``'s mixers (named as ``Installation.mixers``);
    ``read_at``: the modules where relevance is read (none inside a mixer, or no offloading).

    Returns:
        a :class:`RecomputePlan` (undecided until the first mixer call).
    """
    mixers = [model.get_submodule(n) for n in mixer_names]
    inside = {id(m) for mixer in mixers for m in mixer.modules()}
    return RecomputePlan(
        mixers,
        budget=budget if budget is not None else _env_budget(),
        allow_offload=not any(m is not None and id(m) in inside for m in read_at),
    )


def _env_budget() -> Optional[float]:
    """``CAPTUM_MAMBALRP_MEMORY_BUDGET`` (bytes) overrides the measured budget (benchmarks, tests)."""
    value = os.environ.get("CAPTUM_MAMBALRP_MEMORY_BUDGET")
    return float(value) if value else None
