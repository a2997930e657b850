"""Tiny random Mamba models for the tests (no network, no hub)."""

from __future__ import annotations

import os
import sys

import pytest
import torch
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))
# mamba-ssm's SSD kernels run float32 dots in TF32 unless Triton is told otherwise; the GPU tests
# compare float32 math with the CPU path to 1e-4, so every test session asks for IEEE dots.
os.environ.setdefault("TRITON_F32_DEFAULT", "ieee")
torch.set_num_threads(1)  # tiny models: threads only add overhead on a small shared machine


def make_config(arch: str = "mamba", **overrides):
    from transformers import FalconMambaConfig, MambaConfig

    base = dict(
        vocab_size=64,
        hidden_size=16,
        state_size=4,
        num_hidden_layers=2,
        conv_kernel=4,
        expand=2,
        use_bias=False,
        use_conv_bias=True,
        time_step_rank=4,
    )
    base.update(overrides)
    return (FalconMambaConfig if arch == "falcon" else MambaConfig)(**base)


def make_lm(arch: str = "mamba", seed: int = 0, **overrides) -> nn.Module:
    from transformers import FalconMambaForCausalLM, MambaForCausalLM

    torch.manual_seed(seed)
    cls = FalconMambaForCausalLM if arch == "falcon" else MambaForCausalLM
    model = cls(make_config(arch, **overrides)).eval()
    randomize(model, seed)
    return model


def randomize(model: nn.Module, seed: int = 0) -> None:
    """Give norms and D non-trivial values so that every rule matters."""
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith("norm_f.weight"):
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
            elif name.endswith(".D"):
                p.copy_(torch.randn(p.shape, generator=g))


def zero_biases(model: nn.Module) -> nn.Module:
    """Zero every bias that carries relevance (dt_proj's bias is a scan parameter)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") and "dt_proj" not in name:
                p.zero_()
    return model


class LastTokenClassifier(nn.Module):
    """The paper's classifier: a Mamba backbone and ``lm_head = Linear(hidden, n_classes)``."""

    def __init__(self, backbone: nn.Module, n_classes: int = 3) -> None:
        super().__init__()
        self.backbone = backbone
        self.lm_head = nn.Linear(backbone.config.hidden_size, n_classes, bias=False)

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None):
        h = self.backbone(input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask).last_hidden_state
        return self.lm_head(h)


@pytest.fixture
def lm():
    return zero_biases(make_lm("mamba"))


@pytest.fixture
def falcon_lm():
    return zero_biases(make_lm("falcon"))


def relative_delta(delta: torch.Tensor, explained: torch.Tensor) -> torch.Tensor:
    return delta.abs() / explained.abs().clamp_min(1e-12)
