"""Model-level checks of the GPU fast paths (``-m gpu``; skipped without CUDA).

For each architecture, every scan backend that can run on CUDA gives the relevance of
the CPU reference path (the torch backend on the CPU) to float32 rounding, and conserves
the explained logit with biases zero. Batches hold padding, so the masked path is covered.
"""

from __future__ import annotations

import pytest
import torch
from conftest import make_lm, relative_delta, zero_biases

from captum_mambalrp import MambaLRP, scan

CUDA = torch.cuda.is_available()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="needs CUDA")]


def _mamba2():
    from test_mamba2 import make_mamba2

    return make_mamba2(hidden_size=32, num_heads=4, head_dim=16, state_size=16, n_groups=2, chunk_size=16)


def _mamba_ssm(layer: str):
    from test_mamba_ssm import make_ssm_lm

    extra = dict(headdim=16, chunk_size=16) if layer == "Mamba2" else {}
    return make_ssm_lm(layer, d_model=32, d_state=16, **extra)


MODELS = {
    "hf_mamba": lambda: zero_biases(make_lm("mamba", hidden_size=32, state_size=16)),
    "hf_falcon_mamba": lambda: zero_biases(make_lm("falcon", hidden_size=32, state_size=16)),
    "hf_mamba2": _mamba2,
    "mamba_ssm_mamba1": lambda: _mamba_ssm("Mamba1"),
    "mamba_ssm_mamba2": lambda: _mamba_ssm("Mamba2"),
}


def _inputs(batch: int = 3, length: int = 70):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 64, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[1, :9] = 0  # left padding
    mask[2, :30] = 0
    return ids, mask


@pytest.mark.parametrize("backend", ["torch", "triton", "mamba_ssm"])
@pytest.mark.parametrize("name", list(MODELS))
def test_gpu_backends_match_cpu_reference_and_conserve(name, backend):
    if (name.startswith("mamba_ssm") or backend == "mamba_ssm") and "mamba_ssm" not in scan.available_backends("cuda"):
        pytest.skip("mamba-ssm is not installed")
    if backend not in scan.available_backends("cuda"):
        pytest.skip(f"the {backend} backend cannot run here")
    model = MODELS[name]()
    ids, mask = _inputs()
    if name.startswith("mamba_ssm"):
        mask = None  # mamba-ssm's models take no attention mask
    ref, _ = MambaLRP(model, backend="torch").attribute(ids, target=5, attention_mask=mask, return_convergence_delta=True)
    model = model.cuda()
    with scan.record_backends() as used:
        rel, delta = MambaLRP(model, backend=backend).attribute(
            ids.cuda(), target=5, attention_mask=None if mask is None else mask.cuda(), return_convergence_delta=True
        )
    assert set(used) == {backend}
    err = (rel.cpu() - ref).abs().max() / ref.abs().max()
    assert err <= 1e-4, (backend, float(err))
    explained = rel.sum(dim=tuple(range(1, rel.dim()))) - delta
    assert (relative_delta(delta, explained) <= 1e-4).all(), (backend, delta)
