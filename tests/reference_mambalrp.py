"""An independent MambaLRP for tests: the paper's PyTorch recipe, step by step.

Written from the paper's equations and the public reference implementation's PyTorch
path (a Python loop over time with autograd through it; discretised A, B and C
detached; SiLU as ``x_s * (silu(x) / x_s).detach()`` with a stabilised ``x_s``; the
gate's output halved in the gradient; RMSNorm's ``rsqrt`` detached; linear layers
unmodified). It shares no code with the package and reads transformers modules
directly, so agreement with ``MambaLRP`` is a real check.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _stabilize(z):
    return z + ((z == 0.0).to(z) + z.sign()) * 1e-6


def _silu_identity(x):
    zs = _stabilize(x)
    return zs * (F.silu(x) / zs).detach()


def _rmsnorm(norm, x):
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6))
    x32 = x.float()
    d = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps).detach()
    return norm.weight * (x32 * d).to(x.dtype)


def _mixer(mixer, hidden):
    b, l, _ = hidden.shape
    xz = mixer.in_proj(hidden).transpose(1, 2)
    x, z = xz.chunk(2, dim=1)
    x = _silu_identity(mixer.conv1d(x)[..., :l])
    params = mixer.x_proj(x.transpose(1, 2))
    dt, B, C = torch.split(params, [mixer.time_step_rank, mixer.ssm_state_size, mixer.ssm_state_size], dim=-1)
    if hasattr(mixer, "b_layernorm"):
        dt, B, C = mixer.dt_layernorm(dt), mixer.b_layernorm(B), mixer.c_layernorm(C)
    delta = F.softplus(mixer.dt_proj(dt)).transpose(1, 2)  # [b, d, l]
    A = -torch.exp(mixer.A_log.float())
    dA = torch.exp(A[None, :, None, :] * delta[:, :, :, None]).detach()
    dB = (delta[:, :, :, None] * B[:, None, :, :].float()).detach()
    C = C.detach()
    dBx = dB * x[:, :, :, None].float()
    h = torch.zeros(b, x.shape[1], A.shape[1])
    ys = []
    for i in range(l):
        h = dA[:, :, i, :] * h + dBx[:, :, i, :]
        ys.append(torch.matmul(h, C[:, i, :].unsqueeze(-1))[:, :, 0])
    y = torch.stack(ys, dim=-1) + x * mixer.D[None, :, None]
    y = y * _silu_identity(z)
    y = y / 2.0 + (y / 2.0).detach()
    return mixer.out_proj(y.transpose(1, 2))


def reference_relevance(model, input_ids, position: int, cls: int):
    """Token relevance ``[B, L]`` of ``logits[:, position, cls]`` for a ``*ForCausalLM``."""
    backbone = model.backbone
    emb = backbone.embeddings(input_ids).detach().requires_grad_(True)
    h = emb
    for block in backbone.layers:
        h = h + _mixer(block.mixer, _rmsnorm(block.norm, h))
    h = _rmsnorm(backbone.norm_f, h)
    logits = model.lm_head(h)
    score = logits[:, position, cls].sum()
    (grad,) = torch.autograd.grad(score, emb)
    return (emb * grad).sum(-1).detach(), logits[:, position, cls].detach()
