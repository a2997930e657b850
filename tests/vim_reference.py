"""An independent Vision Mamba forward and MambaLRP, step by step (for tests).

Written from Vim's published model code (bidirectional "v2" mixer: the backward branch runs
on the flipped sequence with its own conv, projections, A and D, and the two gated outputs
are averaged before ``out_proj``; the middle class token; RMSNorm with the residual added
before each norm) and the MambaLRP rules, reading the package's ``VisionMamba`` parameters
only: a Python loop over time for the scan with delta, A, B, C detached; the SiLUs as
``x * sigmoid(x).detach()``; the gate halved in the gradient; the RMSNorms' ``rsqrt`` detached.
With ``lrp=False`` nothing is detached: the plain forward and its gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _silu(x, lrp):
    return x * torch.sigmoid(x).detach() if lrp else F.silu(x)


def _const(t, lrp):
    return t.detach() if lrp else t


def _rmsnorm(norm, x, lrp):
    return norm.weight * (x * _const(torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps), lrp))


def _branch(xz, conv, x_proj, dt_proj, A_log, D, d_state, lrp):
    b, l, _ = xz.shape
    x, z = xz.chunk(2, dim=-1)
    x = _silu(conv(x.transpose(1, 2))[..., :l].transpose(1, 2), lrp)  # [b, l, d]
    dt, B, C = x_proj(x).split([dt_proj.in_features, d_state, d_state], dim=-1)
    delta = F.softplus(dt_proj(dt))  # [b, l, d]
    A = -torch.exp(A_log)  # [d, n]
    dA = _const(torch.exp(delta[..., None] * A), lrp)  # [b, l, d, n]
    dB = _const(delta[..., None] * B[:, :, None, :], lrp)
    C = _const(C, lrp)
    h = torch.zeros(b, x.shape[-1], d_state)
    ys = []
    for t in range(l):
        h = dA[:, t] * h + dB[:, t] * x[:, t, :, None]
        ys.append((h * C[:, t, None, :]).sum(-1))
    y = (torch.stack(ys, dim=1) + x * D) * _silu(z, lrp)
    return y / 2 + (y / 2).detach() if lrp else y


def _mixer(m, hidden, lrp):
    xz = m.in_proj(hidden)
    forward = _branch(xz, m.conv1d, m.x_proj, m.dt_proj, m.A_log, m.D, m.d_state, lrp)
    backward = _branch(xz.flip(1), m.conv1d_b, m.x_proj_b, m.dt_proj_b, m.A_b_log, m.D_b, m.d_state, lrp).flip(1)
    return m.out_proj((forward + backward) / 2)


def reference(model, images, cls: int, lrp: bool = True):
    """``(pixel relevance [B, C, H, W], logits [B, classes])`` for class ``cls``."""
    x = images.detach().clone().requires_grad_(True)
    tokens = model.patch_embed.proj(x).flatten(2).transpose(1, 2)
    pos = tokens.shape[1] // 2
    cls_token = model.cls_token.expand(x.shape[0], -1, -1)
    seq = torch.cat([tokens[:, :pos], cls_token, tokens[:, pos:]], dim=1) + model.pos_embed
    residual, hidden = None, seq
    for layer in model.layers:
        residual = hidden if residual is None else residual + hidden
        hidden = _mixer(layer.mixer, _rmsnorm(layer.norm, residual, lrp), lrp)
    logits = model.head(_rmsnorm(model.norm_f, residual + hidden, lrp)[:, pos])
    (grad,) = torch.autograd.grad(logits[:, cls].sum(), x)
    return (x * grad).detach(), logits.detach()
