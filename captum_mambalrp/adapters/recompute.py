"""Recomputing mixers in the backward pass (activation checkpointing), per instance, and how
``recompute="auto"`` decides from memory. A hybrid's attention, MLP and expert layers are
recomputed whole whenever the mixers are (any mode but ``False``).

Modes (``MambaLRP(model, recompute=...)``):

- ``False``: every mixer keeps its intermediate tensors for the backward pass (fastest);
- ``True``: each mixer keeps only its input and runs again in the backward pass
  (``torch.utils.checkpoint``, non-reentrant): one more mixer forward per layer;
- ``"projection"``: as ``True``, and each mixer also keeps the outputs of its input and output
  projections (``in_proj``, ``out_proj``; the model's dtype), so the recomputation skips both
  matrix products, nearly all of a Mamba mixer's matrix work (``in_proj`` about two thirds,
  ``out_proj`` one third: LRP-epsilon's rule saves ``out_proj``'s output, so the recomputation
  ran that product too). Torch's selective activation checkpointing: every matrix product with
  one of the two weights as an operand (told by its memory, not its width) is saved, every
  other operation recomputed;
- ``"offload"``: as ``True``, and the kept input waits in pinned host memory, copied back
  when the backward pass reaches the mixer (GPU memory: one mixer's working set plus the
  residual stream, not one input per layer);
- ``"sequence"`` (or :class:`SequenceChunks` with settings): for sequences whose single
  mixer, or whose layer inputs, do not fit. (a) Each mixer runs in pieces of ``chunk``
  tokens, carrying its state from piece to piece (Mamba1: the conv's last ``k - 1`` inputs and
  the scan's state ``h``); the backward pass runs the pieces in reverse, each again from its
  input and start state, and hands the gradient of the start state to the piece before
  (:class:`_SequencePieces`): one piece's working set instead of the sequence's (Mamba2: the
  conv's last inputs of x, B, C and the SSD state ``[b, h, p, n]``). (b) The
  blocks around the mixers (transformers' ``MambaBlock``, ``FalconMambaBlock``,
  ``Mamba2Block``) run without a graph; the forward pass keeps the input of every
  ``stride``-th block (in pinned host memory on CUDA when the host holds them), and the
  backward pass recomputes each block's input from the nearest kept one (:class:`_Chain`).
  Relevance is unchanged (to rounding): it is the same modified gradient, the rules act per
  token and the carried state is exact. Mixers without a piece function (Mamba3, Vision
  Mamba's; transformers' Mamba, FalconMamba, Mamba2, the hybrids' SSM mixers and mamba-ssm's
  ``Mamba`` and ``Mamba2`` have one) are recomputed whole inside the recomputed blocks;
- ``"auto"`` (default): chosen per pass from the memory it would need and the memory free,
  by :class:`RecomputePlan`.

**The estimate** (per mixer and token, :func:`mixer_bytes_per_token`). Kept without
recomputation: about ``in_proj.out_features * (a * s_model + b * s_compute)`` bytes (``s_model``
the model dtype's size, ``s_compute`` the compute dtype's: 4, or 8 for float64). Where the fused
kernels run (CUDA with Triton, the default) ``(a, b)`` is fitted, 15 % over, to the peaks measured
on the H200 with them (2026-12-02, run 5 of docs/benchmarks_history.md, per unit of ``in_proj``'s width and
layer): Mamba1 and Mamba2 mixers ``(3.4, 0.5)`` (Falcon-Mamba-7B bf16 7.7 B, Mamba-130M fp32
13.6 B; Mamba2-2.7B bf16 7.6 B and Mamba2-130M fp32 13.9 B in run 6, since its gate and norm run
fused), other mixers (Mamba3, unknown ones) ``(3.4, 1.6)`` (fitted to Mamba2 before run 6);
elsewhere (torch's operations keep float32 copies) ``(3, 2.75)``, fitted earlier to the peaks
without the fused kernels (Mamba-130M shape: Mamba1 fp32 39 B per inner channel; a CPU pass of a
tiny FalconMamba keeps 19.9 B per unit of width, ``benchmarks/memory_estimate.py --modes``). Kept
with recomputation: the mixer's input, ``d_model * s_model``; in ``"projection"`` mode also
``in_proj``'s and ``out_proj``'s outputs, ``(d_model + in_width + out_width) * s_model`` in all
(``"output"``: input and ``out_proj``'s output only, ``(d_model + out_width) * s_model``). The
backward pass of one mixer needs its kept tensors once more as working set; with recomputation
``RECOMPUTE_WORKING`` (2) times them (the recomputed tensors and the gradients beside them).

What the layers around the mixers keep (attention, MLPs, experts: a hybrid's;
:func:`others_bytes_per_token`): per linear layer outside the mixers and the output head,
``(in_features + 2.5 * out_features) * s_model``; per fused experts weight ``[experts, out,
in]``, ``top_k`` times that; on the CPU, where attention runs ``scaled_dot_product_attention``'s
math kernel and keeps its weights, ``heads * length * s_compute`` per attention layer. That is
what they keep with ``recompute=False``. In every other mode they are recomputed whole with the
mixers (:func:`recomputing_layer`; a layer handed a cache keeps its tensors): each keeps its
input and its pre-norm's, ``d_model * (s_model + s_compute)`` (``d_model * s_model`` where the
fused kernels run: the fused norm keeps its factor, not its input; at the Nemotron-H-8B shape
the larger figure put the estimate 640 KiB per token over the H200's peaks, run 8 of
docs/benchmarks_history.md), and the largest one's tensors are counted once more as the working set
of its backward pass. In ``"projection"`` mode a recomputed layer may also keep the outputs of
its linear layers and of the fused attention (:func:`layer_product_bytes`); per value kept, an
MLP's products spare ``2 d f / (d + f)`` multiply-adds (``d_model`` ``d``, width ``f``): fewer
than a mixer's ``out_proj`` output (``d_inner``, ``2 d``), more than its ``in_proj`` output
(``d``) whenever ``f > d``, so ``auto``'s partial plan gives the layers their products after
every ``out_proj`` output and before any ``in_proj`` output. Against the saved tensors of a
relevance pass with ``recompute=True`` (CPU, float32, tiny Nemotron-H, Bamba, Granite-4.0-H,
Jamba at d_model 64, 256 tokens, each kept tensor counted once) the estimate of what the forward
pass keeps (mixer and layer inputs) is 0.64-0.75 times the measured bytes; keeping the layers'
tensors would add 5.2-14.6 times them (``benchmarks/memory_estimate.py``). Pure Mamba models
have none of these layers (their norms are in the mixers' fitted constants).

``"sequence"`` (:meth:`RecomputePlan._sequence_settings`), for ``T`` tokens in ``b`` rows, with
``R = d_model * s_compute`` (a block's input: the residual stream, float32 in a bf16 model with
``residual_in_fp32``) and ``I = d_model * s_model``: ``(on_device + slots + 1) * R * T`` for the
kept block inputs (``on_device``: ``ceil(blocks / stride)`` when they stay on the device, else
1, the chain's own input) plus ``(4 R + 4 I) * T`` for one block's backward pass (its input,
output, gradients and norm) plus one piece's working set, ``kept * b * chunk``. Against exact
peaks (torch's profiler, CPU, FalconMamba d_model 64, 8 blocks, 4096 tokens, pieces of 256,
one slot): each block input kept on the device adds 1.0 R; the rest measured 10.4 R in float32
and 7.9 R in bf16, estimated 11.4 R and 9.1 R.
Open settings: ``chunk`` so that a piece takes ``SEQUENCE_CHUNK_SHARE`` of the budget (a
multiple of ``MIN_SEQUENCE_CHUNK``), ``stride = ceil(sqrt(blocks))``, ``host`` when the kept
inputs fit 85 % of the host's ``MemAvailable`` (CUDA only), ``slots`` as many as the budget
leaves (at least 1, at most ``stride - 1``). Without such blocks: every mixer's input plus
``3 I T`` plus one piece. At the Falcon-Mamba-7B shape (bf16, 64 blocks, 2^19 tokens, 106 GiB
budget) this gives pieces of 25600 tokens, stride 8, 1 slot, inputs on the host, 102.6 GiB
(0.20 MiB per token).

**The decision** (:meth:`RecomputePlan.choose`, once per pass, at the first block or mixer call,
when the number of tokens is known): with ``budget = AUTO_MEMORY_FRACTION * available`` (CUDA:
free device memory plus what torch's caching allocator holds unused; CPU: ``MemAvailable`` of
``/proc/meminfo``, else ``DEFAULT_HOST_BUDGET``), keep everything when the sum over mixers of
what they keep, plus one mixer's working set, fits; else ``"projection"`` when the inputs and
both projections' outputs plus one working set fit (not while a CUDA graph is captured); else,
when the inputs plus one working set fit, ``"projection"`` in part: ``out_proj``'s output for as
many mixers as the rest of the budget holds (the first ``output_mixers`` called in the pass),
then a hybrid's recomputed layers' products for as many layers as the room left holds (the
first ``product_layers``), then ``in_proj``'s for as many as the rest holds (the first
``projection_mixers``); a mixer
that keeps neither is recomputed whole (recompute when none keeps anything). ``out_proj``'s
first: per value kept its output spares ``d_inner`` multiply-adds, ``in_proj``'s ``d_model``:
twice as many at the usual expansion of 2 (Falcon-Mamba-7B shape: ``out_proj``'s output is a
quarter of ``in_proj``'s and spares half its product); else offload when one working set fits the
device and the parked inputs 85 % of the host's ``MemAvailable`` (CUDA only, not while a CUDA
graph is captured); else ``"sequence"`` (where mixers have piece functions or blocks can be
recomputed; not while a CUDA graph is captured); else recompute. No token-count threshold. When
the chosen mode's own estimate is over the budget, it warns (``ResourceWarning``) that the pass
will likely run out of memory. Before a pass, ``MambaLRP`` asks the same estimate how many sequences of a
batch one pass can take keeping everything (:meth:`RecomputePlan.kept_batch`): where that is
fewer than the batch and at least one, the batch runs in parts of that size, each a pass
without recomputation (``attribution/batching.py``). Neither offloading nor ``"sequence"`` applies when relevance is
read inside a mixer (nor the block recomputation when it is read inside a block).
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import os
import warnings
import weakref
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from ..kernels import fused_kernels_on
from ..kernels.dispatch import conv_output_dtype
from ..scan.precision import compute_dtype
from .mamba3 import is_mamba3

#: the mode that runs mixers in pieces of the sequence and recomputes blocks from sparse checkpoints
SEQUENCE = "sequence"
#: the mode that recomputes the mixers but keeps their input and output projections' outputs
PROJECTION = "projection"
MODES = (True, False, "auto", PROJECTION, "offload", SEQUENCE)
#: share of the available memory that ``"auto"`` plans to use
AUTO_MEMORY_FRACTION = 0.85
#: host memory assumed available when it cannot be read
DEFAULT_HOST_BUDGET = 16 * 2**30
#: without a pass plan (a mixer called outside :func:`relevance_pass`), ``"auto"`` falls back
#: to recomputing above this many tokens per batch (per device type; others use "cpu")
RECOMPUTE_AUTO_TOKENS = {"cuda": 16384, "cpu": 4096}
#: tokens per piece of ``"sequence"`` without a pass plan (a mixer called outside :func:`relevance_pass`)
DEFAULT_SEQUENCE_CHUNK = 8192


#: pieces of the sequence are never shorter than this (unless the sequence is)
MIN_SEQUENCE_CHUNK = 256
#: share of the budget that one piece's working set may take when ``"auto"`` sizes the pieces
SEQUENCE_CHUNK_SHARE = 1 / 16
#: transformers' blocks that ``"sequence"`` recomputes from sparse checkpoints: each is
#: ``h + mixer(norm(h))`` and returns one tensor, the next block's input
CHAIN_BLOCKS = ("MambaBlock", "FalconMambaBlock", "Mamba2Block")


@dataclass(frozen=True)
class SequenceChunks:
    """``recompute="sequence"`` with its settings given (``None``: chosen from the memory budget).

    - ``chunk``: tokens per piece of the sequence; each mixer runs piece by piece, carrying its
      state (the conv's last ``k - 1`` inputs and the scan's state) from one to the next, so its
      working set, forward and backward, is one piece's;
    - ``stride``: the forward pass keeps the input of every ``stride``-th block
      (default ``ceil(sqrt(blocks))``); the others are recomputed from the nearest kept one
      in the backward pass;
    - ``slots``: block inputs a stretch's recomputation keeps on the device for the blocks
      after it (default: as many as the budget holds, at most ``stride - 1``);
    - ``host``: the kept inputs wait in pinned host memory (default: on CUDA when the host's
      memory holds them).

    Returns:
        a value for ``MambaLRP(model, recompute=...)``.

    >>> SequenceChunks(chunk=4096).chunk
    4096
    """

    chunk: Optional[int] = None
    stride: Optional[int] = None
    slots: Optional[int] = None
    host: Optional[bool] = None

    def __post_init__(self) -> None:
        for name in ("chunk", "stride", "slots"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"SequenceChunks({name}=...) must be a positive int; got {value!r}")


Recompute = Union[bool, str, SequenceChunks]


def is_sequence(recompute: object) -> bool:
    """Is ``recompute`` the ``"sequence"`` mode (the string or :class:`SequenceChunks`)?"""
    return isinstance(recompute, SequenceChunks) or (isinstance(recompute, str) and recompute == SEQUENCE)


def check_recompute(recompute: Recompute) -> Recompute:
    """``recompute`` if it is a known mode.

    Returns:
        ``recompute``.

    Raises:
        ValueError: not one of ``True``, ``False``, ``"auto"``, ``"projection"``, ``"offload"``,
            ``"sequence"`` or a :class:`SequenceChunks`.
    """
    if isinstance(recompute, SequenceChunks):
        return recompute
    if not any(recompute is m if isinstance(m, bool) else recompute == m for m in MODES):
        raise ValueError(
            "recompute must be True, False, 'auto', 'projection', 'offload', 'sequence' or a SequenceChunks(...); "
            f"got {recompute!r}"
        )
    return recompute


#: with recomputation (every mode but keeping), one mixer's working set counts this many times its
#: kept tensors: the recomputed tensors and, beside them, its backward pass's gradients and
#: temporaries. Fitted to the H200's peaks (Falcon-Mamba-7B bf16, ``recompute=True``, run 5: 24.8
#: GiB at 32768 tokens and 99.0 at 131072 where one working set gives 20.4 and 81.6, a gap of 0.98
#: and 0.97 working sets; with one, ``auto``'s partial plan at 131072 tokens, estimated 105.6 GiB,
#: ran out of memory at 117.1 in run 7: docs/benchmarks_history.md)
RECOMPUTE_WORKING = 2

#: ``(a, b)`` of the kept-bytes estimate per unit of ``in_proj``'s width (module docstring):
#: with the fused kernels, Mamba1 and Mamba2 mixers and others; without them
KEPT_FUSED = (3.4, 0.5)
KEPT_FUSED_OTHER = (3.4, 1.6)
KEPT_UNFUSED = (3.0, 2.75)


def _fused_mixer(mixer: nn.Module) -> bool:
    """Does the estimate's ``KEPT_FUSED`` fit ``mixer``? A Mamba1 mixer (``x_proj``) or a Mamba2 one
    (``in_proj`` and ``dt_bias``: transformers' and the hybrids', mamba-ssm's; not Mamba3, whose
    gate is not fused)."""
    if isinstance(getattr(mixer, "x_proj", None), nn.Linear):
        return True
    return isinstance(getattr(mixer, "in_proj", None), nn.Linear) and hasattr(mixer, "dt_bias") and not is_mamba3(mixer)


def mixer_bytes_per_token(
    mixer: nn.Module, dtype: torch.dtype, device: Union[torch.device, str, None] = None
) -> Dict[str, float]:
    """Estimated bytes per token a mixer keeps for the backward pass on ``device`` (default: the
    CPU): ``"kept"`` without recomputation, ``"input"`` with it, ``"projection"`` with it in
    ``"projection"`` mode (its input and its ``in_proj`` and ``out_proj`` outputs; infinite for a
    mixer without an ``in_proj`` linear layer, whose ``out_proj`` output alone is ``"output"``),
    ``"output"`` with it keeping only ``out_proj``'s output (its input and that output; infinite
    for a mixer without an ``out_proj`` linear layer); see the module docstring for the constants
    (and for a bf16 / fp16 model ``"kept"`` grows by the conv output's float32 bytes, unless
    ``CAPTUM_MAMBALRP_CONV_OUTPUT=model``).

    Returns:
        ``{"kept": ..., "input": ..., "projection": ..., "output": ...}`` (bytes per token).

    >>> m = nn.Module(); m.in_proj = nn.Linear(8, 32); m.out_proj = nn.Linear(16, 8)
    >>> mixer_bytes_per_token(m, torch.float32)
    {'kept': 736.0, 'input': 32.0, 'projection': 192.0, 'output': 64.0}
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
    out = getattr(mixer, "out_proj", None)
    out_width = out.out_features if isinstance(out, nn.Linear) else 0
    projection = float((d_model + width + out_width) * s_model) if isinstance(proj, nn.Linear) else math.inf
    output = float((d_model + out_width) * s_model) if isinstance(out, nn.Linear) else math.inf
    if fused_kernels_on(torch.device(device).type if device is not None else "cpu"):
        a, b = KEPT_FUSED if _fused_mixer(mixer) else KEPT_FUSED_OTHER
    else:
        a, b = KEPT_UNFUSED
    conv = getattr(mixer, "conv1d", None)
    wide_conv = 0.0  # bf16 / fp16 by default (CAPTUM_MAMBALRP_CONV_OUTPUT=compute): the conv output the rules keep is float32
    if isinstance(conv, nn.Conv1d) and conv_output_dtype(dtype) != dtype:
        wide_conv = float(conv.out_channels * (s_compute - s_model))
    return {
        "kept": float(width * (a * s_model + b * s_compute)) + wide_conv,
        "input": float(d_model * s_model),
        "projection": projection,
        "output": output,
    }


def _top_k(model: nn.Module, experts: nn.Module, n_experts: int) -> int:
    """Experts each token runs through: the config's ``num_experts_per_tok``, else the experts'
    own ``top_k``, else all of them (an upper bound)."""
    for source in (getattr(model, "config", None), experts):
        k = getattr(source, "num_experts_per_tok", None) or getattr(source, "top_k", None)
        if isinstance(k, int) and k > 0:
            return min(k, n_experts)
    return n_experts


def _layer_top_k(model: nn.Module, layer: nn.Module) -> int:
    """The experts each token runs through in ``layer`` (1 where it has no fused experts weight)."""
    fused = [w for w in layer.parameters() if w.dim() == 3]
    return _top_k(model, layer, int(fused[0].shape[0])) if fused else 1


def _heads(module: nn.Module) -> int:
    for source in (module, getattr(module, "config", None)):
        for attr in ("num_heads", "num_attention_heads", "n_heads"):
            value = getattr(source, attr, None)
            if isinstance(value, int) and value > 0:
                return value
    return 1


def others_bytes_per_token(
    model: nn.Module, mixers: Sequence[nn.Module], attention: Sequence[nn.Module], dtype: torch.dtype
) -> Tuple[float, float]:
    """Estimated bytes per token that the layers around the mixers keep for the backward pass
    (attention, MLPs, experts; see the module docstring), and the attention's bytes per token
    *per token of length* where its weights are kept (the CPU's math kernel; ``0`` on CUDA is
    the caller's choice).

    Returns:
        ``(per_token, per_token_and_length)``.

    >>> m = nn.Sequential(nn.Linear(8, 32), nn.Linear(32, 8))
    >>> others_bytes_per_token(m, [], [], torch.float32)
    (560.0, 0.0)
    """
    s_model = torch.tensor([], dtype=dtype).element_size()
    s_compute = torch.tensor([], dtype=compute_dtype(dtype)).element_size()
    inside = {id(m) for mixer in mixers for m in mixer.modules()}
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    # the output head (transformers' get_output_embeddings, or a module named lm_head as
    # mamba-ssm's) is left out, as by the mixers' fitted constants
    per_token = 0.0
    for name, module in model.named_modules():
        if id(module) in inside or module is head or name.rpartition(".")[2] == "lm_head":
            continue
        if isinstance(module, nn.Linear):
            per_token += (module.in_features + 2.5 * module.out_features) * s_model
        for weight in module.parameters(recurse=False):
            if weight.dim() == 3:  # fused experts [experts, out, in]
                n, out, inp = weight.shape
                per_token += _top_k(model, module, n) * (inp + 2.5 * out) * s_model
    per_length = float(sum(_heads(a) for a in attention) * s_compute)
    return float(per_token), per_length


def layer_product_bytes(layer: nn.Module, dtype: torch.dtype, attention: bool = False, top_k: int = 1) -> float:
    """Bytes per token that a recomputed ``layer`` (an attention, MLP or expert layer of a hybrid)
    keeps in ``"projection"`` mode: the outputs of its linear layers (model dtype), of its fused
    experts weights ``[experts, out, in]`` (``top_k`` rows of ``out`` per token) and, for an
    attention layer (``attention``), the fused attention's output (the output projection's input,
    model dtype) and log-sum-exp (float32 per head); see :data:`ATTENTION_OPS`.

    >>> mlp = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 8))
    >>> layer_product_bytes(mlp, torch.bfloat16)
    80.0
    """
    s_model = torch.tensor([], dtype=dtype).element_size()
    linears = [m for m in layer.modules() if isinstance(m, nn.Linear)]
    total = float(sum(m.out_features for m in linears) * s_model)
    total += sum(top_k * w.shape[1] * s_model for w in layer.parameters() if w.dim() == 3)
    if attention and linears:
        named = [getattr(layer, n, None) for n in ("o_proj", "out_proj", "dense")]
        out = next((m for m in named if isinstance(m, nn.Linear)), linears[-1])
        total += out.in_features * s_model + _heads(layer) * 4
    return total


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


def _product_bytes(per_token: Dict[str, float]) -> Tuple[float, float]:
    """Bytes per token that keeping ``in_proj``'s and ``out_proj``'s outputs adds to a recomputed
    mixer (``per_token`` from :func:`mixer_bytes_per_token`; infinite where it has no such layer).

    >>> _product_bytes({"kept": 736.0, "input": 32.0, "projection": 192.0, "output": 64.0})
    (128.0, 32.0)
    """
    output = per_token["output"] - per_token["input"]
    if not math.isfinite(per_token["projection"]):
        return math.inf, output
    return per_token["projection"] - per_token["input"] - (output if math.isfinite(output) else 0.0), output


@dataclass
class RecomputePlan:
    """The decision of ``recompute="auto"`` (and the settings of ``"sequence"``) for one pass
    over ``mixers``.

    ``budget``: bytes the pass may take (default: ``AUTO_MEMORY_FRACTION *``
    :func:`available_memory` at the first mixer call); tests pass their own.
    ``allow_offload``: False when relevance is read inside a mixer (an offloaded or
    sequence-chunked mixer runs without a graph in the forward pass, so such a read would see
    none); ``"offload"`` and ``"sequence"`` then recompute with the input kept on the device, and
    ``"auto"`` chooses neither. ``requested``: the mode asked for (``"auto"``, or ``"sequence"`` /
    a :class:`SequenceChunks` whose open settings the plan fills in). ``chain_blocks``: the blocks
    ``"sequence"`` recomputes from sparse checkpoints (see :data:`CHAIN_BLOCKS`); ``pieces``: do
    the mixers run in pieces of the sequence (their adapters provide a piece function)?
    """

    mixers: Sequence[nn.Module]
    budget: Optional[float] = None
    allow_offload: bool = True
    mode: Optional[Recompute] = None
    needed: Dict[str, float] = field(default_factory=dict)
    requested: Recompute = "auto"
    chain_blocks: int = 0
    pieces: bool = False
    sequence: Optional[SequenceChunks] = None
    chain: Optional[_Chain] = None
    #: bytes per token the layers around the mixers keep whatever the mode, and per token and
    #: token of length (attention weights kept on the CPU): :func:`others_bytes_per_token`
    others: float = 0.0
    others_per_length: float = 0.0
    #: with recomputation (every mode but False) the attention, MLP and expert layers that are
    #: recomputed whole (:func:`recomputing_layer`) keep their inputs only: ``layers`` of them,
    #: plus, during one's backward pass, the largest one's tensors (``layer_working`` per token,
    #: ``layer_working_per_length`` per token and token of length on the CPU); what lies outside
    #: them is kept as without recomputation (``others_outside``, ``others_outside_per_length``)
    layers: int = 0
    layer_working: float = 0.0
    layer_working_per_length: float = 0.0
    others_outside: float = 0.0
    others_outside_per_length: float = 0.0
    #: in ``"projection"`` mode: how many mixers keep ``out_proj``'s output (``output_mixers``) and
    #: how many ``in_proj``'s (``projection_mixers``), ``None``: all; the first ones called in the
    #: pass (:meth:`kept_products`); a mixer that keeps neither is recomputed whole
    output_mixers: Optional[int] = None
    projection_mixers: Optional[int] = None
    mixer_calls: int = 0
    #: bytes per token that each recomputed layer keeps in ``"projection"`` mode (its products,
    #: :func:`layer_product_bytes`), in the order the layers are called, and how many of them (the
    #: first ones called) keep them (``None``: all; :meth:`keeps_layer_products`)
    layer_products: List[float] = field(default_factory=list)
    product_layers: Optional[int] = None
    layer_calls: int = 0

    def kept_products(self) -> Tuple[bool, bool]:
        """In ``"projection"`` mode, which outputs the mixer called now keeps: ``(in_proj's,
        out_proj's)``. Counts the calls of a pass; the ``k``-th keeps ``out_proj``'s when
        ``k <= output_mixers`` and ``in_proj``'s when ``k <= projection_mixers`` (all do where
        the budget holds every mixer's, ``None``).

        Returns:
            ``(keeps in_proj's output, keeps out_proj's output)``.
        """
        self.mixer_calls += 1
        k = self.mixer_calls
        return (
            self.projection_mixers is None or k <= self.projection_mixers,
            self.output_mixers is None or k <= self.output_mixers,
        )

    def keeps_layer_products(self) -> bool:
        """In ``"projection"`` mode, does the recomputed layer called now keep its products? Counts
        the layer calls of a pass; the ``k``-th keeps them when ``k <= product_layers`` (all do
        where the budget holds every layer's, ``None``)."""
        self.layer_calls += 1
        return self.product_layers is None or self.layer_calls <= self.product_layers

    def _partial_projection(self, per: List[Dict[str, float]], tokens: int, room: float) -> float:
        """Fill ``room`` bytes (the budget beyond recomputing) with kept products, the mixers and
        layers in the order they are called: ``out_proj``'s output for as many mixers as it holds,
        then the recomputed layers' products for as many layers as the rest holds, then
        ``in_proj``'s output (the work each spares per byte kept, highest first: module docstring).
        Sets :attr:`output_mixers`, :attr:`product_layers`, :attr:`projection_mixers` (``None``
        where all keep it) and the mode (``"projection"`` if anything is kept, else ``True``).

        Returns:
            the room left (bytes).
        """
        groups = (
            [_product_bytes(p)[1] for p in per],  # out_proj's output
            list(self.layer_products),
            [_product_bytes(p)[0] for p in per],  # in_proj's output
        )
        counts = []
        for costs in groups:
            count = 0
            for cost in costs:
                if cost * tokens > room:
                    break
                room -= cost * tokens
                count += 1
            counts.append(count)
        outputs, layers, projections = counts
        if outputs or layers or projections:
            self.mode = PROJECTION
            self.output_mixers = None if outputs == len(per) else outputs
            self.product_layers = None if layers == len(self.layer_products) else layers
            self.projection_mixers = None if projections == len(per) else projections
        else:
            self.mode = True
        return room

    def choose(self, hidden: Tensor) -> Recompute:
        """``False``, ``"projection"``, ``True``, ``"offload"`` or ``"sequence"`` for a pass whose mixers (or
        blocks) see ``hidden [b, l, d]`` (decided at the first call of a pass, then kept)."""
        if self.mode is not None:
            return self.mode
        return self._decide(hidden)

    def _decide(self, hidden: Tensor) -> Recompute:
        """:meth:`choose`'s decision (also asked by :meth:`keeps_everything` of a copy)."""
        batch, length = hidden.shape[0], hidden.shape[1]
        tokens = batch * length
        device = hidden.device
        per = [mixer_bytes_per_token(m, hidden.dtype, device) for m in self.mixers] or [
            mixer_bytes_per_token(nn.Module(), hidden.dtype, device)
        ]
        cuda = hidden.device.type == "cuda"
        # the layers around the mixers: everything kept without recomputation (attention weights:
        # CPU only); with it, the recomputed layers' inputs and one layer's working set
        cpu_length = 0.0 if cuda else float(length)
        kept_all = (self.others + self.others_per_length * cpu_length) * tokens
        # a recomputed layer keeps its input, and its pre-norm (outside it) the norm's input, except
        # where the fused norm runs (it keeps its factor only: run 8 of docs/benchmarks_history.md)
        s_compute = torch.tensor([], dtype=compute_dtype(hidden.dtype)).element_size()
        s_norm = 0 if fused_kernels_on(device.type) else s_compute
        layer_input = hidden.shape[-1] * (torch.tensor([], dtype=hidden.dtype).element_size() + s_norm)
        fixed = (
            self.others_outside
            + self.others_outside_per_length * cpu_length
            + self.layers * layer_input
            + self.layer_working
            + self.layer_working_per_length * cpu_length
        ) * tokens
        working = max(p["kept"] for p in per) * tokens  # one mixer's tensors during its backward pass
        keep = sum(p["kept"] for p in per) * tokens + working + kept_all
        working *= RECOMPUTE_WORKING  # a recomputed mixer's tensors and its backward pass's gradients
        inputs = sum(p["input"] for p in per) * tokens + working + fixed
        # "projection": the mixers' products and the recomputed layers'
        projection = (sum(p["projection"] for p in per) + sum(self.layer_products)) * tokens + working + fixed
        working += fixed  # what offloading needs on the device
        budget = self.budget if self.budget is not None else AUTO_MEMORY_FRACTION * available_memory(hidden.device)
        capturing = cuda and torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()
        host_budget = AUTO_MEMORY_FRACTION * available_memory(torch.device("cpu")) if cuda and not capturing else 0.0
        settings, sequence = self._sequence_settings(per, hidden, budget, host_budget)
        sequence += fixed
        # offload keeps no mixer tensor on the device, the parked inputs (recompute's figure minus
        # one working set) in host memory; its device need is one mixer's working set
        self.needed = {
            "keep": keep,
            "projection": projection,
            "recompute": inputs,
            "offload": working,
            "sequence": sequence,
            "others": fixed,
            "others_kept": kept_all,
            "budget": budget,
        }
        offload_fits = cuda and self.allow_offload and not capturing and working <= budget and inputs - working <= host_budget
        sequence_ok = self.allow_offload and (self.pieces or self.chain_blocks > 0)
        if is_sequence(self.requested):
            self.mode = SEQUENCE if self.allow_offload else True
        elif keep <= budget:
            self.mode = False
        elif projection <= budget and not capturing:
            self.mode = PROJECTION
        elif inputs <= budget:
            self.mode = True
            if (self.mixers or self.layer_products) and not capturing:  # as many kept products as the rest holds
                room = self._partial_projection(per, tokens, budget - inputs)
                if self.mode == PROJECTION:
                    self.needed["projection_partial"] = budget - room
        elif offload_fits:
            self.mode = "offload"
        elif sequence_ok and not capturing:
            self.mode = SEQUENCE
        else:
            self.mode = True
        if self.mode == SEQUENCE:
            self.sequence = settings
        if "projection_partial" in self.needed:
            projection = self.needed["projection_partial"]
        need = {False: keep, True: inputs, PROJECTION: projection, "offload": working, SEQUENCE: sequence}[self.mode]  # type: ignore[index]
        if need > budget:
            warnings.warn(
                f"MambaLRP: {tokens} tokens need about {need / 2**30:.1f} GiB (estimate, recompute={self.mode!r}), "
                f"more than the {budget / 2**30:.1f} GiB available; expect to run out of "
                "memory: attribute shorter inputs or smaller batches",
                ResourceWarning,
                stacklevel=2,
            )
        return self.mode

    def keeps_everything(self, batch: int, length: int, width: int, dtype: torch.dtype, device: torch.device) -> bool:
        """Would a pass over ``batch`` sequences of ``length`` tokens (hidden size ``width``) keep
        every tensor (``choose`` giving ``False``) with the memory available now? Asked of a fresh
        copy of this plan (this one stays undecided), without the over-budget warning."""
        from types import SimpleNamespace

        probe = replace(self, mode=None, needed={}, mixer_calls=0, layer_calls=0, chain=None, sequence=None)
        hidden = SimpleNamespace(shape=(batch, length, width), dtype=dtype, device=device)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ResourceWarning)
            return probe._decide(hidden) is False  # type: ignore[arg-type]

    def kept_batch(self, batch: int, length: int, width: int, dtype: torch.dtype, device: torch.device) -> int:
        """The largest number of the ``batch`` sequences that one pass can take keeping every
        tensor (:meth:`keeps_everything`; the need grows with the tokens), ``0`` if not even one.
        ``MambaLRP`` runs a batch over the limit in parts of this size (``recompute="auto"``)."""
        if self.keeps_everything(batch, length, width, dtype, device):
            return batch
        low, high = 0, batch  # keeps(low) (or low == 0), not keeps(high)
        while high - low > 1:
            mid = (low + high) // 2
            if self.keeps_everything(mid, length, width, dtype, device):
                low = mid
            else:
                high = mid
        return low

    def _sequence_settings(
        self, per: List[Dict[str, float]], hidden: Tensor, budget: float, host_budget: float
    ) -> Tuple[SequenceChunks, float]:
        """The settings of ``"sequence"`` for this pass (the requested ones, the open ones from the
        budget) and its estimated device memory (see the module docstring)."""
        asked = self.requested if isinstance(self.requested, SequenceChunks) else SequenceChunks()
        batch, length, d_model = hidden.shape[0], hidden.shape[1], hidden.shape[-1]
        tokens = batch * length
        s_model = torch.tensor([], dtype=hidden.dtype).element_size()
        s_compute = torch.tensor([], dtype=compute_dtype(hidden.dtype)).element_size()
        residual, mixer_in = d_model * s_compute * tokens, d_model * s_model * tokens  # R T, I T
        piece_per_token = max(p["kept"] for p in per) * batch  # one piece's working set per token of length
        chunk = asked.chunk
        if chunk is None:
            chunk = int(SEQUENCE_CHUNK_SHARE * budget / max(piece_per_token, 1.0))
            chunk = max(MIN_SEQUENCE_CHUNK, chunk // MIN_SEQUENCE_CHUNK * MIN_SEQUENCE_CHUNK)
        chunk = min(chunk, max(length, 1))
        # one piece's working set; mixers without a piece function work on the whole sequence
        piece = piece_per_token * (chunk if self.pieces else length)
        n = self.chain_blocks
        if n == 0:  # no chain: every mixer keeps its input; one mixer's backward works on pieces
            sequence = sum(p["input"] for p in per) * tokens + 3 * mixer_in + piece
            return SequenceChunks(chunk, 1, 1, False), float(sequence)
        stride = asked.stride or max(1, math.ceil(math.sqrt(n)))
        kept = math.ceil(n / stride)  # forward checkpoints (the first is the chain's own input)
        host = asked.host if asked.host is not None else hidden.device.type == "cuda" and (kept - 1) * residual <= host_budget
        cuda = hidden.device.type == "cuda"
        if cuda and torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            host = False  # no pinned host allocations inside a CUDA graph's capture
        on_device = 1 if host else kept
        block = 4 * residual + 4 * mixer_in  # one block's backward: gradients, its input and output, the norm
        slots = asked.slots
        if slots is None:
            free = (budget - block - piece) / residual - on_device - 1
            slots = int(max(1, min(stride - 1, math.floor(free))))
        sequence = (on_device + slots + 1) * residual + block + piece
        return SequenceChunks(chunk, stride, slots, bool(host)), float(sequence)


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


#: the signature of a mixer's piece function (the adapter's ``forward.sequence_piece``):
#: ``piece(hidden [b, l, d], attention_mask [b, l] or None, state or None, carry) -> (out, state or None)``,
#: ``state`` a tuple of tensors (Mamba1: the conv's last inputs and the scan's state)
Piece = Callable[[Tensor, Optional[Tensor], Optional[Tuple[Tensor, ...]], bool], Tuple[Tensor, Optional[Tuple[Tensor, ...]]]]


#: the keyword arguments a mixer without its own ``sequence_piece_accepts`` may be called with
#: and still run in pieces (a cache only when ``None``); any other recomputes it whole
PIECE_KWARGS = frozenset({"attention_mask", "cache", "cache_params", "cache_position"})


def _plain_call(kwargs: Dict[str, Any]) -> bool:
    return set(kwargs) <= PIECE_KWARGS and kwargs.get("cache") is None and kwargs.get("cache_params") is None


def _bounds(length: int, chunk: int) -> List[Tuple[int, int]]:
    return [(s, min(s + chunk, length)) for s in range(0, length, chunk)]


def _mask_piece(mask: Optional[Tensor], s: int, e: int) -> Optional[Tensor]:
    return None if mask is None else mask[:, s:e]


def _pieces_without_graph(piece: Piece, hidden: Tensor, mask: Optional[Tensor], chunk: int, states: Optional[list]) -> Tensor:
    """The mixer over the whole sequence, piece by piece, without a graph (``states``, when
    given, receives the state each piece starts from)."""
    out: Optional[Tensor] = None
    state = None
    bounds = _bounds(hidden.shape[1], chunk)
    with torch.no_grad():
        for k, (s, e) in enumerate(bounds):
            if states is not None:
                states.append(state)
            y, state = piece(hidden[:, s:e], _mask_piece(mask, s, e), state, k + 1 < len(bounds))
            if out is None:
                out = y.new_empty((y.shape[0], hidden.shape[1]) + tuple(y.shape[2:]))
            out[:, s:e] = y
    assert out is not None
    return out


class _SequencePieces(torch.autograd.Function):
    """A mixer run in pieces of the sequence. Forward: the pieces one after the other without a
    graph, keeping the mixer's input and the (small) state each piece starts from. Backward: the
    pieces in reverse; each runs again from its input and start state with a graph, and
    back-propagates the gradient of its output and of the state it handed on (computed by the
    piece after it) to its input and its start state (handed to the piece before it). The
    gradient is the unchunked pass's: the rules act per token, the state carries the rest."""

    @staticmethod
    def forward(ctx, hidden: Tensor, piece: Piece, mask: Optional[Tensor], chunk: int) -> Tensor:  # type: ignore[override]
        states: list = []
        out = _pieces_without_graph(piece, hidden, mask, chunk, states)
        ctx.save_for_backward(hidden)
        ctx.piece, ctx.mask, ctx.chunk, ctx.states = piece, mask, chunk, states
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        (hidden,) = ctx.saved_tensors
        bounds = _bounds(hidden.shape[1], ctx.chunk)
        grad_hidden = torch.empty_like(hidden)
        carried: Optional[Tuple[Tensor, ...]] = None  # gradient for the state the current piece hands on
        for k in range(len(bounds) - 1, -1, -1):
            s, e = bounds[k]
            x = hidden[:, s:e].detach().requires_grad_(True)
            start = ctx.states[k]
            start = None if start is None else tuple(t.detach().requires_grad_(True) for t in start)
            with torch.enable_grad():
                y, state = ctx.piece(x, _mask_piece(ctx.mask, s, e), start, carried is not None)
            outputs, grads = [y], [grad[:, s:e]]
            if carried is not None and state is not None:
                outputs += list(state)
                grads += list(carried)
            wrt = [x] + ([] if start is None else list(start))
            found = torch.autograd.grad(outputs, wrt, grads, allow_unused=True)
            grad_hidden[:, s:e] = torch.zeros_like(x) if found[0] is None else found[0]
            if start is not None:
                carried = tuple(torch.zeros_like(t) if g is None else g for t, g in zip(start, found[1:]))
            ctx.states[k] = None  # done with it
        ctx.states = None
        return grad_hidden, None, None, None


def in_pieces(piece: Piece, hidden: Tensor, attention_mask: Optional[Tensor], chunk: int) -> Tensor:
    """A mixer's output over ``hidden [b, l, d]``, computed in pieces of ``chunk`` tokens with its
    state carried between them (``recompute="sequence"``): without a graph when no gradient is
    needed, else through :class:`_SequencePieces` (keeps the input and the pieces' start states).

    Returns:
        the mixer's output ``[b, l, ...]``, the same (to rounding) as the unchunked forward's.
    """
    if not (torch.is_grad_enabled() and hidden.requires_grad):
        return _pieces_without_graph(piece, hidden, attention_mask, chunk, None)
    return _SequencePieces.apply(hidden, piece, attention_mask, chunk)


class _Chain:
    """One pass's chain of blocks under ``"sequence"``: each block runs without a graph
    (:class:`_ChainLink`); the inputs of chain starts and of every ``stride``-th block are kept
    (on the device, or in pinned host memory), the others recomputed in the backward pass from
    the nearest kept one, keeping every ``ceil(distance / slots)``-th input of that stretch for
    the blocks before it."""

    def __init__(self, settings: SequenceChunks, plan: Optional[RecomputePlan] = None) -> None:
        self.plan = plan
        self.stride = settings.stride or 1
        self.slots = max(1, settings.slots or 1)
        self.host = bool(settings.host)
        self.calls: List[Optional[Tuple[Callable[..., Tensor], tuple, dict]]] = []
        self.kept: Dict[int, Tensor] = {}
        self.parked: Dict[int, Tuple[Tensor, torch.device]] = {}
        self.last: Optional[weakref.ref] = None
        self.start = 0  # position of the latest chain start

    def link(self, forward: Callable[..., Tensor], hidden: Tensor, args: tuple, kwargs: dict) -> Tensor:
        position = len(self.calls)
        self.calls.append((forward, args, kwargs))
        previous = None if self.last is None else self.last()
        if previous is None or previous is not hidden:  # not the previous block's output: a chain start
            self.start = position
            self.kept[position] = hidden
        elif (position - self.start) % self.stride == 0:
            if self.host:  # a copy in (pinned, for CUDA) host memory
                host = torch.empty(hidden.shape, dtype=hidden.dtype, pin_memory=hidden.is_cuda)
                self.parked[position] = (host.copy_(hidden.detach(), non_blocking=hidden.is_cuda), hidden.device)
            else:
                self.kept[position] = hidden
        out = _ChainLink.apply(hidden, self, position)
        self.last = weakref.ref(out)
        return out

    def run(self, position: int, hidden: Tensor) -> Tensor:
        call = self.calls[position]
        assert call is not None, "a block of the chain ran its backward pass twice"
        forward, args, kwargs = call
        if self.plan is None or _PLAN.get() is self.plan:
            return forward(hidden, *args, **kwargs)
        # the backward pass may run on another thread (CUDA: the autograd engine's device
        # thread), where the pass's plan is not set: the block's mixers read it
        with planned(self.plan):
            return forward(hidden, *args, **kwargs)

    def input_of(self, position: int) -> Tensor:
        """Block ``position``'s input: kept, or recomputed from the nearest kept one before it."""
        kept = [p for p in self.kept if p <= position] + [p for p in self.parked if p <= position]
        start = max(kept)
        if start in self.kept:
            x = self.kept[start]
        else:
            host, device = self.parked[start]
            x = host.to(device, non_blocking=device.type == "cuda", copy=True)
        step = max(1, math.ceil((position - start) / self.slots))
        with torch.no_grad():
            for p in range(start, position):
                x = self.run(p, x)
                if p + 1 < position and (p + 1 - start) % step == 0:
                    self.kept[p + 1] = x
        return x

    def release(self, position: int) -> None:
        self.kept.pop(position, None)
        self.parked.pop(position, None)
        self.calls[position] = None


class _ChainLink(torch.autograd.Function):
    """One block of a :class:`_Chain`: forward without a graph; backward: its input from the
    chain (kept or recomputed), the block again with a graph, back-propagated to its input."""

    @staticmethod
    def forward(ctx, hidden: Tensor, chain: _Chain, position: int) -> Tensor:  # type: ignore[override]
        ctx.chain, ctx.position = chain, position
        with torch.no_grad():
            return chain.run(position, hidden)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        chain, position = ctx.chain, ctx.position
        x = chain.input_of(position).detach().requires_grad_(True)
        with torch.enable_grad():
            out = chain.run(position, x)
        (grad_x,) = torch.autograd.grad(out, x, grad)
        chain.release(position)
        ctx.chain = None
        return grad_x, None, None


def chained(forward: Callable[..., Tensor], plan: RecomputePlan) -> Callable[..., Tensor]:
    """A block's ``forward`` as a link of the pass's :class:`_Chain` when ``plan`` decides
    ``"sequence"`` (unchanged otherwise)."""

    def run(hidden_states: Tensor, *args, **kwargs) -> Tensor:
        if not (torch.is_grad_enabled() and isinstance(hidden_states, Tensor) and hidden_states.requires_grad):
            return forward(hidden_states, *args, **kwargs)
        if plan.choose(hidden_states) != SEQUENCE or plan.sequence is None:
            return forward(hidden_states, *args, **kwargs)
        if plan.chain is None:
            plan.chain = _Chain(plan.sequence, plan)
        return plan.chain.link(forward, hidden_states, args, kwargs)

    return run


def _many_tokens(hidden: Tensor) -> bool:
    """``"auto"`` outside a planned pass: more tokens than :data:`RECOMPUTE_AUTO_TOKENS` allows
    on ``hidden``'s device (``hidden [..., d]``)."""
    return hidden.shape[:-1].numel() > RECOMPUTE_AUTO_TOKENS.get(hidden.device.type, RECOMPUTE_AUTO_TOKENS["cpu"])


def recomputing(
    forward: Callable[..., Tensor],
    recompute: Recompute,
    projection: Optional[nn.Module] = None,
    output: Optional[nn.Module] = None,
) -> Callable[..., Tensor]:
    """``forward`` wrapped so that, when ``recompute`` applies, it keeps only its inputs
    for the backward pass and runs again there (``torch.utils.checkpoint``, non-reentrant),
    also keeps the outputs of ``projection`` and ``output`` (the mixer's ``in_proj`` and
    ``out_proj``, linear layers; ``"projection"``, those the pass's plan gives this call, else as
    ``True``), parks them in host memory (``"offload"``), or runs in pieces of the sequence
    (``"sequence"``, when ``forward.sequence_piece`` exists; else as ``True``).

    Memory kept per mixer drops from all its intermediate tensors to its input (to nothing on
    the device, offloaded); the cost is one more mixer forward in the backward pass (and two
    copies of its input, offloaded).
    """
    piece: Optional[Piece] = getattr(forward, "sequence_piece", None)
    # an adapter may say which calls its pieces take (``forward.sequence_piece_accepts(kwargs)``,
    # raising where its forward would); else only a mask and an empty cache slot
    accepts: Optional[Callable[[Dict[str, Any]], bool]] = getattr(forward, "sequence_piece_accepts", None)

    def run(hidden_states: Tensor, *args, **kwargs) -> Tensor:
        mode: Any = recompute
        plan = _PLAN.get()
        if mode == "offload" and plan is not None and not plan.allow_offload:
            mode = True
        if mode == "auto" or is_sequence(mode):
            if plan is not None:
                mode = plan.choose(hidden_states)
            elif mode == "auto":
                mode = _many_tokens(hidden_states)
        if is_sequence(mode):
            settings = plan.sequence if plan is not None else (recompute if isinstance(recompute, SequenceChunks) else None)
            if piece is not None and not args and (accepts(kwargs) if accepts is not None else _plain_call(kwargs)):
                chunk = (settings.chunk if settings is not None else None) or DEFAULT_SEQUENCE_CHUNK
                return in_pieces(piece, hidden_states, kwargs.get("attention_mask"), chunk)
            mode = True  # no piece function (or a call it cannot take): recompute the whole mixer
        if not torch.is_grad_enabled() or mode is False:
            return forward(hidden_states, *args, **kwargs)
        if mode == "offload":
            return offloaded(forward, hidden_states, *args, **kwargs)
        context: Dict[str, Any] = {}
        capturing = hidden_states.is_cuda and torch.cuda.is_current_stream_capturing()
        if mode == PROJECTION and not capturing:
            keep_in, keep_out = plan.kept_products() if plan is not None else (True, True)
            weights = [m.weight for m, keep in ((projection, keep_in), (output, keep_out)) if keep and isinstance(m, nn.Linear)]
            if weights:  # else nothing kept: recomputed whole
                context["context_fn"] = lambda: _keep_products(weights)
        # mixers draw no random numbers: no RNG state to keep (and none to read while a
        # CUDA graph is being captured)
        return checkpoint(forward, hidden_states, *args, use_reentrant=False, preserve_rng_state=False, **context, **kwargs)

    run.recompute_mode = recompute  # type: ignore[attr-defined]
    run.sequence_piece = piece  # type: ignore[attr-defined]
    return run


#: the matrix products ``F.linear`` runs: ``mm`` / ``addmm`` on the tokens flattened, ``bmm`` with
#: the weight expanded over the batch (a non-contiguous input and a weight without gradient:
#: Mamba1's ``out_proj`` reads ``y.transpose(1, 2)``); and ``grouped_mm``, with a fused experts
#: weight ``[experts, out, in]`` transposed (:func:`~captum_mambalrp.adapters.moe.grouped_linear`)
_PRODUCTS = tuple(
    getattr(torch.ops.aten, name).default for name in ("mm", "addmm", "bmm", "_grouped_mm") if hasattr(torch.ops.aten, name)
)


def _is_weight(operand: Any, weights: Sequence[Tuple[int, Tuple[int, ...]]]) -> bool:
    """Is ``operand`` one of ``weights`` (``(data_ptr, shape)``), as a product reads it: the same
    memory, from the same first element (``weight.t()`` and its expansion over a batch are views
    of it), its last two dimensions the weight's either way round (and, for a fused experts weight
    ``[experts, out, in]``, its leading dimensions the weight's)? (The address alone would also
    take in other parameters of one flat buffer, from their start.)"""
    if not isinstance(operand, Tensor) or operand.dim() < 2:
        return False
    try:
        ptr = operand.data_ptr()
    except RuntimeError:  # a tensor without storage (a subclass, fake or functional tensor)
        return False
    dims, lead = tuple(operand.shape[-2:]), tuple(operand.shape[:-2])
    return any(
        ptr == p and dims in (shape[-2:], shape[-2:][::-1]) and (len(shape) == 2 or lead == shape[:-2]) for p, shape in weights
    )


#: fused attention operators whose outputs a recomputed attention layer keeps in ``"projection"``
#: mode (its output and log-sum-exp: the recomputation then skips the attention itself)
ATTENTION_OPS = tuple(
    getattr(torch.ops.aten, name).default
    for name in (
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_cudnn_attention",
        "_scaled_dot_product_flash_attention_for_cpu",
    )
    if hasattr(torch.ops.aten, name)
)


def _keep_products(weights: Sequence[Tensor], ops: Sequence[Any] = ()) -> Tuple[Any, Any]:
    """Selective checkpointing contexts that save the output of every matrix product with one of
    ``weights`` as an operand (a mixer's ``in_proj`` and ``out_proj`` weights, told by their
    memory, not by the product's width, which other products of the mixer may share) and
    recompute everything else. Every such product is saved, in the forward pass and in the
    recomputation alike (torch pairs the saved outputs with the recomputation's calls in order,
    per operation). A rule's products with weights of its own (LRP-gamma's) are recomputed.
    ``ops``: operators whose outputs are saved whatever their operands (:data:`ATTENTION_OPS`)."""
    keys = [(w.data_ptr(), tuple(w.shape)) for w in weights]

    def policy(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
        if op in _PRODUCTS and any(_is_weight(a, keys) for a in args[-2:]):
            return CheckpointPolicy.MUST_SAVE
        if op in ops:
            return CheckpointPolicy.MUST_SAVE
        return CheckpointPolicy.PREFER_RECOMPUTE

    return create_selective_checkpoint_contexts(policy)


#: the keyword arguments through which a layer receives a cache it writes (not ``cache_position``)
CACHE_KWARGS = frozenset({"past_key_values", "past_key_value", "layer_past", "cache", "cache_params", "inference_params"})


def _with_cache(kwargs: Dict[str, Any]) -> bool:
    """Is a key/value or state cache passed (``past_key_values``, ``cache_params``, mamba-ssm's
    ``inference_params`` ...)?"""
    return any(v is not None and k in CACHE_KWARGS for k, v in kwargs.items())


def recomputing_layer(
    forward: Callable[..., Any], recompute: Recompute, layer: Optional[nn.Module] = None, attention: bool = False
) -> Callable[..., Any]:
    """``forward`` of an attention, MLP or expert layer (a hybrid's), wrapped so that it keeps
    only its inputs for the backward pass and runs again there (``torch.utils.checkpoint``,
    non-reentrant) whenever the pass recomputes its mixers: every mode but ``False``. In
    ``"projection"`` mode (where the pass's plan gives this call products: :meth:`RecomputePlan.
    keeps_layer_products`) it also keeps the outputs of the products with the weights of
    ``layer``'s linear layers and fused experts (``grouped_mm``) and, for an attention layer
    (``attention``), of the fused
    attention (:data:`ATTENTION_OPS`): the recomputation then runs only the elementwise steps
    between them. Such a
    layer has no piece function and no state, and its input (``d_model`` per token) is small
    beside what it keeps (a squared-ReLU MLP of 21504 channels: about 50 times more), so
    ``"offload"`` and ``"sequence"`` recompute it whole with its input on the device.

    The rules inside run again in the backward pass; they draw no random numbers and hold no
    state, so the relevance is the same (to rounding). A call that hands the layer a cache
    (``use_cache=True``) keeps its tensors: the layer writes the cache as it runs.
    """

    def run(*args, **kwargs):
        if not torch.is_grad_enabled() or _with_cache(kwargs):
            # a layer handed a cache writes it in its forward: running it twice would write twice
            return forward(*args, **kwargs)
        mode: Any = True if recompute == "offload" else recompute  # recomputed whole, its input on the device
        if mode == "auto" or is_sequence(mode):
            plan = _PLAN.get()
            hidden = next((a for a in (*args, *kwargs.values()) if isinstance(a, Tensor) and a.is_floating_point()), None)
            if plan is not None and hidden is not None and hidden.dim() >= 2:
                # an expert layer may see the tokens flattened ([tokens, d]): the same token count
                mode = plan.choose(hidden if hidden.dim() == 3 else hidden.reshape(1, -1, hidden.shape[-1]))
            elif mode == "auto":
                mode = hidden is not None and _many_tokens(hidden)
        if mode is False:
            return forward(*args, **kwargs)
        context: Dict[str, Any] = {}
        capturing = torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()
        if mode == PROJECTION and layer is not None and not capturing:
            plan = _PLAN.get()
            if plan is None or plan.keeps_layer_products():
                weights = [m.weight for m in layer.modules() if isinstance(m, nn.Linear)]
                weights += [w for w in layer.parameters() if w.dim() == 3]  # fused experts
                ops = ATTENTION_OPS if attention else ()
                context["context_fn"] = lambda: _keep_products(weights, ops)
        return checkpoint(forward, *args, use_reentrant=False, preserve_rng_state=False, **context, **kwargs)

    run.recompute_mode = recompute  # type: ignore[attr-defined]
    return run


def plan_for(
    model: nn.Module,
    mixer_names: List[str],
    read_at: Sequence[Optional[nn.Module]] = (),
    budget: Optional[float] = None,
    patcher: Optional[Any] = None,
    attention_names: Sequence[str] = (),
    layer_names: Sequence[str] = (),
) -> RecomputePlan:
    """The ``"auto"`` plan of one pass over ``model``'s mixers (named as ``Installation.mixers``);
    ``read_at``: the modules where relevance is read (none inside a mixer, or no offloading and
    no ``"sequence"``). With ``patcher`` (a :class:`~captum_mambalrp.adapters.patching.Patcher`)
    and a mode that may become ``"sequence"``, the blocks around the mixers (:data:`CHAIN_BLOCKS`)
    are wrapped as links of the pass's chain (undone by the patcher), unless relevance is read
    inside one of them.

    Returns:
        a :class:`RecomputePlan` (undecided until the first mixer or block call).
    """
    from .patching import forward_attribute

    mixers = [model.get_submodule(n) for n in mixer_names]
    inside = {id(m) for mixer in mixers for m in mixer.modules()}
    requested: Recompute = False
    pieces = bool(mixers)
    for mixer in mixers:
        wrapped = getattr(mixer, forward_attribute(mixer), None)
        requested = getattr(wrapped, "recompute_mode", requested)
        pieces = pieces and getattr(wrapped, "sequence_piece", None) is not None
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    attention = [model.get_submodule(n) for n in attention_names]
    layers = [model.get_submodule(n) for n in layer_names]
    others, per_length = others_bytes_per_token(model, mixers, attention, dtype)
    in_layers = {id(m) for layer in layers for m in layer.modules()}
    if layers:
        outside = others_bytes_per_token(model, [*mixers, *layers], [a for a in attention if id(a) not in in_layers], dtype)
    else:  # nothing recomputed besides the mixers: what lies outside them is all of it (one walk fewer)
        outside = (others, per_length)
    working, working_per_length = 0.0, 0.0
    for layer in layers:  # the largest layer's own tensors: what all keep minus what all but it keep
        rest, rest_per_length = others_bytes_per_token(model, [*mixers, layer], [a for a in attention if a is not layer], dtype)
        working, working_per_length = max(working, others - rest), max(working_per_length, per_length - rest_per_length)
    attention_ids = {id(a) for a in attention}
    plan = RecomputePlan(
        mixers,
        budget=budget if budget is not None else _env_budget(),
        allow_offload=not any(m is not None and id(m) in inside for m in read_at),
        requested=requested,
        pieces=pieces,
        others=others,
        others_per_length=per_length,
        layers=len(layers),
        layer_working=working,
        layer_working_per_length=working_per_length,
        others_outside=outside[0],
        others_outside_per_length=outside[1],
        layer_products=[
            layer_product_bytes(layer, dtype, id(layer) in attention_ids, _layer_top_k(model, layer)) for layer in layers
        ],
    )
    if patcher is None or not (requested == "auto" or is_sequence(requested)) or not plan.allow_offload:
        return plan
    blocks = []
    for name in mixer_names:
        parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else None
        if parent is not None and type(parent).__name__ in CHAIN_BLOCKS and type(parent).__module__.startswith("transformers."):
            blocks.append(parent)
    below = {id(m) for block in blocks for m in block.modules() if m is not block}
    if blocks and not any(m is not None and id(m) in below for m in read_at):
        for block in blocks:
            patcher.wrap_forward(block, lambda f: chained(f, plan))
        plan.chain_blocks = len(blocks)
    return plan


def _env_budget() -> Optional[float]:
    """``CAPTUM_MAMBALRP_MEMORY_BUDGET`` (bytes) overrides the measured budget (benchmarks, tests)."""
    value = os.environ.get("CAPTUM_MAMBALRP_MEMORY_BUDGET")
    return float(value) if value else None
