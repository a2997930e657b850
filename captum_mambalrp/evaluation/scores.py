"""The explained score as a plain ``[B, C]`` function, and counting forward passes.

Captum's perturbation and gradient methods expect ``forward_func(inputs, *args) -> [B, C]``
and a class ``target``. The paper's classifiers return ``[B, L, C]`` logits read at the last
real token; :class:`LastTokenScores` makes that reading a module of its own, fed with token
ids ``[B, L]`` or embeddings ``[B, L, H]``.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import torch
from torch import Tensor, nn

from ..attribution.targets import output_scores
from ..models.kernel_path import off_cuda


def last_positions(mask: Optional[Tensor], batch: int, length: int, device: torch.device) -> Tensor:
    """Index of the last real token per example (``L - 1`` without a mask)."""
    if mask is None:
        return torch.full((batch,), length - 1, dtype=torch.long, device=device)
    positions = torch.arange(length, device=device).expand(batch, length)
    return torch.where(mask.bool(), positions, -1).max(dim=1).values


class LastTokenScores(nn.Module):
    """``x -> scores [B, C]``: the model's class scores at the last real token.

    ``x`` is token ids ``[B, L]`` (any dtype: Captum's KernelShap hands them over as
    floats) or embeddings ``[B, L, H]`` (passed as ``inputs_embeds``). Models returning
    ``[B, C]`` pass through unchanged.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor, attention_mask: Optional[Tensor] = None) -> Tensor:
        with off_cuda(self.model):  # transformers would call mamba-ssm's CUDA kernels on the CPU
            if x.dim() == 3:
                out = self.model(inputs_embeds=x, attention_mask=attention_mask)
            else:
                out = self.model(input_ids=x.long(), attention_mask=attention_mask)
        scores = output_scores(out).float()
        if scores.dim() == 2:
            return scores
        if scores.dim() != 3:
            raise ValueError(f"expected [B, C] or [B, L, C] scores; got shape {tuple(scores.shape)}")
        last = last_positions(attention_mask, scores.shape[0], scores.shape[1], scores.device)
        return scores[torch.arange(scores.shape[0], device=scores.device), last]


@dataclass
class ForwardCount:
    """Forward calls of a model and the examples (rows) they processed."""

    calls: int = 0
    rows: int = 0


class ForwardCounter:
    """Counts ``model.forward`` calls and rows with a forward pre-hook (a context manager).

    ``rows`` sums the batch size of every call: a method that evaluates 50 perturbed copies
    of one example costs 50 rows, whether in one call or in fifty.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.count = ForwardCount()
        self._handle: Any = None

    def _hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        first = next((a for a in list(args) + list(kwargs.values()) if isinstance(a, Tensor)), None)
        self.count.calls += 1
        self.count.rows += int(first.shape[0]) if first is not None and first.dim() > 0 else 1

    def __enter__(self) -> ForwardCounter:
        self.count = ForwardCount()
        self._handle = self.model.register_forward_pre_hook(self._hook, with_kwargs=True)
        return self

    def __exit__(self, *exc: object) -> None:
        self._handle.remove()


@contextmanager
def package_forward(model: nn.Module, enabled: bool = True) -> Iterator[bool]:
    """Run ``model`` through this package's selective scan with plain-gradient rules.

    The function computed is the model's own (every rule is the identity on values and
    on gradients), but on the CPU the package's chunked scan is several times faster than
    transformers' reference fallback, a Python loop over tokens, in the backward pass.
    Models the package cannot take over run unchanged; yields whether it took over.
    """
    from ..adapters import Patcher, UnsupportedModelError, install_rules
    from ..rules.composites import composite

    patcher = Patcher()
    took_over = False
    if enabled:
        try:
            install_rules(model, composite("gradient"), patcher=patcher)
            took_over = True
        except UnsupportedModelError:
            patcher.restore()
    try:
        yield took_over
    finally:
        patcher.restore()
