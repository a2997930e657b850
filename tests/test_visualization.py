"""Captum's visualisers on MambaLRP results: text records in one call, image heatmaps (Vim)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import pytest
import torch
from captum.attr import visualization as viz

from captum_mambalrp import MambaLRP
from captum_mambalrp.dashboard.demo import make_demo_checkpoint
from captum_mambalrp.models import load_model_and_tokenizer
from captum_mambalrp.text import explain_texts, records
from captum_mambalrp.visualization import captum_html, image_attr_figure, terminal_heatmap, text_records
from captum_mambalrp.visualization.image import display_image, to_hwc


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    texts = ["i feel so happy today", "a < bold & scary > night"]
    path = make_demo_checkpoint(str(tmp_path_factory.mktemp("demo")), texts=texts)
    model, tokenizer = load_model_and_tokenizer(path)
    return model, tokenizer, texts


def test_records_in_one_call_feed_visualize_text(demo):
    model, tokenizer, texts = demo
    recs = records(explain_texts(model, tokenizer, texts, target="joy"))
    ids = tokenizer(texts[:1], return_tensors="pt")["input_ids"]
    expected = MambaLRP(model).attribute(ids, target=1)[0]
    assert all(isinstance(r, viz.VisualizationDataRecord) for r in recs)
    assert torch.allclose(recs[0].word_attributions, expected / expected.abs().max(), atol=1e-6)
    assert recs[0].attr_class == "joy" and recs[0].raw_input_ids == ["i", "feel", "so", "happy", "today"]
    logit = float(model(ids).logits[0, -1, 1].detach())
    assert recs[0].attr_score == pytest.approx(logit, abs=1e-5)
    assert abs(recs[0].convergence_score) < 1e-5  # bias-free: conservative
    page = captum_html(recs, title="<i>relevance</i>")
    assert page.count("<mark") == 5 + len(recs[1].raw_input_ids)
    assert recs[1].raw_input_ids == ["a", "&lt;", "bold", "&amp;", "scary", "&gt;", "night"]  # tokens escaped
    assert "&lt;i&gt;relevance" in page and "<i>relevance" not in page  # the title too


def test_text_records_checks_lengths_and_mask():
    rel = torch.tensor([[0.5, -1.0, 0.0], [2.0, 1.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    recs = text_records(
        rel,
        [["a", "b", "c"], ["d", "e"]],
        pred_class=["x", "y"],
        pred_prob=[0.9, 0.8],
        attr_class=["x", "y"],
        explained=[1.0, 2.0],
        attention_mask=mask,
    )
    assert recs[1].word_attributions.tolist() == [1.0, 0.5]
    xss = text_records(
        rel[:1, :1],
        [["<script>alert(1)</script>"]],
        pred_class=["<img src=x onerror=alert(2)>"],
        pred_prob=[0.9],
        attr_class=["<b>"],
        explained=[1.0],
    )
    page = captum_html(xss)
    assert "<script>alert" not in page and "<img src=x" not in page and "<b><b></b>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "&lt;img src=x onerror=alert(2)&gt;" in page
    with pytest.raises(ValueError, match="pass attention_mask"):
        text_records(
            rel, [["a", "b"], ["d", "e"]], pred_class=["x", "y"], pred_prob=[1, 1], attr_class=["x", "y"], explained=[1, 2]
        )


def test_terminal_heatmap_plain_and_colour():
    assert terminal_heatmap(["a", "b"], torch.tensor([1.0, -0.5]), color=False) == "a(+1.00) b(-0.50)"
    coloured = terminal_heatmap(["a", "b"], torch.tensor([1.0, -0.5]))
    assert "\x1b[48;2;255;0;0m" in coloured and "\x1b[48;2;127;127;255m" in coloured


def test_image_helpers_shapes():
    assert to_hwc(torch.zeros(3, 4, 5)).shape == (4, 5, 3)
    assert to_hwc(torch.zeros(1, 1, 4, 5)).shape == (4, 5, 1)
    assert to_hwc(torch.zeros(4, 5)).shape == (4, 5, 1)
    shown = display_image(torch.tensor([[[-2.0, 2.0]]]))
    assert shown.min() == 0 and shown.max() == 1
    with pytest.raises(ValueError, match="one image"):
        to_hwc(torch.zeros(2, 3, 4, 4))


def test_visualize_image_attr_on_a_vision_mamba_heatmap():
    vim = pytest.importorskip("captum_mambalrp.models.vim")
    from captum_mambalrp.visualization import vim_heatmap

    torch.manual_seed(0)
    model = vim.VisionMamba(img_size=32, patch_size=8, stride=8, depth=2, embed_dim=16, d_state=4, num_classes=5).eval()
    images = torch.randn(1, 3, 32, 32)
    patch = vim_heatmap(model, images, target=2)
    pixel = vim_heatmap(model, images, target=2, level="pixel")
    assert patch.shape == pixel.shape == (1, 1, 32, 32)
    assert torch.allclose(patch.sum(), pixel.sum(), rtol=1e-4, atol=1e-6)  # spreading keeps each patch's sum
    blocks = patch[0, 0].reshape(4, 8, 4, 8)
    assert torch.allclose(blocks, blocks[:, :1, :, :1].expand_as(blocks))  # constant within each patch
    fig, ax = image_attr_figure(patch[0], images[0], title="Vim")
    assert ax.get_title() == "Vim" and len(ax.images) == 2  # the image and the heatmap over it
    fig, ax = image_attr_figure(pixel[0], sign="absolute_value")
    assert len(ax.images) == 1
