"""Selective scans for relevance: one recurrence, one canonical scan, two layouts, three backends.

- :func:`selective_scan`: Mamba1 (mamba-ssm's kernel layout, as in transformers);
- :func:`ssd_scan`: Mamba2's SSD (transformers' ``mamba2_chunk_scan`` layout).

``linear=True`` treats the parameters as constants (MambaLRP; memory-lean backward that
computes the gradient for x only), ``linear=False`` is differentiable in everything (the
plain-gradient ablation; always the torch backend: Mamba1 the canonical scan, Mamba2 the
chunked matrix form out of place, ``ssd_chunked(..., differentiable=True)``).

Backends of the relevance scan (same math, same results to float32 rounding):

- ``"torch"``: any device. Mamba1: :mod:`.linear_scan`, the canonical scan (the
  reference); Mamba2: :mod:`.ssd_chunked`, SSD's chunked matrix form (forward only, its
  adjoint by the same function on the reversed problem, :mod:`.adjoint`);
- ``"mamba_ssm"``: mamba-ssm's ``selective_scan_fn`` / ``mamba_chunk_scan_combined``
  (CUDA; :mod:`.mamba_ssm_backend`), forward kernels only: the backward pass runs the
  same kernel on the reversed problem (:mod:`.adjoint`);
- ``"triton"``: our own Triton kernel (CUDA; :mod:`.triton_scan`);
- ``"auto"``: on CUDA (see ``AUTO_ORDER``), Mamba1: ``mamba_ssm`` if installed, else
  ``triton``; Mamba2 (SSD): ``torch`` (the chunked matrix form) for float32 models,
  ``mamba_ssm`` first for bf16/fp16 models (``ssd_scan(..., model_dtype=)``); elsewhere ``torch``.

Which backend actually ran is recorded: :func:`record_backends` collects the counts of a
block of code (benchmarks and tests read it).
"""

from __future__ import annotations

import contextlib
import importlib
import os
import warnings
from collections import Counter
from typing import Any, Callable, Iterator, List, Optional, Tuple, Union

import torch
from torch import Tensor

from ..kernels import interpreting, triton_installed
from . import mamba_ssm_backend
from .adjoint import relevance_scan_from, step_of
from .linear_scan import relevance_scan, relevance_scan_state, scan_forward, scan_input_gradient
from .precision import compute_dtype
from .recurrence import linear_recurrence
from .ssd_chunked import ssd_chunked

BACKENDS = ("auto", "torch", "triton", "mamba_ssm")

_RECORDERS: List[Counter] = []


def available_backends(device: Union[str, torch.device, None] = None) -> List[str]:
    """Concrete backends that can run on ``device`` (default: CUDA if present, else CPU)."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    kind = torch.device(device).type
    out = ["torch"]
    if triton_installed() and (kind == "cuda" or interpreting()):
        out.append("triton")
    if kind == "cuda" and mamba_ssm_backend.available():
        out.append("mamba_ssm")
    return out


# "auto" on CUDA, per layout (measured on the H200, docs/benchmarks.md). Mamba2's SSD: the torch
# backend's chunked matrix form runs on the GPU's matrix pipelines and beats our step-by-step
# Triton kernel (64 x 128 states per head); mamba-ssm's SSD kernels autotune for minutes on
# first use and run float32 dots in TF32 unless TRITON_F32_DEFAULT=ieee.
# For a bf16/fp16 model ("ssd_low") mamba-ssm's SSD kernels come first: their TF32 dots round far
# less than the model's own activations, and at the hybrids' shapes they take Nemotron-H-8B (13
# layers, L 8192) from 3.20x to 2.66x the forward (docs/benchmarks.md).
AUTO_ORDER = {
    "mamba1": ("mamba_ssm", "triton", "torch"),
    "ssd": ("torch", "triton", "mamba_ssm"),
    "ssd_low": ("mamba_ssm", "torch", "triton"),
}
LOW_PRECISION = (torch.bfloat16, torch.float16)


def resolve_backend(backend: str, device: Union[str, torch.device, None] = None, layout: str = "mamba1") -> str:
    """The concrete backend ``backend`` means on ``device`` for ``layout`` ("mamba1", "ssd", or
    "ssd_low": SSD for a bf16/fp16 model); raises if it cannot run there."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown scan backend {backend!r}; choose one of {BACKENDS}")
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    usable = available_backends(device)
    if backend == "auto":
        if torch.device(device).type != "cuda":
            return "torch"
        return next(b for b in AUTO_ORDER[layout] if b in usable)
    if backend not in usable:
        why = {
            "mamba_ssm": "needs the mamba-ssm package and a CUDA device",
            "triton": "needs the triton package and a CUDA device (or TRITON_INTERPRET=1)",
        }[backend]
        raise RuntimeError(f"scan backend {backend!r} cannot run on {device}: it {why}")
    return backend


def _note(name: str) -> None:
    for rec in _RECORDERS:
        rec[name] += 1


@contextlib.contextmanager
def record_backends() -> Iterator[Counter]:
    """``with record_backends() as used: ...``: ``used`` counts the scans per backend run inside.

    Returns:
        a context manager yielding a ``Counter`` (backend name -> scans run in the block).

    >>> with record_backends() as used:
    ...     pass
    >>> dict(used)
    {}
    """
    rec: Counter = Counter()
    _RECORDERS.append(rec)
    try:
        yield rec
    finally:  # by identity: two recorders with equal counts are still different recorders
        del _RECORDERS[next(i for i, r in enumerate(_RECORDERS) if r is rec)]


#: how a bf16 / fp16 model's relevance scan reads x, dt, B and C: ``"model"`` rounded to the
#: model's dtype, as the model's own scan kernel reads them; ``"compute"`` as the pass computes
#: them (float32); ``"auto"`` (default): ``"model"`` for Mamba1's scan (faster, less memory, and
#: no less precise on the H200: docs/benchmarks_history.md, run 7), ``"compute"`` for SSD (Mamba2,
#: Mamba3), where the rounded form was slower at 4096 tokens (run 5). Either way the scan
#: accumulates and its backward pass runs in float32.
SCAN_INPUTS_ENV = "CAPTUM_MAMBALRP_SCAN_INPUTS"
SCAN_INPUTS_DEFAULT = "auto"
SCAN_INPUTS = ("auto", "model", "compute")


def rounded_inputs(model_dtype: Optional[torch.dtype], linear: bool = True, layout: str = "mamba1") -> Optional[torch.dtype]:
    """The dtype a relevance scan's inputs are rounded to (``CAPTUM_MAMBALRP_SCAN_INPUTS``), or
    ``None``: not rounded (float32 / float64 models, the differentiable ablation, ``"compute"``,
    and ``"auto"`` for ``layout="ssd"``).

    >>> rounded_inputs(torch.float32), rounded_inputs(torch.bfloat16, linear=False)
    (None, None)
    """
    value = os.environ.get(SCAN_INPUTS_ENV, SCAN_INPUTS_DEFAULT)
    if value not in SCAN_INPUTS:
        raise ValueError(f"{SCAN_INPUTS_ENV}={value!r}: set it to 'auto', 'model' or 'compute'")
    rounded = value == "model" or (value == "auto" and layout == "mamba1")
    return model_dtype if linear and rounded and model_dtype in LOW_PRECISION else None


def _round_through(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t``'s value rounded to ``dtype`` (kept in ``t``'s dtype), its gradient passed unrounded."""
    rounded = t.detach().to(dtype).to(t.dtype)
    return t + (rounded - t.detach()) if t.requires_grad else rounded


def _rounded_scan(
    fn: Callable[..., Any],
    low: Optional[torch.dtype],
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    *rest: Any,
    round_dt: bool = True,
) -> Any:
    """``fn(x, dt, A, B, C, *rest)`` on inputs rounded to ``low`` and with its output (the first,
    for a pair) rounded to ``low``: the torch and Triton backends' form of mamba-ssm's kernel
    reading and writing the model's dtype (:func:`rounded_inputs`); ``fn`` itself when ``low`` is
    None. ``round_dt=False``: ``dt`` is the step computed from a raw step already in ``low``
    (:func:`selective_scan`'s ``dt_bias``), as mamba-ssm's kernel computes it, in float32."""
    if low is None:
        return fn(x, dt, A, B, C, *rest)
    B, C = (t.detach().to(low).to(t.dtype) for t in (B, C))
    if round_dt:
        dt = dt.detach().to(low).to(dt.dtype)
    out = fn(_round_through(x, low), dt, A, B, C, *rest)
    if isinstance(out, tuple):
        return (_round_through(out[0], low),) + tuple(out[1:])
    return _round_through(out, low)


def _kernel(layout: str, name: str) -> Callable[..., Tensor]:
    """The GPU backend's function for ``layout`` ("mamba1" or "ssd"); imported on first use
    (so that importing the package never imports triton)."""
    module = mamba_ssm_backend if name == "mamba_ssm" else importlib.import_module(f"{__name__}.triton_scan")
    return getattr(module, "selective_scan" if layout == "mamba1" else "ssd_scan")


def _pick(
    backend: str, x: Tensor, linear: bool, layout: str, stateful: bool = False, operands: Optional[Tuple[Tensor, ...]] = None
) -> str:
    """The backend that runs this scan: ``backend`` resolved for the device and layout, then
    the torch backend where only it computes what is asked (autograd in every input, float64),
    our Triton kernel for a piece of a sequence, and another backend where mamba-ssm's 32-bit
    offsets would not hold ``operands`` (``(x, dt, B, C)``; :func:`mamba_ssm_backend.offsets_fit`)."""
    name = resolve_backend(backend, x.device, layout)
    if not linear or x.dtype == torch.float64:
        # the differentiable ablation needs every gradient; the GPU kernels compute in float32,
        # a float64 model's scan stays float64 (torch backend)
        name = "torch"
    if stateful and name == "mamba_ssm" or (stateful and layout == "ssd" and name == "torch" and backend == "auto"):
        # a piece of a sequence (recompute="sequence") starts from a carried state: mamba-ssm's
        # Mamba1 kernel takes none (and its SSD kernels' reversed adjoint would need one at the end),
        # the torch backend's SSD matrix form neither (its stateful path is the step-by-step scan):
        # our Triton kernel, where it runs (mamba-ssm needs triton: installed with it)
        name = "triton" if "triton" in available_backends(x.device) and x.dtype != torch.float64 and linear else "torch"
    kernel_layout = "mamba1" if layout == "mamba1" else "ssd"
    if name == "mamba_ssm" and operands is not None and not mamba_ssm_backend.offsets_fit(kernel_layout, *operands):
        name = next(b for b in (*AUTO_ORDER[layout], "torch") if b != "mamba_ssm" and b in available_backends(x.device))
        if backend == "mamba_ssm":
            warnings.warn(
                f"scan backend 'mamba_ssm': a scan of {tuple(x.shape)} would address more than 2^31 elements, past "
                f"mamba-ssm's 32-bit offsets (state-spaces/mamba#1015); running it on {name!r} instead",
                ResourceWarning,
                stacklevel=3,
            )
    _note(name)
    return name


def selective_scan(
    x: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Optional[Tensor] = None,
    *,
    linear: bool = True,
    backend: str = "auto",
    model_dtype: Optional[torch.dtype] = None,
    dt_bias: Optional[Tensor] = None,
    x_model: Optional[Tensor] = None,
) -> Tensor:
    """Mamba1: ``x, delta [b, d, l]``, ``A [d, n]``, ``B, C [b, n, l]``, ``D [d]`` -> ``[b, d, l]``
    in float32 (float64 for float64 x). ``model_dtype``: the model's own dtype, for
    :func:`rounded_inputs`. ``dt_bias [d]``: ``delta`` is the raw step (``dt_proj``'s product;
    in the model's dtype where :func:`rounded_inputs` says so, as the model's kernel reads it)
    and the step is ``softplus(delta + dt_bias)`` in the compute dtype: inside mamba-ssm's kernel
    (``delta_softplus``) and the steps around its reversed call, else computed first.
    ``x_model``: ``x`` in the model's dtype where the caller has that copy (mamba-ssm's kernel
    reads it when the scan reads its inputs rounded)."""
    name = _pick(backend, x, linear, "mamba1", operands=(x, delta, B, C))
    low = rounded_inputs(model_dtype, linear)
    if name == "mamba_ssm":
        return mamba_ssm_backend.selective_scan(x, delta, A, B, C, D, low, dt_bias, x_model if low is not None else None)
    delta, raw = _step(delta, dt_bias, x), dt_bias is not None
    return _rounded_scan(_selective_scan_on, low, x, delta, A, B, C, D, name, linear, round_dt=not raw)


def _step(delta: Tensor, dt_bias: Optional[Tensor], x: Tensor) -> Tensor:
    """The Mamba1 step from a raw ``delta`` and ``dt_bias`` (:func:`selective_scan`), in the
    compute dtype of ``x`` and ``delta``; ``delta`` itself without a bias."""
    if dt_bias is None:
        return delta
    cd = compute_dtype(torch.promote_types(x.dtype, delta.dtype))
    return step_of(delta, dt_bias.to(cd), "mamba1")


def _selective_scan_on(
    x: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor], name: str, linear: bool
) -> Tensor:
    if name != "torch":
        return _kernel("mamba1", name)(x, delta, A, B, C, D)
    Bc, Cc = B.transpose(1, 2).unsqueeze(1), C.transpose(1, 2).unsqueeze(1)  # [b, 1, l, n]
    Dc = None if D is None else D[:, None]
    args = (x, delta, A[:, None, :], Bc, Cc, Dc)
    return relevance_scan(*args) if linear else scan_forward(*args)


def selective_scan_state(
    x: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Optional[Tensor] = None,
    h0: Optional[Tensor] = None,
    *,
    linear: bool = True,
    backend: str = "auto",
    model_dtype: Optional[torch.dtype] = None,
    dt_bias: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor]:
    """:func:`selective_scan` on a piece of a longer sequence (``recompute="sequence"``): ``h0
    [b, d, n]`` is the state before its first step (``None``: zero); returns ``(y, h_last)``, the
    state after its last step to carry into the next piece; gradients flow to ``x`` and ``h0``.
    ``dt_bias``: as in :func:`selective_scan` (the step computed first).

    Backends: torch and triton. mamba-ssm's Mamba1 kernel takes no initial state: such calls run
    on our Triton kernel (torch without triton), and :func:`record_backends` records that one.

    Returns:
        ``(y [b, d, l], h_last [b, d, n])`` in float32 (float64 for float64 x).

    >>> x, dt = torch.randn(1, 2, 6), torch.rand(1, 2, 6)
    >>> A, B, C = -torch.rand(2, 3), torch.randn(1, 3, 6), torch.randn(1, 3, 6)
    >>> y1, h = selective_scan_state(x[..., :4], dt[..., :4], A, B[..., :4], C[..., :4], backend="torch")
    >>> y2, _ = selective_scan_state(x[..., 4:], dt[..., 4:], A, B[..., 4:], C[..., 4:], None, h, backend="torch")
    >>> torch.allclose(torch.cat([y1, y2], -1), selective_scan(x, dt, A, B, C, backend="torch"), atol=1e-6)
    True
    """
    name = _pick(backend, x, linear, "mamba1", stateful=True)
    low, step = rounded_inputs(model_dtype, linear), _step(delta, dt_bias, x)
    return _rounded_scan(_selective_scan_state_on, low, x, step, A, B, C, D, h0, name, linear, round_dt=dt_bias is None)


def _selective_scan_state_on(
    x: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor], h0: Optional[Tensor], name: str, linear: bool
) -> Tuple[Tensor, Tensor]:
    if name == "triton":
        return _kernel_state("mamba1", x, delta, A, B, C, D, h0)
    Bc, Cc = B.transpose(1, 2).unsqueeze(1), C.transpose(1, 2).unsqueeze(1)
    args = (x, delta, A[:, None, :], Bc, Cc, None if D is None else D[:, None])
    if linear:
        return relevance_scan_state(*args, h0=h0)
    last: List[Tensor] = []
    y = scan_forward(*args, h0=h0, state=last)
    return y, last[0]


def _kernel_state(
    layout: str, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor], h0: Optional[Tensor]
) -> Tuple[Tensor, Tensor]:
    module = importlib.import_module(f"{__name__}.triton_scan")
    return getattr(module, "selective_scan_state" if layout == "mamba1" else "ssd_scan_state")(x, dt, A, B, C, D, h0)


def ssd_scan_state(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Optional[Tensor] = None,
    h0: Optional[Tensor] = None,
    *,
    linear: bool = True,
    backend: str = "auto",
    model_dtype: Optional[torch.dtype] = None,
) -> Tuple[Tensor, Tensor]:
    """:func:`ssd_scan` on a piece of a longer sequence (``recompute="sequence"``): ``h0
    [b, h, p, n]`` is the state before its first step (``None``: zero); returns ``(y, h_last)``.
    Backends: triton (``"auto"`` on CUDA) and torch (the step-by-step canonical scan, not the
    chunked matrix form); mamba-ssm's SSD kernels run as triton.

    Returns:
        ``(y [b, l, h, p], h_last [b, h, p, n])`` in float32 (float64 for float64 x).

    >>> x, dt, A = torch.randn(1, 6, 2, 3), torch.rand(1, 6, 2), -torch.rand(2)
    >>> B, C = torch.randn(1, 6, 1, 4), torch.randn(1, 6, 1, 4)
    >>> y1, h = ssd_scan_state(x[:, :4], dt[:, :4], A, B[:, :4], C[:, :4], backend="torch")
    >>> y2, _ = ssd_scan_state(x[:, 4:], dt[:, 4:], A, B[:, 4:], C[:, 4:], None, h, backend="torch")
    >>> torch.allclose(torch.cat([y1, y2], 1), ssd_scan(x, dt, A, B, C, backend="torch"), atol=1e-5)
    True
    """
    name = _pick(backend, x, linear, "ssd", stateful=True)
    low = rounded_inputs(model_dtype, linear, "ssd")
    return _rounded_scan(_ssd_scan_state_on, low, x, dt, A, B, C, D, h0, name, linear)


def _ssd_scan_state_on(
    x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor], h0: Optional[Tensor], name: str, linear: bool
) -> Tuple[Tensor, Tensor]:
    if name == "triton":
        return _kernel_state("ssd", x, dt, A, B, C, D, h0)
    b, length, heads, p = x.shape
    groups = B.shape[2]
    hg = heads // groups  # the canonical layout of ssd_scan's differentiable path
    xc = x.reshape(b, length, groups, hg, p).permute(0, 2, 3, 4, 1)  # [b, g, hg, p, l]
    dtc = dt.reshape(b, length, groups, hg).permute(0, 2, 3, 1).unsqueeze(3)  # [b, g, hg, 1, l]
    Bc = B.permute(0, 2, 1, 3)[:, :, None, None]  # [b, g, 1, 1, l, n]
    Cc = C.permute(0, 2, 1, 3)[:, :, None, None]
    Ac = A.reshape(groups, hg, 1, 1, 1)
    Dc = None if D is None else D.reshape(groups, hg, -1, 1)
    hc = None if h0 is None else h0.reshape(b, groups, hg, p, h0.shape[-1])
    args = (xc, dtc, Ac, Bc, Cc, Dc)
    if linear:
        y, h = relevance_scan_state(*args, h0=hc)
    else:
        last: List[Tensor] = []
        y = scan_forward(*args, h0=hc, state=last)
        h = last[0]
    return y.permute(0, 4, 1, 2, 3).reshape(b, length, heads, p), h.reshape(b, heads, p, h.shape[-1])


def ssd_scan(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Optional[Tensor] = None,
    *,
    linear: bool = True,
    backend: str = "auto",
    model_dtype: Optional[torch.dtype] = None,
) -> Tensor:
    """Mamba2: ``x [b, l, h, p]``, ``dt [b, l, h]`` (final), ``A [h]``, ``B, C [b, l, g, n]``,
    ``D [h]`` or ``[h, p]`` -> ``[b, l, h, p]`` in float32 (float64 for float64 x).
    ``model_dtype``: the model's own dtype (the inputs are in the compute dtype); for bf16/fp16
    models ``"auto"`` on CUDA prefers mamba-ssm's SSD kernels (``AUTO_ORDER["ssd_low"]``), and
    :func:`rounded_inputs` applies."""
    name = _pick(backend, x, linear, "ssd_low" if model_dtype in LOW_PRECISION else "ssd", operands=(x, dt, B, C))
    low = rounded_inputs(model_dtype, linear, "ssd")
    if name == "mamba_ssm":
        return mamba_ssm_backend.ssd_scan(x, dt, A, B, C, D, low)
    return _rounded_scan(_ssd_scan_on, low, x, dt, A, B, C, D, name, linear)


def _ssd_scan_on(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor], name: str, linear: bool) -> Tensor:
    if name != "torch":
        return _kernel("ssd", name)(x, dt, A, B, C, D)
    if linear:  # the chunked matrix form, its adjoint by the same function reversed
        return relevance_scan_from(ssd_chunked, "ssd", x, dt, A, B, C, D)
    # differentiable in everything: the same form out of place, under autograd
    return ssd_chunked(x, dt, A, B, C, D, differentiable=True)


__all__ = [
    "BACKENDS",
    "available_backends",
    "compute_dtype",
    "linear_recurrence",
    "record_backends",
    "relevance_scan",
    "relevance_scan_state",
    "resolve_backend",
    "rounded_inputs",
    "scan_forward",
    "scan_input_gradient",
    "selective_scan",
    "selective_scan_state",
    "ssd_scan",
    "ssd_scan_state",
]
