"""LayerMambaLRP: relevance at blocks, conserved across depth, equal to MambaLRP at the embedding."""

from __future__ import annotations

import torch
from captum.attr import LayerGradientXActivation
from conftest import make_lm, zero_biases

from captum_mambalrp import LayerMambaLRP, MambaLRP


def test_relevance_is_conserved_across_blocks():
    model = zero_biases(make_lm("mamba", seed=31, num_hidden_layers=4))
    ids = torch.randint(0, 64, (3, 19), generator=torch.Generator().manual_seed(0))
    layers = [model.backbone.embeddings, *model.backbone.layers]
    lrp = LayerMambaLRP(model, layers)
    assert isinstance(lrp, LayerGradientXActivation)
    relevances, deltas = lrp.attribute(ids, target=7, return_convergence_delta=True)
    logit = model(ids).logits[:, -1, 7].detach()
    for r, d in zip(relevances, deltas):
        assert r.shape == (3, 19, 16)
        assert torch.allclose(r.sum((1, 2)), logit, atol=1e-5, rtol=1e-5)
        assert (d.abs() <= 1e-5 * logit.abs().clamp_min(1e-3)).all()
    # at the embedding it is exactly MambaLRP's token relevance
    assert torch.allclose(relevances[0].sum(-1), MambaLRP(model).attribute(ids, target=7), atol=1e-6)


def test_layer_input_and_padding():
    model = make_lm("falcon", seed=32, num_hidden_layers=2)
    ids = torch.randint(1, 64, (2, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[0, :4] = 0
    block = model.backbone.layers[1]
    out_rel = LayerMambaLRP(model, block).attribute(ids, target=3, attention_mask=mask)
    in_rel = LayerMambaLRP(model, block).attribute(ids, target=3, attention_mask=mask, attribute_to_layer_input=True)
    assert (out_rel[0, :4] == 0).all() and (in_rel[0, :4] == 0).all()
    assert not torch.allclose(out_rel, in_rel)
    # block 1's input is block 0's output: the same relevance read at both sides of the seam
    before = LayerMambaLRP(model, model.backbone.layers[0]).attribute(ids, target=3, attention_mask=mask)
    torch.testing.assert_close(in_rel, before, atol=1e-6, rtol=1e-5)
