"""MambaLRP inside Captum: class hierarchy, visualisation records, NoiseTunnel, metrics."""

from __future__ import annotations

import torch
from captum.attr import LRP, Attribution, GradientAttribution, NoiseTunnel
from captum.attr import visualization as viz
from captum.metrics import infidelity, sensitivity_max
from conftest import LastTokenClassifier, make_lm, zero_biases

from captum_mambalrp import MambaLRP
from captum_mambalrp.visualization import captum_html, text_records


def classifier():
    return LastTokenClassifier(zero_biases(make_lm("mamba", seed=21)).backbone, n_classes=3).eval()


def test_is_a_captum_lrp():
    lrp = MambaLRP(make_lm("mamba"))
    assert isinstance(lrp, LRP) and isinstance(lrp, GradientAttribution) and isinstance(lrp, Attribution)
    assert lrp.has_convergence_delta() and lrp.multiplies_by_inputs


def test_visualization_records_and_html():
    model = classifier()
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(0))
    rel, delta = MambaLRP(model).attribute(ids, target=1, return_convergence_delta=True)
    logits = model(ids)[:, -1].detach()
    tokens = [[f"<w{int(t)}>" for t in row] for row in ids]
    recs = text_records(
        rel,
        tokens,
        pred_class=logits.argmax(-1).tolist(),
        pred_prob=logits.softmax(-1).max(-1).values.tolist(),
        attr_class=[1, 1],
        explained=logits[:, 1].tolist(),
        delta=delta.tolist(),
    )
    assert all(isinstance(r, viz.VisualizationDataRecord) for r in recs)
    assert torch.allclose(recs[0].word_attributions, rel[0] / rel[0].abs().max())
    page = captum_html(recs)
    assert "&lt;w" in page and "<w" + str(int(ids[0, 0])) + ">" not in page  # tokens escaped
    assert page.count("<mark") == 12


def test_inside_noise_tunnel():
    model = classifier()
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(1))
    embeds = model.backbone.embeddings(ids).detach()
    lrp = MambaLRP(model)
    nt = NoiseTunnel(lrp)
    smooth = nt.attribute(embeds, nt_type="smoothgrad", nt_samples=4, stdevs=0.0, target=2)
    assert torch.allclose(smooth, lrp.attribute(embeds, target=2), atol=1e-5)
    noisy, delta = nt.attribute(embeds, nt_type="smoothgrad", nt_samples=3, stdevs=0.1, target=2, return_convergence_delta=True)
    assert noisy.shape == embeds.shape and delta.shape == (6,)
    assert (delta.abs() < 1e-4).all()


def test_infidelity_and_sensitivity_with_a_mambalrp_explanation():
    model = classifier()
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(2))
    embeds = model.backbone.embeddings(ids).detach()
    lrp = MambaLRP(model)

    def last_token_logits(x):
        return model(inputs_embeds=x)[:, -1]

    def perturb(x):
        noise = 0.01 * torch.randn_like(x)
        return noise, x - noise

    attributions = lrp.attribute(embeds, target=0)
    torch.manual_seed(0)
    inf = infidelity(last_token_logits, perturb, embeds, attributions, target=0, n_perturb_samples=8)
    assert inf.shape == (2,) and torch.isfinite(inf).all()
    sens = sensitivity_max(lrp.attribute, embeds, target=0, n_perturb_samples=4, perturb_radius=0.01)
    assert sens.shape == (2,) and torch.isfinite(sens).all() and (sens >= 0).all()
    # sensitivity is measured on MambaLRP itself: a zero radius means zero sensitivity
    assert torch.allclose(
        sensitivity_max(lrp.attribute, embeds, target=0, n_perturb_samples=2, perturb_radius=0.0), torch.zeros(2), atol=1e-6
    )
