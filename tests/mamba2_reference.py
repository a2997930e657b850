"""An independent MambaLRP for transformers' Mamba2, step by step (for tests).

Written from the paper's rules and transformers' module definitions, sharing no code with the
package: a Python loop over time for the SSD recurrence ``h_t = exp(dt_t A) h_{t-1} + dt_t x_t
B_t``, ``y_t = C_t h_t + D x_t`` (groups repeated over their heads) with dt, A, B, C detached;
SiLU as ``x * (silu(x) / x).detach() = x * sigmoid(x).detach()``; the gate ``y * silu(z)``
halved in the gradient; the grouped norm's and the block norms' ``rsqrt`` detached; linear
layers unmodified. Padded positions are zeroed where transformers zeroes them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _silu_identity(x):
    # the identity rule x * (silu(x) / x).detach(), with silu(x) / x = sigmoid(x) written out (no
    # stabiliser, which would move relevance by eps / |x| on tiny pre-activations)
    return x * torch.sigmoid(x).detach()


def _rmsnorm(norm, x):
    d = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon).detach()
    return norm.weight * (x * d)


def _masked(x, mask):
    return x if mask is None else x * mask[:, :, None].to(x.dtype)


def _mixer(m, hidden, mask):
    b, l, _ = hidden.shape
    d, H, P, G, N = m.intermediate_size, m.num_heads, m.head_dim, m.n_groups, m.ssm_state_size
    z, xBC, dt = m.in_proj(_masked(hidden, mask)).split([d, m.conv_dim, H], dim=-1)
    xBC = _masked(_silu_identity(m.conv1d(xBC.transpose(1, 2))[..., :l]).transpose(1, 2), mask)
    x, B, C = xBC.split([d, G * N, G * N], dim=-1)
    lo, hi = m.time_step_limit
    dt = F.softplus(dt + m.dt_bias).clamp(lo, hi).detach()  # [b, l, H]
    A = -torch.exp(m.A_log).detach()
    x = x.reshape(b, l, H, P)
    B = B.reshape(b, l, G, N).repeat_interleave(H // G, dim=2).detach()
    C = C.reshape(b, l, G, N).repeat_interleave(H // G, dim=2).detach()
    h = torch.zeros(b, H, P, N)
    ys = []
    for t in range(l):
        decay = torch.exp(dt[:, t] * A)[:, :, None, None]
        h = decay * h + (dt[:, t, :, None] * x[:, t])[..., None] * B[:, t, :, None, :]
        ys.append((h * C[:, t, :, None, :]).sum(-1) + m.D[None, :, None] * x[:, t])
    y = torch.stack(ys, dim=1).reshape(b, l, d)
    gated = y * _silu_identity(z)
    gated = gated / 2.0 + (gated / 2.0).detach()
    groups = gated.reshape(b, l, G, d // G)
    groups = groups * torch.rsqrt(groups.pow(2).mean(-1, keepdim=True) + m.norm.variance_epsilon).detach()
    return m.out_proj(m.norm.weight * groups.reshape(b, l, d))


def reference_relevance(model, input_ids, position: int, cls: int, attention_mask=None):
    """Token relevance ``[B, L]`` of ``logits[:, position, cls]`` for a ``Mamba2ForCausalLM``."""
    backbone = model.backbone
    emb = backbone.embeddings(input_ids).detach().requires_grad_(True)
    h = emb
    for block in backbone.layers:
        h = h + _mixer(block.mixer, _rmsnorm(block.norm, h), attention_mask)
    logits = model.lm_head(_rmsnorm(backbone.norm_f, h))
    score = logits[:, position, cls]
    (grad,) = torch.autograd.grad(score.sum(), emb)
    return (emb * grad).sum(-1).detach(), score.detach()
