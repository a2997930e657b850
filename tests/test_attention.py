"""The attention rules against the paper's equations written out step by step (AttnLRP, CP-LRP),
and ``lrp_attention`` against transformers' own attention (masks, GQA, every implementation)."""

from __future__ import annotations

import pytest
import torch
from test_transformers_models import left_padded, make_transformer

from captum_mambalrp import MambaLRP
from captum_mambalrp.adapters.attention import ATTN_IMPLEMENTATION, _as_additive, _repeat_heads, lrp_attention
from captum_mambalrp.rules import AttnLRPRule, ConstantAttentionRule, GradientRule
from captum_mambalrp.rules.attention import scale_gradient


def attention(q, k, v, mask, c):
    """``softmax(q k^T c + mask) v`` for one head: ``q [t, d]``, ``k, v [s, d]``."""
    return torch.softmax(q @ k.T * c + mask, dim=-1) @ v


def attnlrp_explicit(q, k, v, mask, c, r_out):
    """AttnLRP written out with its equations, for output relevance ``r_out [t, d]``.

    - ``O = A v``, a matrix product: epsilon-LRP over its terms ``A_tj v_jd``, then the uniform rule
      on each term (Prop. 3.3 with Eq. 7): ``R_A[t,j] = sum_d A v R_O / (2 O)`` and
      ``R_v[j,d] = sum_t A v R_O / (2 O)``.
    - ``A = softmax(S)`` (Prop. 3.1): ``R_S[t,j] = S_tj (R_A[t,j] - A_tj sum_j' R_A[t,j'])``.
    - ``S = c q k^T`` (+ a constant mask), a matrix product again: ``R_q[t,d] = sum_j q k c R_S / (2 (S - mask))``
      and ``R_k[j,d] = sum_t q k c R_S / (2 (S - mask))``.
    """
    logits = q @ k.T * c
    scores = logits + mask
    A = torch.softmax(scores, dim=-1)
    O = A @ v  # noqa: E741
    terms = A[:, :, None] * v[None, :, :]  # [t, j, d]
    share = terms * (r_out / (2 * O))[:, None, :]
    r_A, r_v = share.sum(-1), share.sum(0)
    r_S = scores * (r_A - A * r_A.sum(-1, keepdim=True))
    r_S = torch.where(mask < 0, torch.zeros_like(r_S), r_S)  # masked entries: A = 0, no relevance
    qk = q[:, None, :] * k[None, :, :] * c  # [t, j, d]
    share = qk * (r_S / (2 * logits))[:, :, None]
    return share.sum(1), share.sum(0), r_v


def modified_gradient_relevance(rule, q, k, v, mask, c, r_out):
    """Relevance at ``q, k, v`` as this package computes it: modified gradient x input, seeded
    with ``r_out / O``."""
    q, k, v = (t.clone().requires_grad_(True) for t in (q, k, v))
    rq, rk, rv = rule.attention(q, k, v)
    O = attention(rq, rk, rv, mask, c)  # noqa: E741
    grads = torch.autograd.grad(O, (q, k, v), grad_outputs=r_out / O.detach(), allow_unused=True)
    return tuple((t * (torch.zeros_like(t) if g is None else g)).detach() for t, g in zip((q, k, v), grads))


def inputs(t=5, s=5, d=3, seed=0, causal=True):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(n, d, generator=g, dtype=torch.float64) for n in (t, s, s))
    mask = torch.zeros(t, s, dtype=torch.float64)
    if causal:
        mask = mask.masked_fill(torch.ones(t, s, dtype=torch.bool).triu(1), torch.finfo(torch.float64).min)
    r_out = torch.randn(t, d, generator=g, dtype=torch.float64)
    return q, k, v, mask, 0.6, r_out


@pytest.mark.parametrize("causal", [False, True])
def test_attnlrp_rule_equals_the_paper_step_by_step(causal):
    q, k, v, mask, c, r_out = inputs(causal=causal, seed=int(causal))
    expected = attnlrp_explicit(q, k, v, mask, c, r_out)
    got = modified_gradient_relevance(AttnLRPRule(), q, k, v, mask, c, r_out)
    for e, g in zip(expected, got):
        assert torch.allclose(g, e, atol=1e-10, rtol=1e-8)
    # the values get half of the output's relevance; q and k the softmax's share, halved
    assert torch.allclose(got[2].sum(), r_out.sum() / 2)


def test_cp_lrp_rule_is_linear_in_v_and_conserves():
    q, k, v, mask, c, r_out = inputs(seed=3)
    rq, rk, rv = modified_gradient_relevance(ConstantAttentionRule(), q, k, v, mask, c, r_out)
    A = torch.softmax(q @ k.T * c + mask, dim=-1)
    O = A @ v  # noqa: E741
    expected_v = v * (A.T @ (r_out / O))  # R_v[j,d] = sum_t A_tj v_jd R_O[t,d] / O[t,d]
    assert torch.allclose(rv, expected_v, atol=1e-12)
    assert torch.allclose(rv.sum(), r_out.sum()) and rq.abs().max() == 0 and rk.abs().max() == 0


def test_gradient_rule_is_plain_gradient_x_input_and_doubles_relevance_of_products():
    q, k, v, mask, c, r_out = inputs(seed=4, causal=False)
    rq, rk, rv = modified_gradient_relevance(GradientRule(), q, k, v, mask, c, r_out)
    assert torch.allclose(rv.sum(), r_out.sum())  # v: the full relevance, as A.v is linear in v
    lrp = modified_gradient_relevance(AttnLRPRule(), q, k, v, mask, c, r_out)
    assert torch.allclose(rq, 4 * lrp[0]) and torch.allclose(rk, 4 * lrp[1])


def test_scale_gradient_keeps_values():
    x = torch.randn(4, requires_grad=True)
    y = scale_gradient(x, 0.25)
    assert torch.equal(y, x)
    (g,) = torch.autograd.grad(y.sum(), x)
    assert torch.equal(g, torch.full_like(x, 0.25))


def test_masks_in_every_form_give_the_same_additive_mask():
    keep = torch.ones(4, 4, dtype=torch.bool).tril()
    from_bool = _as_additive(keep[None, None], 4, 4, torch.float32, causal=True)
    additive = torch.zeros(1, 1, 4, 6).masked_fill(~torch.cat([keep, keep[:, :2]], 1)[None, None], torch.finfo(torch.float32).min)
    assert torch.equal(_as_additive(additive, 4, 4, torch.float32, causal=True), from_bool)
    assert (from_bool[0, 0][keep] == 0).all() and (from_bool[0, 0][~keep] == torch.finfo(torch.float32).min).all()
    assert _as_additive(None, 4, 4, torch.float32, causal=True) is None
    assert torch.equal(_repeat_heads(torch.arange(6.0).reshape(1, 2, 3, 1), 2)[0, :, 0, 0], torch.tensor([0.0, 0.0, 3.0, 3.0]))


def test_lrp_attention_equals_eager_attention_in_every_mask_form():
    model = make_transformer("llama", seed=2)
    attn = model.model.layers[0].self_attn
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(2, 4, 5, 8, generator=g), torch.randn(2, 2, 5, 8, generator=g), torch.randn(2, 2, 5, 8, generator=g)
    keep = torch.ones(5, 5, dtype=torch.bool).tril()[None, None].repeat(2, 1, 1, 1)
    keep[1, :, :, :2] = False  # left padding of example 1
    keep[1, :, :2, :2] = torch.eye(2, dtype=torch.bool)  # padded queries see themselves
    additive = torch.zeros(keep.shape).masked_fill(~keep, torch.finfo(torch.float32).min)
    from transformers.models.llama.modeling_llama import eager_attention_forward

    expected, _ = eager_attention_forward(attn, q, k, v, additive, scaling=attn.scaling)
    plain = torch.zeros(1, 1, 5, 5).masked_fill(~keep[:1], -1e30)
    causal, _ = eager_attention_forward(attn, q[:1], k[:1], v[:1], plain, scaling=attn.scaling)
    from captum_mambalrp.adapters.attention import _ACTIVE

    _ACTIVE[id(attn)] = GradientRule()
    try:
        for mask in (additive, keep):
            got, weights = lrp_attention(attn, q, k, v, mask, scaling=attn.scaling)
            assert weights is None and torch.allclose(got, expected, atol=1e-6)
        got, _ = lrp_attention(attn, q[:1], k[:1], v[:1], None, scaling=attn.scaling)  # plain causal: is_causal
        assert torch.allclose(got, causal, atol=1e-6)
    finally:
        del _ACTIVE[id(attn)]


def test_lrp_attention_equals_transformers_attention_values():
    """The forward values of our attention are those of transformers' eager and sdpa ones (GQA, padding)."""
    model = make_transformer("llama", seed=2, attn="eager")
    ids, mask = left_padded(2, 7, seed=3)
    expected = model(ids, attention_mask=mask).logits
    model.config._attn_implementation = "sdpa"
    sdpa = model(ids, attention_mask=mask).logits
    lrp = MambaLRP(model, composite="gradient")
    relevance, delta = lrp.attribute(ids, target=(-1, 4), attention_mask=mask, return_convergence_delta=True)
    explained = relevance.sum(1) + delta
    assert torch.allclose(explained, expected[:, -1, 4], atol=1e-5) and torch.allclose(explained, sdpa[:, -1, 4], atol=1e-5)


def test_any_attn_implementation_is_taken_over_and_restored():
    """flash-attention is not installed here; the model could not run its own forward with it,
    yet attribution runs (our attention) and the setting comes back exactly."""
    model = make_transformer("qwen3", seed=5, attn="sdpa")
    ids, mask = left_padded(2, 6, seed=1)
    reference = MambaLRP(model, composite="conservative").attribute(ids, target=3, attention_mask=mask)
    model.config._attn_implementation_internal = "flash_attention_2"
    got = MambaLRP(model, composite="conservative").attribute(ids, target=3, attention_mask=mask)
    assert model.config._attn_implementation_internal == "flash_attention_2"
    assert torch.allclose(got, reference, atol=1e-6)
    assert ATTN_IMPLEMENTATION != model.config._attn_implementation


def test_attention_called_outside_an_installation_is_refused():
    model = make_transformer("llama", seed=1)
    attn = model.model.layers[0].self_attn
    q = torch.zeros(1, 4, 3, 8)
    with pytest.raises(RuntimeError, match="LlamaAttention called MambaLRP's attention without being installed"):
        lrp_attention(attn, q, q[:, :2], q[:, :2], None)
