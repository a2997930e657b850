r"""The hidden attention of Mamba (Ali, Zimerman, Wolf 2024) and the attributions built on it.

A Mamba1 scan ``h_t = exp(delta_t A) h_{t-1} + delta_t B_t x_t``, ``y_t = C_t h_t + D x_t``
unrolls, per channel ``d``, into a causal attention ``y_t = sum_{s<=t} alpha_{t,s} x_s + D x_t``:

.. math:: \alpha^{(d)}_{t,s} = C_t^\top \Big(\prod_{r=s+1}^{t} e^{\Delta_r A}\Big) \Delta_s B_s
          = \sum_n C_{t,n}\, e^{A_{d,n} \sum_{r=s+1}^{t}\Delta_{r,d}}\, \Delta_{s,d} B_{s,n}.

Two token attributions read the explained position's row of a product over layers:

- **attention rollout** (Abnar & Zuidema 2020, as applied by Ali et al.): per layer
  ``M = mean_d |alpha^(d)|`` (hidden attention can be negative; rollout needs a
  non-negative flow);
- **Mamba-Attr**, the gradient-weighted (class-specific) form: ``M = mean_d (grad_alpha (.)
  alpha)^+`` with ``grad_alpha[d, t, s] = ds/dy_t[d] * x_s[d]``, the exact gradient of the
  explained logit ``s`` with respect to ``alpha`` (``y`` is linear in ``alpha``);

then, for both, ``M~ = rownorm(I + M / max M)`` per layer and ``R = M~_L ... M~_1``
(:func:`rollout`); the relevance of token ``s`` is ``R[last, s]``.

**Mamba2 (SSD).** With a scalar decay per head, ``a_t = dt_t A_h``, the same unrolling gives one
matrix per head (Dao and Gu's SSD kernel; Zimerman et al. 2025, eq. for Mamba2)

.. math:: M^{(h)} = L^{(h)} \circ (C B^\top)\,\mathrm{diag}(dt^{(h)}),\qquad
          L^{(h)}_{t,s} = e^{\sum_{r=s+1}^{t} dt_{r,h} A_h}\ (s \le t),

shared by the head's channels (``B, C`` by the heads of a group). It is computed by the
package's own SSD scan (:func:`~captum_mambalrp.scan.ssd_scan`) applied to the identity:
the scan is linear in ``x``, so its output for ``x = I`` is the matrix itself.

**Implicit attention** (Zimerman, Ali, Wolf, ICLR 2025, "Explaining Modern Gated-Linear RNNs
via a Unified Implicit Attention Formulation"): the whole mixer as one data-controlled linear
map per channel, from the conv's input ``u`` to the gated output, with the gate, the SiLU and
the causal conv folded in:

.. math:: \tilde\alpha^{(d)} = \mathrm{diag}(\mathrm{silu}(z^{(d)}))\,(\alpha^{(d)} + D_d I)\,
          \mathrm{diag}(\sigma(c^{(d)}))\,K^{(d)},

with ``c = conv(u)`` the conv's output (``silu(c) = sigma(c) c``) and ``K`` the causal
Toeplitz matrix of the conv's kernel (the conv bias, an additive constant, is left out).
``implicit_attn`` and ``implicit_attr`` are the rollout and the gradient-weighted rollout of
``mean_d |alpha~|`` (gradient ``ds/d(gated output)_t * u_s``).

The scan quantities are read from the model's own forward through the core's rule hooks:
probe rules that act as the plain gradient and record ``x``, ``delta, A, B, C``, ``y`` and the
gate, and forward hooks on the mixers' convolutions (input, output, kernel).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterator, List, Optional, Tuple

import torch
from torch import Tensor, nn

from ..adapters import Patcher, install_rules
from ..attribution.mamba_lrp import find_embedding
from ..rules.base import GradientRule
from ..rules.composites import composite
from ..scan import ssd_scan
from .base import TokenAttribution
from .scores import LastTokenScores, last_positions


@dataclass
class ScanRecord:
    """One mixer's scan, per channel ``d``: ``x, y [b, d, l]`` (scan input and output, ``D x``
    included) and ``grad_y`` (gradient of the explained score at ``y``, when asked for).

    ``kind="mamba1"``: ``delta [b, d, l]``, ``A [d, n]``, ``B, C [b, n, l]``.
    ``kind="ssd"`` (Mamba2): ``delta`` is ``dt [b, l, h]``, ``A [h]``, ``B, C [b, l, g, n]``; the
    ``d = h * head_dim`` channels of head ``h`` share its matrix.

    For the implicit attention: ``D [d]``; ``conv_in``, ``conv_pre [b, d, l]`` (the conv's input
    and output of the scan channels), ``conv_weight [d, k]``; ``gate [b, d, l]`` (``silu(z)``) and
    ``grad_out`` (the gradient at the gated output ``y * gate``).

    For Mamba-Attr: ``grad_stream [b, l, h]``, the gradient of the explained score at the
    residual stream entering the mixer's block (Ali et al.'s ``get_gradients``).
    """

    x: Tensor
    delta: Tensor
    A: Tensor
    B: Tensor
    C: Tensor
    y: Tensor
    grad_y: Optional[Tensor] = None
    kind: str = "mamba1"
    D: Optional[Tensor] = None
    conv_in: Optional[Tensor] = None
    conv_pre: Optional[Tensor] = None
    conv_weight: Optional[Tensor] = None
    gate: Optional[Tensor] = None
    grad_out: Optional[Tensor] = None
    grad_stream: Optional[Tensor] = None

    @property
    def channels(self) -> int:
        return self.x.shape[1]


@dataclass
class _Recorder:
    conv_pre: List[Tensor] = field(default_factory=list)
    x: List[Tensor] = field(default_factory=list)
    ssm: List[Tuple[Tensor, ...]] = field(default_factory=list)
    y: List[Tensor] = field(default_factory=list)
    gate: List[Tensor] = field(default_factory=list)
    out: List[Tensor] = field(default_factory=list)
    conv: List[Tuple[Tensor, Tensor]] = field(default_factory=list)


class _ConvActProbe(GradientRule):
    def __init__(self, rec: _Recorder) -> None:
        self.rec = rec

    def activation(self, x, fn):  # the conv's output [b, channels, l] -> the scan input
        out = fn(x)
        self.rec.conv_pre.append(x)
        self.rec.x.append(out)
        return out


class _SSMProbe(GradientRule):
    def __init__(self, rec: _Recorder) -> None:
        self.rec = rec

    def ssm_constants(self, delta, A, B, C):
        self.rec.ssm.append((delta, A, B, C))
        return delta, A, B, C


class _GateActProbe(GradientRule):
    def __init__(self, rec: _Recorder) -> None:
        self.rec = rec

    def activation(self, z, fn):
        out = fn(z)
        self.rec.gate.append(out)
        return out


class _GateProbe(GradientRule):
    def __init__(self, rec: _Recorder) -> None:
        self.rec = rec

    def gate(self, y, g):  # y: the scan output D x included
        self.rec.y.append(y)
        out = y * g
        self.rec.out.append(out)
        return out


def _mixer_convs(model: nn.Module) -> Tuple[List[nn.Conv1d], List[nn.Module], List[str]]:
    """The model's Mamba mixers (the modules an adapter takes over with a selective scan), the
    depthwise convolutions inside them, in module order, and the mixers' names.

    Raises:
        ValueError: the model also mixes tokens with attention layers (a hybrid): a rollout over
            its Mamba layers alone would leave their mixing out.
    """
    layout = install_rules(model, composite("gradient"), require_layer=False)
    layout.patcher.restore()
    if layout.attention:
        name = layout.attention[0]
        raise ValueError(
            f"hidden and implicit attention roll out Mamba layers only, and {type(model).__name__} also mixes tokens in "
            f"attention layers ({name}: {type(model.get_submodule(name)).__name__}): use MambaLRP or a Captum baseline"
        )
    names = list(layout.mixers)
    mixers = [model.get_submodule(n) for n in names]
    convs = []
    for name, module in model.named_modules():
        parent = name.rsplit(".", 1)[0] if "." in name else ""
        if isinstance(module, nn.Conv1d) and parent in names:
            convs.append(module)
    return convs, mixers, names


def _to_channels(t: Tensor, kind: str, d: int) -> Tensor:
    """A recorded tensor as ``[b, d, l]``: Mamba1's are already; Mamba2's conv output covers
    ``x, B, C`` (``[b, d + 2 g n, l]``: the first ``d``), its scan output and gate are ``[b, l, d]``."""
    if kind == "mamba1":
        return t
    return t[:, :d] if t.shape[-1] != d else t.transpose(1, 2)


def _channel_D(mixer: nn.Module, d: int) -> Optional[Tensor]:
    """The mixer's skip ``D`` per channel ``[d]`` (Mamba2's per-head ``D`` repeated over the head)."""
    D = getattr(mixer, "D", None)
    if not isinstance(D, Tensor) or d % D.numel():
        return None
    return D.detach().float().reshape(-1).repeat_interleave(d // D.numel())


def _record_stream(store: List[Tensor]):
    """A forward pre-hook keeping a block's input hidden states (positional or keyword)."""

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else kwargs.get("hidden_states")
        if isinstance(hidden, Tensor) and hidden.requires_grad:
            store.append(hidden)

    return hook


def scan_records(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Optional[Tensor],
    target: Optional[Tensor] = None,
    with_gradient: bool = False,
) -> Tuple[List[ScanRecord], Tensor]:
    """The scans of every Mamba1 or Mamba2 mixer in one forward (and one backward with
    ``with_gradient``), and the explained class per example (``target``, else predicted).

    Returns:
        ``(records, target)``, one :class:`ScanRecord` per mixer in order.

    Raises:
        RuntimeError: the model's mixers could not be read (not Mamba1/Mamba2 mixers, or a
            Mamba2 mixer with mamba-ssm's extra gated MLP).
        ValueError: a hybrid with attention layers (see :func:`_mixer_convs`).
    """
    rec = _Recorder()
    stream: List[Tensor] = []
    convs, mixers, names = _mixer_convs(model)
    # probes on the mixers' own components only (an MLP's gate is not a scan's gate)
    parts = {"conv_act": _ConvActProbe(rec), "ssm": _SSMProbe(rec), "gate": _GateProbe(rec), "gate_act": _GateActProbe(rec)}
    probes = composite("gradient", {f"{name}.{part}": rule for name in names for part, rule in parts.items()})
    patcher = Patcher()
    try:
        install_rules(model, probes, patcher=patcher)
        for conv in convs:
            patcher.add_handle(conv.register_forward_hook(lambda m, a, out: rec.conv.append((a[0].detach(), m.weight))))
        embedding = find_embedding(model)
        if embedding is None:
            raise ValueError("cannot find the model's token embedding (get_input_embeddings())")
        if with_gradient:
            patcher.add_handle(embedding.register_forward_hook(lambda m, a, out: out.detach().requires_grad_(True)))
            for name in names:  # the residual stream entering each mixer's block
                block = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
                patcher.add_handle(block.register_forward_pre_hook(_record_stream(stream), with_kwargs=True))
        with torch.set_grad_enabled(with_gradient):
            scores = LastTokenScores(model)(input_ids, attention_mask)
            if target is None:
                target = scores.argmax(-1)
            target = target.to(scores.device)
            grads: List[Optional[Tensor]] = [None] * (3 * len(rec.y))
            if with_gradient:
                explained = scores[torch.arange(scores.shape[0], device=scores.device), target]
                streams = stream if len(stream) == len(rec.y) else []
                grads = list(torch.autograd.grad(explained.sum(), rec.y + rec.out + streams, allow_unused=True))
                grads += [None] * (3 * len(rec.y) - len(grads))
    finally:
        patcher.restore()
    n = len(rec.y)
    if not n or not (len(rec.x) == len(rec.ssm) == len(rec.gate) == n):
        raise RuntimeError(
            "could not read the scans of the model's mixers (hidden attention needs Mamba1 or Mamba2 mixers, "
            "without mamba-ssm's extra gated MLP)"
        )
    keep = 1.0 if attention_mask is None else attention_mask[:, None, :].float()  # the scan sees padding zeroed
    records = []
    for k in range(n):
        delta, A, B, C = (t.detach().float() for t in rec.ssm[k])
        kind = "mamba1" if A.dim() == 2 else "ssd"
        d = rec.y[k].shape[1] if kind == "mamba1" else rec.y[k].shape[-1]

        def chan(t: Optional[Tensor], kind: str = kind, d: int = d) -> Optional[Tensor]:
            return None if t is None else _to_channels(t.detach().float(), kind, d)

        conv_in, conv_w = rec.conv[k] if len(rec.conv) == n else (None, None)
        g_stream = grads[2 * n + k]
        records.append(
            ScanRecord(
                x=_to_channels(rec.x[k].detach().float(), kind, d) * keep,
                delta=delta,
                A=A,
                B=B,
                C=C,
                y=_to_channels(rec.y[k].detach().float(), kind, d),
                grad_y=chan(grads[k]),
                kind=kind,
                D=_channel_D(mixers[k], d) if len(mixers) == n else None,
                conv_in=None if conv_in is None else conv_in[:, :d].float(),
                conv_pre=chan(rec.conv_pre[k]),
                conv_weight=None if conv_w is None else conv_w.detach().float()[:d, 0],
                gate=chan(rec.gate[k]),
                grad_out=chan(grads[n + k]),
                grad_stream=None if g_stream is None else g_stream.detach().float(),
            )
        )
    return records, target


def iter_hidden_attention(delta: Tensor, A: Tensor, B: Tensor, C: Tensor, chunk: int = 32) -> Iterator[Tuple[slice, Tensor]]:
    """``alpha [b, d_chunk, t, s]`` of a Mamba1 scan for consecutive channel chunks (see the module doc)."""
    length = delta.shape[-1]
    causal = torch.ones(length, length, dtype=torch.bool, device=delta.device).tril()
    for start in range(0, delta.shape[1], chunk):
        sl = slice(start, min(start + chunk, delta.shape[1]))
        cum = delta[:, sl].cumsum(-1)  # [b, dc, l]
        span = (cum[..., :, None] - cum[..., None, :]).masked_fill(~causal, 0.0)  # sum_{r=s+1..t} delta_r
        decay = torch.exp(span[..., None] * A[sl][None, :, None, None, :])  # [b, dc, t, s, n]
        alpha = torch.einsum("bdtsn,bnt,bns->bdts", decay, C, B) * delta[:, sl, None, :]
        yield sl, alpha * causal


def hidden_attention(delta: Tensor, A: Tensor, B: Tensor, C: Tensor, chunk: int = 32) -> Tensor:
    """The per-channel hidden attention matrices ``[b, d, l, l]`` of one Mamba1 scan."""
    return torch.cat([alpha for _, alpha in iter_hidden_attention(delta, A, B, C, chunk)], dim=1)


@torch.no_grad()
def ssd_hidden_attention(dt: Tensor, A: Tensor, B: Tensor, C: Tensor) -> Tensor:
    """The per-head matrices ``M [b, h, t, s]`` of one SSD (Mamba2) scan, ``dt [b, l, h]``,
    ``A [h]``, ``B, C [b, l, g, n]``: the package's SSD scan of the identity (see the module doc).

    >>> dt, A = torch.full((1, 3, 1), 0.5), torch.tensor([-1.0])
    >>> B = C = torch.ones(1, 3, 1, 1)
    >>> M = ssd_hidden_attention(dt, A, B, C)[0, 0]
    >>> torch.allclose(M[2], torch.tensor([0.5 * torch.exp(torch.tensor(-1.0)), 0.5 * torch.exp(torch.tensor(-0.5)), 0.5]))
    True
    """
    b, length, heads = dt.shape
    eye = torch.eye(length, dtype=dt.dtype, device=dt.device)[None, :, None, :].expand(b, length, heads, length)
    return ssd_scan(eye.contiguous(), dt, A, B, C, None, backend="torch").permute(0, 2, 1, 3)


def iter_channel_attention(record: ScanRecord, chunk: int = 32) -> Iterator[Tuple[slice, Tensor]]:
    """``alpha [b, d_chunk, t, s]`` of any record (Mamba1 or SSD), for consecutive channel chunks."""
    if record.kind == "mamba1":
        yield from iter_hidden_attention(record.delta, record.A, record.B, record.C, chunk)
        return
    heads = ssd_hidden_attention(record.delta, record.A, record.B, record.C)  # [b, h, t, s]
    head_dim = record.channels // heads.shape[1]
    for start in range(0, record.channels, chunk):
        sl = slice(start, min(start + chunk, record.channels))
        yield sl, heads[:, torch.arange(sl.start, sl.stop, device=heads.device) // head_dim]


def implicit_attention(record: ScanRecord, sl: slice, alpha: Tensor) -> Tensor:
    r"""The implicit attention ``alpha~ [b, d_chunk, t, s']`` of channels ``sl`` (module doc):
    the map from the conv's input ``u`` to the gated output ``silu(z) * y``.

    Raises:
        ValueError: the record lacks the conv or the gate (taken without a mixer conv).
    """
    if record.conv_pre is None or record.conv_weight is None or record.gate is None or record.D is None:
        raise ValueError("the implicit attention needs the conv, the gate and D of the mixer (scan_records of a Mamba model)")
    length = alpha.shape[-1]
    eye = torch.eye(length, device=alpha.device, dtype=alpha.dtype)
    a = (alpha + record.D[sl, None, None] * eye) * torch.sigmoid(record.conv_pre[:, sl, None, :])
    w = record.conv_weight[sl]  # [dc, k]: c_s = sum_j w[k - 1 - j] u_{s - j}
    k = w.shape[-1]
    out = torch.zeros_like(a)
    for j in range(min(k, length)):
        out[..., : length - j] += a[..., j:] * w[None, :, None, k - 1 - j, None]
    return out * record.gate[:, sl, :, None]


def layer_map(record: ScanRecord, gradient_weighted: bool, chunk: int = 32, implicit: bool = False) -> Tensor:
    """One layer's channel-aggregated map ``[b, l, l]``: ``mean_d |alpha|``, or
    ``mean_d (grad_alpha (.) alpha)^+`` when ``gradient_weighted`` (before scaling); with
    ``implicit``, of the implicit attention ``alpha~`` (gradient at the gated output times ``u``)."""
    b, d, l = record.x.shape
    total = torch.zeros(b, l, l, device=record.x.device)
    for sl, alpha in iter_channel_attention(record, chunk):
        if implicit:
            alpha = implicit_attention(record, sl, alpha)
        if gradient_weighted:
            g, inp = (record.grad_out, record.conv_in) if implicit else (record.grad_y, record.x)
            if g is None or inp is None:
                raise ValueError("the gradient-weighted map needs scan records taken with_gradient=True")
            total += (g[:, sl, :, None] * inp[:, sl, None, :] * alpha).clamp(min=0).sum(1)
        else:
            total += alpha.abs().sum(1)
    return total / d


def mamba_attr_map(record: ScanRecord, real: Tensor, chunk: int = 32) -> Tensor:
    r"""One layer's map ``[b, l, l]`` as in Ali et al.'s code (``generate_mamba_attr``):
    :func:`mamba_attr_attention` (``mean_d alpha^+ / max alpha^+``) with each column ``s``
    weighted by :func:`mamba_attr_weights` (``g_s``).

    Raises:
        ValueError: the record lacks ``grad_stream`` (scan_records without gradients).
    """
    weights = mamba_attr_weights(record, real)
    return mamba_attr_attention(record, chunk) * weights[:, None, :]


def mamba_attr_attention(record: ScanRecord, chunk: int = 32) -> Tensor:
    """Mamba-Attr's attention part ``[b, l, l]``: ``mean_d alpha^+ / max alpha^+`` (the maximum
    per example, over every channel)."""
    b, d, length = record.x.shape
    total = torch.zeros(b, length, length, device=record.x.device)
    top = torch.zeros(b, device=record.x.device)
    for _, alpha in iter_channel_attention(record, chunk):
        positive = alpha.clamp(min=0)
        total += positive.sum(1)
        top = torch.maximum(top, positive.flatten(1).max(dim=1).values)
    return total / d / top.clamp_min(1e-30)[:, None, None]


def mamba_attr_weights(record: ScanRecord, real: Tensor) -> Tensor:
    r"""Mamba-Attr's column weights ``[b, l]``: ``g_s = max_h (\partial S / \partial r_{s,h})^+``
    with ``r`` the residual stream entering the block, min-max normalised over the real tokens
    (0 on padding).

    Raises:
        ValueError: the record lacks ``grad_stream`` (scan_records without gradients).
    """
    if record.grad_stream is None:
        raise ValueError("Mamba-Attr needs the gradient at each block's input: scan_records(..., with_gradient=True)")
    g = record.grad_stream.clamp(min=0).max(dim=-1).values  # [b, l]
    low = g.masked_fill(~real, math.inf).min(dim=1, keepdim=True).values
    high = g.masked_fill(~real, -math.inf).max(dim=1, keepdim=True).values
    return ((g - low) / (high - low).clamp_min(1e-30)).masked_fill(~real, 0.0)


def rollout(maps: List[Tensor], rescale: bool = True) -> Tensor:
    """``R = M~_L ... M~_1`` with ``M~ = rownorm(I + M / max(M))`` per example: each
    layer's non-negative map is scaled to a maximum of 1 (the authors' code min-max
    normalises it) so that the residual identity does not swamp it; ``rescale=False``
    adds the maps as they are (Mamba-Attr's, already in ``[0, 1]``)."""
    eye = torch.eye(maps[0].shape[-1], device=maps[0].device).expand_as(maps[0])
    joint: Optional[Tensor] = None
    for m in maps:
        top = m.flatten(1).max(dim=1).values.clamp_min(1e-30)[:, None, None] if rescale else 1.0
        step = eye + m / top
        step = step / step.sum(-1, keepdim=True)
        joint = step if joint is None else step @ joint
    if joint is None:
        raise ValueError("rollout needs at least one layer map")
    return joint


def mamba_attr_start(layers: int) -> int:
    """The first layer of Mamba-Attr's rollout: Ali et al. roll out layers 15-23 of their
    24-layer models (``start_layer=15``); other depths keep the same share.

    >>> mamba_attr_start(24), mamba_attr_start(2)
    (15, 1)
    """
    return (15 * layers) // 24


class HiddenAttentionAttribution(TokenAttribution):
    """Token relevance from Mamba's hidden attention (Mamba1 or Mamba2): the explained
    position's row of the attention rollout (``gradient_weighted=False``, class-agnostic) or of
    the gradient-weighted rollout (``mean_d (grad_alpha (.) alpha)^+``); with
    ``implicit=True``, of the implicit attention of Zimerman et al. (2025); with
    ``mamba_attr=True``, Ali et al.'s Mamba-Attr as their code computes it
    (:func:`mamba_attr_map`, rolled out from layer ``start_layer``, default
    :func:`mamba_attr_start`)."""

    def __init__(
        self,
        model: nn.Module,
        gradient_weighted: bool = False,
        chunk_channels: int = 32,
        implicit: bool = False,
        mamba_attr: bool = False,
        start_layer: Optional[int] = None,
    ) -> None:
        super().__init__(model)
        self.gradient_weighted = gradient_weighted or mamba_attr
        self.chunk = chunk_channels
        self.implicit = implicit
        self.mamba_attr = mamba_attr
        self.start_layer = start_layer

    def _attribute(self, inputs: Tensor, target: Tensor, mask: Tensor) -> Tensor:
        records, _ = scan_records(self.model, inputs, mask, target, with_gradient=self.gradient_weighted)
        real = mask.bool()
        pair = (real[:, :, None] & real[:, None, :]).float()
        if self.mamba_attr:
            start = mamba_attr_start(len(records)) if self.start_layer is None else self.start_layer
            maps = [mamba_attr_map(r, real, self.chunk) * pair for r in records[start:]]
            if not maps:
                raise ValueError(f"start_layer {start} leaves none of the model's {len(records)} Mamba layers to roll out")
            joint = rollout(maps, rescale=False)
        else:
            maps = [layer_map(r, self.gradient_weighted, self.chunk, self.implicit) * pair for r in records]
            joint = rollout(maps)
        last = last_positions(real, inputs.shape[0], inputs.shape[1], inputs.device)
        return joint[torch.arange(inputs.shape[0], device=inputs.device), last]
