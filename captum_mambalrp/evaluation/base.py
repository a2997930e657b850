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

REFERENCES = ("zero", "mean", "token")


@dataclass(frozen=True)
class Reference:
    """The reference input (baseline) of a method, one embedding ``[H]`` put in place of a
    token: a zero embedding (``"zero"``), the mean of the embedding matrix (``"mean"``) or the
    embedding of token ``token_id`` (``"token"``). Perturbation uses the same three for a
    removed token (:class:`~.perturbation.Perturbation`).

    >>> Reference.parse("token:1").name, Reference.parse("mean").name
    ('token:1', 'mean')
    """

    kind: str = "token"
    token_id: int = 0

    def __post_init__(self) -> None:
        if self.kind not in REFERENCES:
            raise ValueError(f"reference must be one of {REFERENCES} (or token:ID); got {self.kind!r}")

    @property
    def name(self) -> str:
        """``"zero"``, ``"mean"`` or ``"token:ID"``."""
        return f"token:{self.token_id}" if self.kind == "token" else self.kind

    @classmethod
    def parse(cls, spec: str, token_id: int = 0) -> Reference:
        """``"zero"``, ``"mean"``, ``"token"`` (the token ``token_id``) or ``"token:ID"``.

        Raises:
            ValueError: any other spelling.
        """
        kind, _, tid = spec.partition(":")
        if tid:
            if kind != "token" or not tid.isdigit():
                raise ValueError(f"reference must be zero, mean, token or token:ID; got {spec!r}")
            return cls("token", int(tid))
        return cls(kind, token_id)

    def vector(self, embedding: nn.Embedding) -> Tensor:
        """The reference embedding ``[H]`` (detached)."""
        weight = embedding.weight.detach()
        if self.kind == "zero":
            return torch.zeros_like(weight[0])
        if self.kind == "mean":
            return weight.mean(dim=0)
        return weight[self.token_id]


@dataclass
class MethodOptions:
    """Settings of the baselines (defaults are the study's).

    reference: the reference of every method that has one (Integrated Gradients, occlusion,
        KernelShap, SmoothGrad's ``gradient x (input - reference)``): ``"zero"``, ``"mean"``,
        ``"token"`` (``reference_token_id``) or ``"token:ID"``; ``None`` gives each method its
        usual one: the token ``reference_token_id`` for IG, occlusion and KernelShap, zero for
        SmoothGrad. A method key ``name@ref`` overrides it for that method.
    reference_token_id: the reference token (``"token"``), by default the padding token.
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
    reference: Optional[str] = None

    def __post_init__(self) -> None:
        if self.reference is not None:
            Reference.parse(self.reference, self.reference_token_id)

    def reference_for(self, default: str) -> Reference:
        """The reference a method uses whose usual one is ``default``."""
        return Reference.parse(self.reference or default, self.reference_token_id)

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
