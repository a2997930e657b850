"""The paper's text classifier: a Mamba backbone whose ``lm_head`` maps to the classes,
read at the last real token."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn
from transformers import MambaConfig, MambaModel, MambaPreTrainedModel
from transformers.utils import ModelOutput


@dataclass
class LastTokenClassifierOutput(ModelOutput):
    """``logits``: class scores at every position ``[B, L, C]``; read them at the last
    real token (``MambaLRP``'s int target does exactly that)."""

    loss: Optional[Tensor] = None
    logits: Optional[Tensor] = None


def last_real_index(attention_mask: Optional[Tensor], batch: int, length: int, device: torch.device) -> Tensor:
    """Index of the last real token of each example (works for left and right padding)."""
    if attention_mask is None:
        return torch.full((batch,), length - 1, device=device, dtype=torch.long)
    positions = torch.arange(length, device=device).expand(batch, length)
    return torch.where(attention_mask.bool(), positions, -1).max(dim=1).values


class MambaForLastTokenClassification(MambaPreTrainedModel):
    """``MambaModel`` + ``lm_head = nn.Linear(hidden, num_labels)`` at every position.

    Saved and loaded with ``save_pretrained`` / ``from_pretrained`` like any
    transformers model; ``labels`` gives the cross-entropy at the last real token.
    """

    config_class = MambaConfig

    def __init__(self, config: MambaConfig) -> None:
        super().__init__(config)
        self.backbone = MambaModel(config)
        if config.num_labels is None:
            raise ValueError("MambaForLastTokenClassification needs config.num_labels (the number of classes)")
        self.lm_head = nn.Linear(config.hidden_size, config.num_labels, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.backbone.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.backbone.set_input_embeddings(value)

    def forward(
        self,
        input_ids: Optional[Tensor] = None,
        attention_mask: Optional[Tensor] = None,
        inputs_embeds: Optional[Tensor] = None,
        labels: Optional[Tensor] = None,
        use_cache: Optional[bool] = None,
        **kwargs,
    ) -> LastTokenClassifierOutput:
        hidden = self.backbone(
            input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask, use_cache=False
        ).last_hidden_state
        logits = self.lm_head(hidden.to(self.lm_head.weight.dtype)).float()
        loss = None
        if labels is not None:
            b, l = logits.shape[:2]
            last = last_real_index(attention_mask, b, l, logits.device)
            loss = nn.functional.cross_entropy(logits[torch.arange(b, device=logits.device), last], labels)
        return LastTokenClassifierOutput(loss=loss, logits=logits)

    @torch.no_grad()
    def predict(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None) -> Tensor:
        """Class probabilities at the last real token, ``[B, C]``."""
        logits = self.forward(input_ids=input_ids, attention_mask=attention_mask).logits
        assert logits is not None  # forward always returns logits
        b, l = logits.shape[:2]
        last = last_real_index(attention_mask, b, l, logits.device)
        return logits[torch.arange(b, device=logits.device), last].softmax(-1)
