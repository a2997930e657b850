"""Conservation: summed relevance equals the explained logit when biases are zero."""

from __future__ import annotations

import pytest
import torch
from conftest import LastTokenClassifier, make_lm, relative_delta, zero_biases

from captum_mambalrp import MambaLRP

SHAPES = [
    # layers, hidden, state, conv, expand, length, batch
    (1, 8, 2, 2, 2, 1, 1),
    (2, 16, 4, 4, 2, 37, 3),
    (3, 24, 8, 3, 1, 130, 2),
    (2, 32, 16, 4, 2, 300, 1),
]


@pytest.mark.parametrize("arch", ["mamba", "falcon"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "L{}h{}n{}k{}e{}len{}b{}".format(*s))
def test_conservation_bias_free(arch, shape):
    layers, hidden, state, conv, expand, length, batch = shape
    model = zero_biases(
        make_lm(
            arch, seed=length, num_hidden_layers=layers, hidden_size=hidden, state_size=state, conv_kernel=conv, expand=expand
        )
    )
    ids = torch.randint(0, 64, (batch, length), generator=torch.Generator().manual_seed(length))
    relevance, delta = MambaLRP(model).attribute(ids, target=5, return_convergence_delta=True)
    logits = model(ids).logits[:, -1, 5].detach()
    assert relevance.shape == (batch, length)
    assert torch.allclose(relevance.sum(1) + delta, logits, atol=1e-5, rtol=1e-5)
    assert (relative_delta(delta, logits) <= 1e-5).all(), (delta, logits)


# target -> (position, class) per example for a batch of 2 unpadded sequences of length 12
TARGETS = [
    (None, None),
    (7, [(11, 7), (11, 7)]),
    ((0, 3), [(0, 3), (0, 3)]),
    ((-2, 1), [(10, 1), (10, 1)]),
    ([1, 2], [(11, 1), (11, 2)]),
    (torch.tensor([4, 5]), [(11, 4), (11, 5)]),
    ([(1, 2), (-1, 0)], [(1, 2), (11, 0)]),
]


@pytest.mark.parametrize("arch", ["mamba", "falcon"])
@pytest.mark.parametrize("target,expected", TARGETS, ids=[repr(t[0]) for t in TARGETS])
def test_conservation_every_target_form(arch, target, expected):
    model = zero_biases(make_lm(arch, seed=3))
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    logits = model(ids).logits.detach()
    if expected is None:  # the predicted class at the last token
        expected = [(11, int(logits[i, 11].argmax())) for i in range(2)]
    explained = torch.stack([logits[i, p, c] for i, (p, c) in enumerate(expected)])
    relevance, delta = MambaLRP(model).attribute(ids, target=target, return_convergence_delta=True)
    assert torch.allclose(relevance.sum(1) + delta, explained, atol=1e-6)
    assert (relative_delta(delta, explained) <= 1e-5).all()


def test_conservation_classifier_head_and_embeddings():
    backbone = zero_biases(make_lm("mamba", seed=4)).backbone
    model = LastTokenClassifier(backbone, n_classes=3).eval()
    ids = torch.randint(0, 64, (3, 20), generator=torch.Generator().manual_seed(2))
    embeds = backbone.embeddings(ids).detach()
    lrp = MambaLRP(model)
    rel_ids, delta_ids = lrp.attribute(ids, target=[0, 1, 2], return_convergence_delta=True)
    rel_emb, delta_emb = lrp.attribute(embeds, target=[0, 1, 2], return_convergence_delta=True)
    assert rel_emb.shape == embeds.shape
    logits = model(ids)[torch.arange(3), -1, torch.tensor([0, 1, 2])].detach()
    assert (relative_delta(delta_ids, logits) <= 1e-5).all()
    assert torch.allclose(rel_emb.sum(-1), rel_ids, atol=1e-6)
    assert torch.allclose(delta_emb, delta_ids, atol=1e-6)


@pytest.mark.parametrize("arch", ["mamba", "falcon"])
def test_gradient_x_input_does_not_conserve(arch):
    """The same check fails for plain Gradient x Input: conservation is a real property."""
    model = zero_biases(make_lm(arch, seed=5, num_hidden_layers=3))
    ids = torch.randint(0, 64, (4, 40), generator=torch.Generator().manual_seed(3))
    emb = model.backbone.embeddings(ids).detach().requires_grad_(True)
    logit = model(inputs_embeds=emb).logits[:, -1, 5]
    (grad,) = torch.autograd.grad(logit.sum(), emb)
    gxi = (emb * grad).sum((1, 2)).detach()
    rel = relative_delta(logit.detach() - gxi, logit.detach())
    assert (rel > 1e-2).all(), rel
    # and the composite "gradient" reproduces that plain Gradient x Input through MambaLRP
    relevance = MambaLRP(model, composite="gradient").attribute(ids, target=5)
    assert torch.allclose(relevance.sum(1), gxi, atol=1e-5, rtol=1e-4)


def test_biases_absorb_relevance():
    """With biases the delta is what they absorb: nonzero, and zero once they are zeroed."""
    model = make_lm("mamba", seed=6, use_bias=True, use_conv_bias=True)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") and "dt_proj" not in name:
                p.normal_(0, 0.5)
    ids = torch.randint(0, 64, (2, 15), generator=torch.Generator().manual_seed(4))
    _, delta = MambaLRP(model).attribute(ids, target=2, return_convergence_delta=True)
    assert (delta.abs() > 1e-4).all()
    _, delta0 = MambaLRP(zero_biases(model)).attribute(ids, target=2, return_convergence_delta=True)
    assert (delta0.abs() < 1e-5).all()
