"""The types every attribution method of the evaluation package shares: the settings of the
baselines (:class:`MethodOptions`) and the interface of a token attribution
(:class:`TokenAttribution`). :mod:`.methods` (the registry) and :mod:`.hidden_attention` both
build on this module, so neither imports the other's internals.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

import torch
from captum.attr import Attribution
from torch import Tensor, nn

from ..attribution.mamba_lrp import find_embedding


@dataclass
class MethodOptions:
    """Settings of the baselines (defaults are the study's).

    reference_token_id: baseline token of Integrated Gradients, FeatureAblation and KernelShap.
    ig_steps: Integrated Gradients steps (Captum's default, 50).
    smoothgrad_samples / smoothgrad_noise: SmoothGrad samples and noise level; the noise
        standard deviation is ``noise * (max - min)`` of the embedding matrix (Smilkov et al.
        recommend 10-20 % of the input range).
    kernelshap_samples: coalitions sampled per example by KernelShap.
    perturbations_per_eval: perturbed copies evaluated per forward (batching only).
    ig_internal_batch_size / smoothgrad_samples_per_pass: rows per forward of IG, noise samples
        per forward of SmoothGrad (batching only: the same numbers, twice as fast on the CPU
        as everything at once).
    chunk_channels: channels per chunk when materialising hidden attention.
    """

    reference_token_id: int = 0
    ig_steps: int = 50
    smoothgrad_samples: int = 20
    smoothgrad_noise: float = 0.15
    kernelshap_samples: int = 200
    perturbations_per_eval: int = 64
    ig_internal_batch_size: int = 64
    smoothgrad_samples_per_pass: int = 4
    chunk_channels: int = 32

    def as_dict(self) -> dict:
        return asdict(self)


class TokenAttribution(Attribution):
    """A method giving one relevance per token for the class ``target`` of each example."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self.model = model
        embedding = find_embedding(model)
        if embedding is None:
            raise ValueError("cannot find the model's token embedding (get_input_embeddings())")
        self.embedding = embedding

    def attribute(self, inputs: Tensor, target: Tensor, attention_mask: Optional[Tensor] = None) -> Tensor:  # type: ignore[override]
        """Relevance ``[B, L]`` of token ids ``inputs`` for class ``target[b]`` of each example."""
        mask = torch.ones_like(inputs) if attention_mask is None else attention_mask
        target = torch.as_tensor(target, device=inputs.device).long().reshape(-1)
        relevance = self._attribute(inputs, target, mask)
        return relevance.detach().float() * mask.to(torch.float32)

    def _attribute(self, inputs: Tensor, target: Tensor, mask: Tensor) -> Tensor:
        raise NotImplementedError
