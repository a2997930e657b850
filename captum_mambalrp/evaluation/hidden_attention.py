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

The scan quantities are read from the model's own forward through the core's rule hooks:
probe rules that act as the plain gradient and record ``x``, ``delta, A, B, C`` and ``y``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, List, Optional, Tuple

import torch
from torch import Tensor, nn

from ..adapters import Patcher, install_rules
from ..attribution.mamba_lrp import find_embedding
from ..rules.base import GradientRule
from ..rules.composites import composite
from .base import TokenAttribution
from .scores import LastTokenScores, last_positions


@dataclass
class ScanRecord:
    """One mixer's scan: ``x, delta, y [b, d, l]``, ``A [d, n]``, ``B, C [b, n, l]``, and
    ``grad_y`` (gradient of the explained score at ``y``) when asked for."""

    x: Tensor
    delta: Tensor
    A: Tensor
    B: Tensor
    C: Tensor
    y: Tensor
    grad_y: Optional[Tensor] = None


@dataclass
class _Recorder:
    x: List[Tensor] = field(default_factory=list)
    ssm: List[Tuple[Tensor, ...]] = field(default_factory=list)
    y: List[Tensor] = field(default_factory=list)


class _ConvActProbe(GradientRule):
    def __init__(self, rec: _Recorder) -> None:
        self.rec = rec

    def activation(self, x, fn):  # the scan input, [b, d, l]
        out = fn(x)
        self.rec.x.append(out)
        return out


class _SSMProbe(GradientRule):
    def __init__(self, rec: _Recorder) -> None:
        self.rec = rec

    def ssm_constants(self, delta, A, B, C):
        if delta.dim() != 3 or A.dim() != 2:
            raise NotImplementedError("hidden attention is implemented for Mamba1 mixers (delta [b, d, l], A [d, n])")
        self.rec.ssm.append((delta, A, B, C))
        return delta, A, B, C


class _GateProbe(GradientRule):
    def __init__(self, rec: _Recorder) -> None:
        self.rec = rec

    def gate(self, y, g):  # y: the scan output D x included, [b, d, l]
        self.rec.y.append(y)
        return y * g


def scan_records(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Optional[Tensor],
    target: Optional[Tensor] = None,
    with_gradient: bool = False,
) -> Tuple[List[ScanRecord], Tensor]:
    """The scans of every Mamba1 mixer in one forward (and one backward with
    ``with_gradient``), and the explained class per example (``target``, else predicted)."""
    rec = _Recorder()
    probes = composite("gradient", {"*.conv_act": _ConvActProbe(rec), "*.ssm": _SSMProbe(rec), "*.gate": _GateProbe(rec)})
    patcher = Patcher()
    try:
        install_rules(model, probes, patcher=patcher)
        embedding = find_embedding(model)
        if embedding is None:
            raise ValueError("cannot find the model's token embedding (get_input_embeddings())")
        if with_gradient:
            patcher.add_handle(embedding.register_forward_hook(lambda m, a, out: out.detach().requires_grad_(True)))
        with torch.set_grad_enabled(with_gradient):
            scores = LastTokenScores(model)(input_ids, attention_mask)
            if target is None:
                target = scores.argmax(-1)
            target = target.to(scores.device)
            grads: List[Optional[Tensor]] = [None] * len(rec.y)
            if with_gradient:
                explained = scores[torch.arange(scores.shape[0], device=scores.device), target]
                grads = list(torch.autograd.grad(explained.sum(), rec.y, allow_unused=True))
    finally:
        patcher.restore()
    if not (len(rec.x) == len(rec.ssm) == len(rec.y)) or not rec.y:
        raise RuntimeError("could not read the scans of the model's mixers (hidden attention needs Mamba1 mixers)")
    keep = 1.0 if attention_mask is None else attention_mask[:, None, :].float()  # the scan sees padding zeroed
    records = []
    for x, (delta, A, B, C), y, g in zip(rec.x, rec.ssm, rec.y, grads):
        x, delta, A, B, C, y = (t.detach().float() for t in (x, delta, A, B, C, y))
        records.append(ScanRecord(x * keep, delta, A, B, C, y, grad_y=None if g is None else g.detach().float()))
    return records, target


def iter_hidden_attention(delta: Tensor, A: Tensor, B: Tensor, C: Tensor, chunk: int = 32) -> Iterator[Tuple[slice, Tensor]]:
    """``alpha [b, d_chunk, t, s]`` for consecutive channel chunks (see the module doc)."""
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


def layer_map(record: ScanRecord, gradient_weighted: bool, chunk: int = 32) -> Tensor:
    """One layer's channel-aggregated map ``[b, l, l]``: ``mean_d |alpha|``, or
    ``mean_d (grad_alpha (.) alpha)^+`` when ``gradient_weighted`` (before scaling)."""
    b, d, l = record.delta.shape
    total = torch.zeros(b, l, l, device=record.delta.device)
    for sl, alpha in iter_hidden_attention(record.delta, record.A, record.B, record.C, chunk):
        if gradient_weighted:
            if record.grad_y is None:
                raise ValueError("the gradient-weighted map needs scan records taken with_gradient=True")
            grad = record.grad_y[:, sl, :, None] * record.x[:, sl, None, :]
            total += (grad * alpha).clamp(min=0).sum(1)
        else:
            total += alpha.abs().sum(1)
    return total / d


def rollout(maps: List[Tensor]) -> Tensor:
    """``R = M~_L ... M~_1`` with ``M~ = rownorm(I + M / max(M))`` per example: each
    layer's non-negative map is scaled to a maximum of 1 (the authors' code min-max
    normalises it) so that the residual identity does not swamp it."""
    eye = torch.eye(maps[0].shape[-1], device=maps[0].device).expand_as(maps[0])
    joint: Optional[Tensor] = None
    for m in maps:
        top = m.flatten(1).max(dim=1).values.clamp_min(1e-30)[:, None, None]
        step = eye + m / top
        step = step / step.sum(-1, keepdim=True)
        joint = step if joint is None else step @ joint
    if joint is None:
        raise ValueError("rollout needs at least one layer map")
    return joint


class HiddenAttentionAttribution(TokenAttribution):
    """Token relevance from Mamba's hidden attention: the explained position's row of the
    attention rollout (``gradient_weighted=False``, class-agnostic) or of Mamba-Attr."""

    def __init__(self, model: nn.Module, gradient_weighted: bool = False, chunk_channels: int = 32) -> None:
        super().__init__(model)
        self.gradient_weighted = gradient_weighted
        self.chunk = chunk_channels

    def _attribute(self, inputs: Tensor, target: Tensor, mask: Tensor) -> Tensor:
        records, _ = scan_records(self.model, inputs, mask, target, with_gradient=self.gradient_weighted)
        real = mask.bool()
        pair = (real[:, :, None] & real[:, None, :]).float()
        maps = [layer_map(r, self.gradient_weighted, self.chunk) * pair for r in records]
        joint = rollout(maps)
        last = last_positions(real, inputs.shape[0], inputs.shape[1], inputs.device)
        return joint[torch.arange(inputs.shape[0], device=inputs.device), last]
