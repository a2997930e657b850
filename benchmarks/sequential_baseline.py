"""The plain sequential MambaLRP the issue compares against (the reference's approach).

The public reference implementation's PyTorch path, written from its recipe: per layer
the discretised ``exp(delta A)`` and ``delta B x`` are formed as ``B x D x L x N``
tensors, a Python loop over time runs the recurrence with autograd through every step
(so every state is kept for the backward pass), and the rules are the same as
MambaLRP's: SiLU identity (``x * sigmoid(x).detach()``), the half rule at the gate,
RMSNorm's ``rsqrt`` detached, delta/A/B/C constant. Linear layers are plain (as in the
reference). It shares no code with the package.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _silu_identity(x: Tensor) -> Tensor:
    return x * torch.sigmoid(x).detach()


def _rmsnorm(norm: nn.Module, x: Tensor) -> Tensor:
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6))
    x32 = x.float()
    scale = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps).detach()
    return norm.weight * (x32 * scale).to(x.dtype)


def _mixer(mixer: nn.Module, hidden: Tensor) -> Tensor:
    b, l, _ = hidden.shape
    xz = mixer.in_proj(hidden).transpose(1, 2)
    x, z = xz.chunk(2, dim=1)
    x = _silu_identity(mixer.conv1d(x)[..., :l])
    dt, B, C = torch.split(
        mixer.x_proj(x.transpose(1, 2)), [mixer.time_step_rank, mixer.ssm_state_size, mixer.ssm_state_size], dim=-1
    )
    delta = F.softplus(mixer.dt_proj(dt)).transpose(1, 2)  # [b, d, l]
    A = -torch.exp(mixer.A_log.float())
    dA = torch.exp(A[None, :, None, :] * delta[:, :, :, None]).detach()  # [b, d, l, n]
    dB = (delta[:, :, :, None] * B[:, None, :, :].float()).detach()  # [b, d, l, n]
    C = C.detach()
    dBx = dB * x[:, :, :, None].float()  # [b, d, l, n], in the graph
    h = torch.zeros(b, x.shape[1], A.shape[1], device=x.device)
    ys = []
    for i in range(l):
        h = dA[:, :, i, :] * h + dBx[:, :, i, :]
        ys.append(torch.matmul(h, C[:, i, :].unsqueeze(-1))[:, :, 0])
    y = torch.stack(ys, dim=-1) + x * mixer.D[None, :, None]
    y = y * _silu_identity(z)
    y = y / 2.0 + (y / 2.0).detach()
    return mixer.out_proj(y.transpose(1, 2))


def baseline_relevance(model: nn.Module, input_ids: Tensor, cls: int) -> Tensor:
    """Token relevance ``[B, L]`` of ``logits[:, -1, cls]`` for a model with ``backbone``
    (``MambaModel``) and ``lm_head`` (``MambaForLastTokenClassification``, ``*ForCausalLM``)."""
    backbone = model.backbone
    for p in model.parameters():
        p.requires_grad_(False)
    emb = backbone.embeddings(input_ids).detach().requires_grad_(True)
    h = emb
    for block in backbone.layers:
        h = h + _mixer(block.mixer, _rmsnorm(block.norm, h))
    h = _rmsnorm(backbone.norm_f, h)
    score = model.lm_head(h)[:, -1, cls].sum()
    (grad,) = torch.autograd.grad(score, emb)
    return (emb * grad).sum(-1).detach()
