"""The default composite's attention (AttnLRP) against LXT, the authors' implementation.

LXT 2.1 (``pip install --no-deps lxt==2.1``, done by ``scripts/setup.sh test``) is applied to the
same tiny Llama and Qwen3 models as its efficient rules prescribe (``lxt/efficient/models/llama.py``
and ``qwen3.py``): ``rms_norm_forward`` on every RMSNorm, ``gated_mlp_forward`` on every MLP and
``patch_attention`` on the modeling module (q and k gradients / 4, v / 2 around transformers'
eager attention). Relevance is then Gradient x Input at the embeddings, as LXT computes it.

Shims, in this test only: LXT's package ``__init__`` imports every model it supports (torchvision
among them), so its ``rules.py`` and ``patches.py`` are loaded from their files under a stub
package; LXT patches classes, so the norms and MLPs are patched per instance instead (the same
functions); LXT 2.1 replaces ``ALL_ATTENTION_FUNCTIONS`` by a plain dict, which transformers 5
calls ``get_interface`` on, so the dict is wrapped; everything is restored afterwards.

Where the methods coincide, the rules agree: LXT's linear layers keep their gradient (our LRP-epsilon
with epsilon 1e-9 on bias-free layers), its identity rule divides by ``x + 1e-10`` (ours is exact for
SiLU), both detach the RMSNorm factor and halve the gated product.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import types
from contextlib import contextmanager

import pytest
import torch
from test_transformers_models import left_padded, make_transformer

from captum_mambalrp import MambaLRP


def load_lxt():
    """LXT's ``efficient/rules.py`` and ``efficient/patches.py``, loaded from the installed package's files."""
    spec = importlib.util.find_spec("lxt")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("LXT is not installed: pip install --no-deps lxt==2.1 (scripts/setup.sh test does it)")
    root = os.path.join(list(spec.submodule_search_locations)[0], "efficient")
    saved = {k: sys.modules.get(k) for k in ("lxt", "lxt.efficient", "lxt.efficient.rules", "lxt.efficient.patches")}
    try:
        for name in ("lxt", "lxt.efficient"):
            stub = types.ModuleType(name)
            stub.__path__ = []  # a package, without running LXT's __init__
            sys.modules[name] = stub
        loaded = {}
        for part in ("rules", "patches"):
            name = f"lxt.efficient.{part}"
            file_spec = importlib.util.spec_from_file_location(name, os.path.join(root, f"{part}.py"))
            module = importlib.util.module_from_spec(file_spec)
            sys.modules[name] = module
            file_spec.loader.exec_module(module)
            loaded[part] = module
        return loaded["patches"]
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v


class _Interface(dict):
    """LXT 2.1's plain dict of attention functions, with the look-up transformers 5 calls."""

    def get_interface(self, implementation, default):
        return self.get(implementation, default)


@contextmanager
def lxt_applied(model, modeling, patches):
    """LXT's AttnLRP patches on ``model`` (per instance) and ``modeling`` (its attention functions)."""
    saved = (modeling.eager_attention_forward, modeling.ALL_ATTENTION_FUNCTIONS)
    try:
        assert patches.patch_attention(modeling)
        modeling.ALL_ATTENTION_FUNCTIONS = _Interface(modeling.ALL_ATTENTION_FUNCTIONS)
        for m in model.modules():
            name = type(m).__name__
            if name.endswith("RMSNorm"):
                m.forward = types.MethodType(patches.rms_norm_forward, m)
            elif name.endswith("MLP"):
                m.forward = types.MethodType(patches.gated_mlp_forward, m)
        yield
    finally:
        modeling.eager_attention_forward, modeling.ALL_ATTENTION_FUNCTIONS = saved
        for m in model.modules():
            m.__dict__.pop("forward", None)


def lxt_relevance(model, modeling, ids, mask, target):
    patches = load_lxt()
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    with lxt_applied(model, modeling, patches):
        logits = model(inputs_embeds=embeds, attention_mask=mask).logits
        score = logits[:, -1, target]
        (grad,) = torch.autograd.grad(score.sum(), embeds)
    return (embeds * grad).sum(-1).detach(), score.detach()


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_default_composite_equals_lxt_attnlrp(arch):
    if arch == "llama":
        from transformers.models.llama import modeling_llama as modeling
    else:
        from transformers.models.qwen3 import modeling_qwen3 as modeling
    model = make_transformer(arch, seed=11, attn="eager")
    ids, mask = left_padded(3, 10, seed=12)
    ours, delta = MambaLRP(model).attribute(ids, target=7, attention_mask=mask, return_convergence_delta=True)
    ref, score = lxt_relevance(model, modeling, ids, mask, target=7)
    ref = ref * mask  # padded positions: zero in both
    assert torch.allclose(ours.sum(1) + delta, score, atol=1e-6)
    scale = ref.abs().amax(dim=1, keepdim=True)
    assert ((ours - ref).abs() <= 1e-4 * scale).all(), ((ours - ref).abs().max(), scale)
    # AttnLRP is not CP-LRP: the reference itself tells them apart
    cp = MambaLRP(model, composite="conservative").attribute(ids, target=7, attention_mask=mask)
    assert ((cp - ref).abs() > 1e-3 * scale).any()
    # LXT's patches are gone: the model computes what it computed before
    assert all("forward" not in m.__dict__ for m in model.modules())
    assert modeling.ALL_ATTENTION_FUNCTIONS.__class__.__name__ == "AttentionInterface"
