"""Precision: float64 models give float64 relevance conserved to float64 rounding; bf16 models
explain their own score at least as faithfully (against a float64 truth) as transformers' own
bf16 forward computes it."""

from __future__ import annotations

import pytest
import torch
from conftest import LastTokenClassifier, make_lm, zero_biases
from test_mamba2 import ids_for, make_mamba2

from captum_mambalrp import MambaLRP


# transformers' default ``residual_in_fp32=True`` rounds the residual stream to float32 even in a
# float64 model (the model's own computation, explained as it is): float64 models here turn it off.
def _check_float64(model, ids, target, plain_forward=True):
    """float64 relevance, ``|sum R - logit| <= 1e-10 max(|logit|, 1)`` with the logit of the
    attributed float64 pass, which is the model's own logit up to transformers' float32 norms."""
    model = model.double()
    relevance, delta = MambaLRP(model).attribute(ids, target=target, return_convergence_delta=True)
    assert relevance.dtype == torch.float64 and delta.dtype == torch.float64
    total = relevance.sum(dim=tuple(range(1, relevance.dim())))
    logit = total - delta  # the explained score of the pass
    scale = max(logit.abs().max().item(), 1.0)
    assert delta.abs().max() <= 1e-10 * scale
    if plain_forward:  # the pass explains the model's own logit (transformers' RMSNorms round to float32 inside)
        with torch.no_grad():
            own = model(ids)[:, -1, target]
        assert own.dtype == torch.float64
        assert (logit - own).abs().max() <= 1e-5 * scale
    # not float32 values stored as float64: rounding to float32 moves them
    assert (relevance - relevance.float().double()).abs().max() > 0


@pytest.mark.parametrize("arch", ["mamba", "falcon"])
def test_float64_mamba1_conserves_to_1e10(arch):
    # a classifier head: transformers' LM heads return float32 logits, which would round the score
    model = LastTokenClassifier(zero_biases(make_lm(arch, num_hidden_layers=3, residual_in_fp32=False)).backbone)
    _check_float64(model, ids_for(2, 21), target=1)


def test_float64_mamba2_conserves_to_1e10():
    model = LastTokenClassifier(make_mamba2(num_hidden_layers=3, residual_in_fp32=False).backbone)
    _check_float64(model, ids_for(2, 21), target=2)


def test_float64_mamba_ssm_conserves_to_1e10():
    from test_mamba_ssm import make_ssm_lm

    for layer in ("Mamba1", "Mamba2"):
        model = make_ssm_lm(layer, residual_in_fp32=False)
        # mamba-ssm's own forward needs its Triton norm (CUDA): conservation against the pass's logit only
        _check_float64(model, ids_for(2, 13), target=3, plain_forward=False)
