"""Models dispatched with accelerate (``cpu_offload``, ``dispatch_model``): the same relevance as the
plain model, and accelerate's hooks intact afterwards (issue 16, the CPU part)."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import make_lm, zero_biases
from test_mamba2 import make_mamba2

from captum_mambalrp import LayerMambaLRP, MambaLRP

accelerate = pytest.importorskip("accelerate", reason="pip install accelerate (the test extra installs it)")
from accelerate import cpu_offload, dispatch_model  # noqa: E402


def ids_for(batch, length, seed=0):
    return torch.randint(1, 64, (batch, length), generator=torch.Generator().manual_seed(seed))


def block_map(model, device):
    """A device_map with one entry per block (accelerate puts a hook on each)."""
    layers = model.backbone.layers
    entries = {"backbone.embeddings": device, "backbone.norm_f": device, "lm_head": device}
    entries.update({f"backbone.layers.{i}": device for i in range(len(layers))})
    return entries


def dispatch(model, how, tmp_path):
    if how == "cpu_offload":  # every module's weights offloaded (meta) and loaded per forward
        cpu_offload(model, execution_device=torch.device("cpu"))
    elif how == "dispatch_hooks":  # weights in place, hooks that align devices around each block
        dispatch_model(model, device_map=block_map(model, "cpu"), main_device="cpu", force_hooks=True)
    elif how == "disk_offload":  # some blocks offloaded to disk
        device_map = block_map(model, "cpu")
        device_map["backbone.layers.1"] = device_map["lm_head"] = "disk"
        dispatch_model(model, device_map=device_map, main_device="cpu", offload_dir=str(tmp_path / "offload"))
    return model


def hook_state(model):
    """What accelerate put on the model: hooks, forwards (wrapper and inner), tensor objects, hook flags."""
    state = {}
    for name, m in model.named_modules():
        hook = m.__dict__.get("_hf_hook")
        state[name] = (
            hook,
            m.__dict__.get("forward"),
            m.__dict__.get("_old_forward"),
            None if hook is None else (getattr(hook, "offload", None), getattr(hook, "execution_device", None)),
            {k: (id(v), v.device, v.requires_grad) for k, v in m._parameters.items() if v is not None},
            {k: (id(v), v.device) for k, v in m._buffers.items() if v is not None},
        )
    return state


ARCHS = {
    "mamba": lambda: zero_biases(make_lm("mamba", seed=11)),
    "falcon": lambda: zero_biases(make_lm("falcon", seed=12)),
    "mamba2": lambda: make_mamba2(seed=13),
}


@pytest.mark.parametrize("how", ["cpu_offload", "dispatch_hooks", "disk_offload"])
@pytest.mark.parametrize("arch", list(ARCHS))
def test_same_relevance_and_hooks_intact(arch, how, tmp_path):
    plain = ARCHS[arch]()
    ids = ids_for(2, 9, seed=1)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    reference, ref_delta = MambaLRP(plain).attribute(ids, target=5, attention_mask=mask, return_convergence_delta=True)
    with torch.no_grad():
        logits = plain(ids, attention_mask=mask).logits
    model = dispatch(copy.deepcopy(plain), how, tmp_path)
    hooked = [n for n, m in model.named_modules() if "_hf_hook" in m.__dict__]
    assert hooked, "accelerate attached no hook"
    before = hook_state(model)
    for recompute in (False, True):  # recompute wraps the (inner) forward a second time
        relevance, delta = MambaLRP(model, recompute=recompute).attribute(
            ids, target=5, attention_mask=mask, return_convergence_delta=True
        )
        assert torch.allclose(relevance, reference, atol=1e-4, rtol=1e-4)
        assert torch.allclose(delta, ref_delta, atol=1e-4)
        assert hook_state(model) == before
    if how != "dispatch_hooks":  # the offloaded weights are gone again (meta), as accelerate keeps them
        assert any(p.device.type == "meta" for p in model.parameters())
    with torch.no_grad():  # and the hooked model still computes the same thing
        assert torch.allclose(model(ids, attention_mask=mask).logits, logits, atol=1e-5)


def test_layer_relevance_and_an_error_mid_pass_under_offload():
    plain = zero_biases(make_lm("mamba", seed=14, num_hidden_layers=3))
    ids = ids_for(1, 7, seed=2)
    reference = LayerMambaLRP(plain, list(plain.backbone.layers)).attribute(ids, target=2)
    model = cpu_offload(copy.deepcopy(plain), execution_device=torch.device("cpu"))
    before = hook_state(model)
    relevances = LayerMambaLRP(model, list(model.backbone.layers)).attribute(ids, target=2)
    for r, ref in zip(relevances, reference):
        assert torch.allclose(r, ref, atol=1e-4, rtol=1e-4)
    assert hook_state(model) == before

    def explode(module, args, out):
        raise RuntimeError("boom in out_proj")

    handle = model.backbone.layers[2].mixer.out_proj.register_forward_hook(explode)
    with pytest.raises(RuntimeError, match="boom"):
        MambaLRP(model).attribute(ids, target=2)
    handle.remove()
    assert hook_state(model) == before
    assert torch.allclose(MambaLRP(model).attribute(ids, target=2), MambaLRP(plain).attribute(ids, target=2), atol=1e-4)
