"""The default composite on hybrids (Mamba1 and Mamba2 mixers with attention, gated, squared-ReLU and
MoE MLPs) against an independent reference: LXT's AttnLRP on the transformer parts, step-by-step
Mamba1 (Jamba) and Mamba2 references on the mixers, explicit LRP on the mixtures of experts.

Families, each a tiny random model of ``tests/test_hybrids.py:build`` with a mixer after its first
attention layer (relevance crosses a mixer after attention and before it):

- Jamba: Mamba1 mixer (RMSNorms on dt, B, C), attention, Mamba1 mixer; a MoE (two of four gated
  experts per token) after each mixer, a gated MLP after attention;
- Bamba: Mamba2 mixer, attention, Mamba2 mixer, each followed by a gated MLP;
- NemotronH: Mamba2 mixer, attention, Mamba2 mixer, squared-ReLU MLP, MoE (squared-ReLU experts
  and a shared expert);
- GraniteMoeHybrid: Mamba2 mixer, attention, Mamba2 mixer, each followed by a MoE (gated experts)
  plus a shared gated MLP; embedding and residual multipliers, logits scaling;
- Zamba2: Mamba2 layers and hybrid layers (shared attention block on the concatenation with the
  embeddings, its LoRA adapters on q/k/v and on the GELU MLP, RoPE, a linear layer, a Mamba2 mixer);
- FalconH1: Mamba2 mixer (grouped norm after the gate) and attention in parallel in every layer,
  gated MLPs, every muP multiplier different from 1 (``mup_vector``, ssm in/out, attention in/out,
  key, MLP gate/down, embedding, lm_head).

The reference uses no code of the package. On the model's own forward, patched per instance and
undone in ``finally``:

- attention and block norms as ``tests/test_lxt_reference.py`` applies LXT 2.1's efficient rules to
  Llama (every attention class here calls its modeling module's attention functions with q, k, v
  already projected, rotated or scaled: linear maps): ``patch_attention`` on the family's modeling
  module (q and k gradients / 4, v / 2) and ``rms_norm_forward`` on every block ``*RMSNorm``;
- the MLPs: LXT's ``gated_mlp_forward`` written out for each family's layout (Granite's and Zamba2's
  fused ``input_linear`` / ``gate_up_proj``, Zamba2's LoRA adapter added to it, Falcon-H1's gate and
  down multipliers): identity rule on the activation, ``divide_gradient(., 2)`` on the product;
  NemotronH's ``down(relu2(up(x)))`` as LXT's ``mlp_forward`` (identity rule on the whole
  activation), written exactly as ``u * relu(u).detach()`` (``relu(u)^2 = u relu(u)``);
- each Mamba2 mixer's forward by ``tests/mamba2_reference.py:_mixer``. ``BambaMixer``,
  ``NemotronHMamba2Mixer``, ``GraniteMoeHybridMambaLayer`` and ``Zamba2MambaMixer`` were read in
  transformers' modeling files: the same attributes under the same names (``intermediate_size``,
  ``num_heads``, ``head_dim``, ``n_groups``, ``ssm_state_size``, ``conv_dim``, ``in_proj``,
  ``conv1d``, ``dt_bias``, ``A_log``, ``D``, ``time_step_limit``, ``norm.weight`` /
  ``variance_epsilon``, ``out_proj``), the same computation as ``Mamba2Mixer`` (mask, ``in_proj``
  split ``[z, xBC, dt]``, SiLU after the causal conv, mask, SSD with ``D`` skip, gated norm
  ``y * silu(z)`` then the norm over ``n_groups`` groups of ``intermediate_size / n_groups``); the
  conv's activation is checked to be SiLU. ``FalconH1Mixer`` adds ``in_proj(x * ssm_in_multiplier)
  * mup_vector`` and an optional norm: ``tests/test_hybrids.py:falcon_h1_reference_mixer`` (test
  code, written from its modeling file). ``JambaMambaMixer`` (Mamba1) by ``jamba_reference_mixer``
  below, written from ``modeling_jamba.py`` (not ``tests/reference_mambalrp.py``, which has the
  authors' 1e-6-stabilised SiLU and no padding mask): mask on the input and on the conv's activated
  output as transformers applies it, exact SiLU identity rule, the recurrence as a loop with delta,
  A, B, C detached (so the dt/B/C RMSNorms, whose factor the package holds constant, carry no
  gradient in either), the gate ``y * silu(z)`` halved. Each receives the 2-D padding mask the model
  hands it;
- each MoE block (``JambaSparseMoeBlock``, ``NemotronHMoE``, ``GraniteMoeHybridMoE``) by ``tests/test_moe_reference.py:
  moe_reference``, explicit message-passing LRP in float64 (routing held fixed, each selected
  expert's summand ``w_k E_k(x)`` its share, identity and half rules inside, LRP-epsilon per expert
  matrix; NemotronH's shared expert included), composed into Gradient x Input by an autograd
  function: forward the block's own, backward ``R_x / x`` with ``R_x`` that reference for the
  output relevance ``y * grad_y`` (so ``x * grad_x = R_x``).

Relevance is Gradient x Input at the embeddings of the explained logit(s) (at the embedding
output; Falcon-H1 scales it by ``embedding_multiplier`` only for ``input_ids``, so the reference
passes ``embed(ids) * embedding_multiplier``: the same relevance, a linear scaling).

Where the package documents a choice that differs from LXT's, the reference follows the package
(``docs/rules.md``; on Bamba the two together move relevance by at most 2e-6 of a row's largest
token relevance, below the tolerance: plain LXT there agrees with the package to 2e-6, this
reference to 9e-7):

- SiLU and squared ReLU: the identity rule exactly, ``x * sigmoid(x).detach()`` and
  ``x * relu(x).detach()`` (LXT divides ``f(x)`` by ``x + 1e-10``); other activations (Zamba2's
  GELU) the stabilised form ``x_s * (f(x) / x_s).detach()``, ``x_s = x + 1e-6 sign(x)``, that
  ``docs/rules.md`` and ``IdentityActivationRule``'s docstring document;
- linear layers and the causal conv: LRP-epsilon with epsilon 1e-9 (``EpsilonRule()``, float32),
  the gradient reaching ``z`` scaled by ``|z| / (|z| + 1e-9)``, written here as forward hooks
  (LXT keeps the plain gradient); the experts' matrices inside ``moe_reference`` use LRP-epsilon in
  float64 without an epsilon, as that reference writes it.

Measured (float32, the largest over rows of the difference relative to the row's largest token
relevance, with and without left padding): Jamba 2.0e-6, Bamba 9.2e-7, NemotronH 6.0e-7, GraniteMoeHybrid 3.8e-7,
Zamba2 1.4e-6 (3.1e-6 with LXT's 1e-10 in the GELU rule instead), FalconH1 2.9e-7; required: 1e-5.

The test can fail: for every family the conservative composite (CP-LRP on attention) differs from
this reference by 6e-2 to 0.99 of a row's largest token relevance (required: more than 1000 x the
tolerance on every row), and ``composite="mambalrp_reference"`` (the SiLU rule with the authors'
1e-6 stabiliser, nothing else changed) by 1e-5 to 6e-3 (required: more than twice the tolerance on
some row); on the MoE families ``composite="no_router_rule"`` (routing weights by gradient) by up to
1.5e-4 (NemotronH), 2.1e-4 (Granite) and 5.3e-3 (Jamba) (required: more than twice the tolerance
on some row). On Jamba the conservative composite is 0.42 to 0.93 away, ``mambalrp_reference``
5.9e-6 to 4.1e-4 (largest per case: 4.1e-4 unpadded, 2.9e-5 padded), and the reference without
the mixers' padding mask 0.72 on a padded row.
"""

from __future__ import annotations

import copy
import types
from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F
from mamba2_reference import _mixer as mamba2_reference_mixer
from test_api import assert_unchanged, snapshot
from test_hybrids import build, explained_scores, falcon_h1_reference_mixer, ids_for, left_padded
from test_lxt_reference import load_lxt, lxt_applied
from test_moe_reference import moe_reference, routing
from torch import nn

from captum_mambalrp import MambaLRP

EPSILON = 1e-9  # the package's documented LRP-epsilon for float32 linear layers and convs
ACTIVATION_EPSILON = 1e-6  # the package's stabiliser in the identity rule of activations other than SiLU and relu2
TOLERANCE = 1e-5  # of the row's largest token relevance (measured: 1.4e-6 at most, float32)


# ---------------------------------------------------------------- rules written out


def _epsilon_hook(module, inputs, z):
    ratio = (z.abs() / (z.abs() + EPSILON)).detach()
    return z * ratio + (z - z * ratio).detach()  # value z, gradient scaled by ratio


def _silu_identity(x):
    return x * torch.sigmoid(x).detach()


def _identity(act_fn, x):
    """The identity rule on an element-wise activation: exact for SiLU and squared ReLU."""
    name = type(act_fn).__name__
    if name in ("SiLU", "SiLUActivation"):
        return x * torch.sigmoid(x).detach()
    if name == "ReLUSquaredActivation":
        return x * torch.relu(x).detach()
    assert name in ("GELUActivation",), name
    x_s = x + ACTIVATION_EPSILON * torch.where(x >= 0, 1.0, -1.0)
    return x_s * (act_fn(x) / x_s).detach()


def _mlp_forwards(divide_gradient):
    """Each family's MLP with LXT's rules (identity on the activation, the product halved)."""

    def gated(act_fn, gate, up):
        return divide_gradient(_identity(act_fn, gate) * up, 2)

    def bamba(self, x):
        return self.down_proj(gated(self.act_fn, self.gate_proj(x), self.up_proj(x)))

    def nemotron_h(self, x):  # LXT's mlp_forward: down(act(up(x)))
        return self.down_proj(_identity(self.act_fn, self.up_proj(x)))

    def granite(self, x):
        gate, up = self.input_linear(x).chunk(2, dim=-1)
        return self.output_linear(gated(self.activation, gate, up))

    def zamba2(self, x, layer_idx=None):
        gate_up = self.gate_up_proj(x) + self.gate_up_proj_adapter_list[self.layer_dic[layer_idx]](x)
        gate, up = gate_up.chunk(2, dim=-1)
        return self.down_proj(gated(self.act_fn, gate, up))

    def falcon_h1(self, x):
        y = gated(self.act_fn, self.gate_proj(x) * self.gate_multiplier, self.up_proj(x))
        return self.down_proj(y) * self.down_multiplier

    return {
        "JambaMLP": bamba,  # the same layout: down(act(gate(x)) * up(x))
        "BambaMLP": bamba,
        "NemotronHMLP": nemotron_h,
        "GraniteMoeHybridMLP": granite,
        "Zamba2MLP": zamba2,
        "FalconH1MLP": falcon_h1,
    }


def _masked(x, mask):
    return x if mask is None else x * mask[:, :, None].to(x.dtype)


def _rms_value(norm, x):
    """transformers' ``JambaRMSNorm`` value, written out (it feeds only the scan's parameters, detached)."""
    return norm.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon))


def jamba_reference_mixer(m, hidden, mask):
    """``JambaMambaMixer`` with MambaLRP's rules, step by step (written from transformers'
    ``modeling_jamba.py`` and the paper's rules, sharing no code with the package or with
    ``tests/reference_mambalrp.py``): the padding mask zeroes the input and the conv's activated
    output; ``in_proj`` split ``[x, z]``; causal depthwise conv, SiLU by the exact identity rule
    ``x * sigmoid(x).detach()``; ``x_proj`` split ``[dt, B, C]``, each through its RMSNorm;
    ``delta = softplus(dt_proj.weight @ dt + dt_proj.bias)``; the Mamba1 recurrence
    ``h_t = exp(delta_t A) h_{t-1} + delta_t x_t B_t``, ``y_t = C_t h_t + D x_t`` as a Python loop
    with ``delta``, ``A``, ``B``, ``C`` detached (so the dt/B/C norms carry no gradient whatever
    rule they get); the gate ``y * silu(z)`` (SiLU whatever ``hidden_act``) by the identity rule and
    halved in the gradient; ``out_proj``."""
    b, l, _ = hidden.shape
    d, N, R = m.intermediate_size, m.ssm_state_size, m.time_step_rank
    x, z = m.in_proj(_masked(hidden, mask)).split([d, d], dim=-1)  # transformers chunks [x, z] on channels
    x = _silu_identity(m.conv1d(x.transpose(1, 2))[..., :l]).transpose(1, 2)
    x = _masked(x, mask)  # [b, l, d]
    dt, B, C = m.x_proj(x).split([R, N, N], dim=-1)
    dt, B, C = _rms_value(m.dt_layernorm, dt), _rms_value(m.b_layernorm, B), _rms_value(m.c_layernorm, C)
    delta = F.softplus(dt @ m.dt_proj.weight.T + m.dt_proj.bias).detach()  # [b, l, d]
    A = -torch.exp(m.A_log.float()).detach()  # [d, N]
    B, C = B.detach(), C.detach()
    h = torch.zeros(b, d, N)
    ys = []
    for t in range(l):
        h = torch.exp(delta[:, t, :, None] * A) * h + (delta[:, t] * x[:, t])[:, :, None] * B[:, t, None, :]
        ys.append((h * C[:, t, None, :]).sum(-1) + m.D * x[:, t])
    y = torch.stack(ys, dim=1)
    gated = y * _silu_identity(z)
    gated = gated / 2.0 + (gated / 2.0).detach()
    return m.out_proj(gated)


def _jamba_mixer_forward(self, hidden_states, cache=None, attention_mask=None, **kwargs):
    assert cache is None, "the reference runs without a cache"
    assert self.activation == "silu" and self.dt_proj.bias is not None
    return jamba_reference_mixer(self, hidden_states, attention_mask)


def _mamba2_mixer_forward(self, hidden_states, cache=None, attention_mask=None, **kwargs):
    assert cache is None, "the reference runs without a cache"
    assert self.activation == "silu" and self.norm.group_size == self.intermediate_size // self.n_groups
    return mamba2_reference_mixer(self, hidden_states, attention_mask)


def _falcon_h1_mixer_forward(self, hidden_states, cache=None, attention_mask=None, **kwargs):
    assert cache is None, "the reference runs without a cache"
    assert self.activation == "silu"
    return falcon_h1_reference_mixer(self, hidden_states, attention_mask)


MIXER_FORWARDS = {
    "JambaMambaMixer": _jamba_mixer_forward,
    "BambaMixer": _mamba2_mixer_forward,
    "NemotronHMamba2Mixer": _mamba2_mixer_forward,
    "GraniteMoeHybridMambaLayer": _mamba2_mixer_forward,
    "Zamba2MambaMixer": _mamba2_mixer_forward,
    "FalconH1Mixer": _falcon_h1_mixer_forward,
}


class _ExplicitMoE(torch.autograd.Function):
    """A MoE block whose backward is ``tests/test_moe_reference.py:moe_reference``: the gradient
    ``R_x / x``, so that Gradient x Input at its input is the explicit LRP's relevance for the
    output relevance ``y * grad_y``."""

    @staticmethod
    def forward(ctx, x, block, block64):
        flat = x.reshape(-1, x.shape[-1])
        ctx.routing = routing(block, flat)
        ctx.block64 = block64
        ctx.save_for_backward(flat)
        return type(block).forward(block, x)  # transformers' value

    @staticmethod
    def backward(ctx, grad):
        (flat,) = ctx.saved_tensors
        w, idx = ctx.routing
        x64 = flat.double()
        _, relevance = moe_reference(ctx.block64, x64, grad.reshape(flat.shape).double(), w.double(), idx)
        grad_x = torch.where(x64 == 0, 0.0, relevance / x64)
        return grad_x.to(flat.dtype).reshape(grad.shape), None, None


def _moe_forward(block64):
    def forward(self, hidden_states):
        return _ExplicitMoE.apply(hidden_states, self, block64)

    return forward


MOE_CLASSES = ("JambaSparseMoeBlock", "NemotronHMoE", "GraniteMoeHybridMoE")


@contextmanager
def reference_applied(model, modeling):
    patches = load_lxt()
    mlp_forwards = _mlp_forwards(patches.divide_gradient)
    handles = []
    with lxt_applied(model, modeling, patches):
        try:
            for m in model.modules():
                name = type(m).__name__
                if name in MIXER_FORWARDS:
                    m.forward = types.MethodType(MIXER_FORWARDS[name], m)
                elif name in MOE_CLASSES:
                    assert not m.training
                    m.forward = types.MethodType(_moe_forward(copy.deepcopy(m).double()), m)
                elif name.endswith("MLP"):
                    assert m.__dict__["forward"].__func__ is patches.gated_mlp_forward  # LXT's, replaced as documented
                    m.forward = types.MethodType(mlp_forwards[name], m)
                elif isinstance(m, (nn.Linear, nn.Conv1d)):
                    handles.append(m.register_forward_hook(_epsilon_hook))
            yield
        finally:
            for h in handles:
                h.remove()
            for m in model.modules():
                m.__dict__.pop("forward", None)


def _embeddings(model, ids):
    embeds = model.get_input_embeddings()(ids)
    if type(model).__name__ == "FalconH1ForCausalLM":  # applied for input_ids only
        embeds = embeds * model.model.embedding_multiplier
    return embeds.detach().requires_grad_(True)


def reference_relevance(model, modeling, ids, mask, targets):
    embeds = _embeddings(model, ids)
    with reference_applied(model, modeling):
        logits = model(inputs_embeds=embeds, attention_mask=mask, use_cache=False).logits
        score = explained_scores(logits, mask, targets)
        (grad,) = torch.autograd.grad(score.sum(), embeds)
    return (embeds * grad).sum(-1).detach(), logits.detach(), score.detach()


# ---------------------------------------------------------------- the models


def _modeling(family):
    from transformers.models.bamba import modeling_bamba
    from transformers.models.falcon_h1 import modeling_falcon_h1
    from transformers.models.granitemoehybrid import modeling_granitemoehybrid
    from transformers.models.jamba import modeling_jamba
    from transformers.models.nemotron_h import modeling_nemotron_h
    from transformers.models.zamba2 import modeling_zamba2

    return {
        "jamba": modeling_jamba,
        "bamba": modeling_bamba,
        "nemotron_h": modeling_nemotron_h,
        "granite": modeling_granitemoehybrid,
        "zamba2": modeling_zamba2,
        "falcon_h1": modeling_falcon_h1,
    }[family]


# family -> (build overrides, the mixers, attention layers, MLPs and MoEs in the order the forward calls them)
MODELS = {
    "jamba": (
        # mamba, attention, mamba; MoE (two of four gated experts per token) after the mixers, a gated MLP after attention
        dict(seed=38, num_hidden_layers=3, expert_layer_offset=0, num_experts=4, num_experts_per_tok=2),
        [
            *("JambaMambaMixer", "JambaSparseMoeBlock"),
            *("JambaAttention", "JambaMLP"),
            *("JambaMambaMixer", "JambaSparseMoeBlock"),
        ],
    ),
    "bamba": (
        dict(seed=31, num_hidden_layers=3, attn_layer_indices=[1]),
        ["BambaMixer", "BambaMLP", "BambaAttention", "BambaMLP", "BambaMixer", "BambaMLP"],
    ),
    "nemotron_h": (
        dict(seed=34),  # "M*M-E"; the MoE's shared expert is a NemotronHMLP
        ["NemotronHMamba2Mixer", "NemotronHAttention", "NemotronHMamba2Mixer", "NemotronHMLP", "NemotronHMoE", "NemotronHMLP"],
    ),
    "granite": (
        # two of four experts per token: routing weights below 1, so the router rule matters
        dict(
            seed=35, num_hidden_layers=3, layer_types=["mamba", "attention", "mamba"], num_local_experts=4, num_experts_per_tok=2
        ),
        [
            *("GraniteMoeHybridMambaLayer", "GraniteMoeHybridMoE", "GraniteMoeHybridMLP"),
            *("GraniteMoeHybridAttention", "GraniteMoeHybridMoE", "GraniteMoeHybridMLP"),
            *("GraniteMoeHybridMambaLayer", "GraniteMoeHybridMoE", "GraniteMoeHybridMLP"),
        ],
    ),
    "zamba2": (
        # mamba, hybrid, mamba, hybrid; transformers' q/k/v adapters assume as many key/value heads as heads
        dict(seed=36, use_shared_attention_adapter=True, use_mem_rope=True, num_key_value_heads=2),
        ["Zamba2MambaMixer", *("Zamba2Attention", "Zamba2MLP", "Zamba2MambaMixer")] * 2,
    ),
    "falcon_h1": (
        dict(seed=37, key_multiplier=0.8),  # the other multipliers as tests/test_hybrids.py sets them
        ["FalconH1Mixer", "FalconH1Attention", "FalconH1MLP"] * 2,
    ),
}
KINDS = ("Mixer", "MambaLayer", "Attention", "MLP", "MoE", "MoeBlock")


def _hybrid(family):
    overrides, kinds = MODELS[family]
    model = build(family, **overrides)
    called = []
    handles = [
        m.register_forward_pre_hook(lambda m, args: called.append(type(m).__name__))
        for m in model.modules()
        if type(m).__name__.endswith(KINDS)
    ]
    try:
        with torch.no_grad():
            model(ids_for(1, 4), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    assert called == kinds, called
    return model


CASES = {
    "no_padding": lambda: (ids_for(2, 9, seed=32), None, 5),
    "left_padding": lambda: (*left_padded(3, 10, [0, 2, 5], seed=33), [7, (2, 3), None]),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("family", list(MODELS))
def test_default_composite_on_hybrid_equals_lxt_and_mamba2_reference(family, case):
    model = _hybrid(family)
    modeling = _modeling(family)
    ids, mask, target = CASES[case]()
    rows = ids.shape[0]
    full_mask = torch.ones_like(ids) if mask is None else mask
    targets = target if isinstance(target, list) else [target] * rows
    before = snapshot(model)

    ref, ref_logits, score = reference_relevance(model, modeling, ids, full_mask, targets)
    with torch.no_grad():
        logits = model(ids, attention_mask=mask, use_cache=False).logits
    # the reference's patches keep the forward values (and are gone afterwards)
    assert torch.allclose(ref_logits, logits, atol=1e-5), (ref_logits - logits).abs().max()
    assert_unchanged(model, before)
    assert modeling.ALL_ATTENTION_FUNCTIONS.__class__.__name__ == "AttentionInterface"

    ours, delta = MambaLRP(model).attribute(ids, target=target, attention_mask=mask, return_convergence_delta=True)
    assert torch.allclose(ours.sum(1) + delta, score, atol=1e-5), (ours.sum(1) + delta, score)
    assert (ours[full_mask == 0] == 0).all() and (ref[full_mask == 0].abs() <= 1e-7).all(), ref[full_mask == 0]
    scale = ref.abs().amax(dim=1, keepdim=True)
    relative = ((ours - ref).abs() / scale).amax(dim=1)
    assert (relative <= TOLERANCE).all(), relative
    # AttnLRP is not CP-LRP: on every row the conservative composite is far from the reference
    cp = MambaLRP(model, composite="conservative").attribute(ids, target=target, attention_mask=mask)
    cp_relative = ((cp - ref).abs() / scale).amax(dim=1)
    assert (cp_relative > 1000 * TOLERANCE).all(), cp_relative
    # and the tolerance is tight enough to see a 1e-6 stabiliser in the SiLU rule
    stabilised = MambaLRP(model, composite="mambalrp_reference").attribute(ids, target=target, attention_mask=mask)
    assert ((stabilised - ref).abs() / scale).max() > 2 * TOLERANCE
    if any(kind in MOE_CLASSES for kind in MODELS[family][1]):  # and the MoE's reference matters
        by_gradient = MambaLRP(model, composite="no_router_rule").attribute(ids, target=target, attention_mask=mask)
        assert ((by_gradient - ref).abs() / scale).max() > 2 * TOLERANCE
    assert_unchanged(model, before)
