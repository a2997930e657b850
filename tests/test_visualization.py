"""Captum's visualisers on MambaLRP results: text records in one call, image heatmaps (Vim)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import re

import numpy as np
import pytest
import torch
from captum.attr import visualization as viz

from captum_mambalrp import MambaLRP
from captum_mambalrp.dashboard.demo import make_demo_checkpoint
from captum_mambalrp.models import load_model_and_tokenizer
from captum_mambalrp.text import explain_texts, legend, records
from captum_mambalrp.visualization import captum_html, image_attr_figure, relevance_cmap, terminal_heatmap, text_records
from captum_mambalrp.visualization.colors import css, rgb
from captum_mambalrp.visualization.image import display_image, to_hwc

RED, BLUE = "rgb(255, 0, 0)", "rgb(0, 0, 255)"


def mark_colours(page: str) -> dict:
    """token -> background colour of each ``<mark>`` in an HTML page."""
    return dict((tok, col) for col, tok in re.findall(r'<mark style="background-color:(rgb\([^)]*\));[^>]*>([^<]*)</mark>', page))


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
    # red background for the positive token, blue for the negative one
    # (white text on the strong red, black on the light blue)
    assert "\x1b[48;2;255;0;0m\x1b[38;2;255;255;255m a " in coloured and "\x1b[48;2;127;127;255m\x1b[38;2;0;0;0m b " in coloured
    with_legend = terminal_heatmap(["a", "b"], torch.tensor([1.0, -0.5]), legend=True)
    assert with_legend.splitlines()[1] == legend()
    assert "\x1b[48;2;255;0;0m" in legend() and "for the class (+)" in legend() and "\x1b[48;2;0;0;255m" in legend()
    assert legend(color=False) == "legend: red = for the explained class (+), white = none, blue = against it (-)"


def test_one_colour_convention():
    assert rgb(1) == (255, 0, 0) and rgb(-1) == (0, 0, 255) and rgb(0) == (255, 255, 255)
    assert rgb(0.5) == (255, 127, 127) and rgb(-0.5) == (127, 127, 255) and rgb(7) == rgb(1)
    cmap = relevance_cmap()  # the image colour map: the same colours at -1, 0, 1 and in between
    for v in (-1.0, -0.5, 0.0, 0.5, 1.0):
        assert np.allclose(np.array(cmap((v + 1) / 2)[:3]) * 255, rgb(v), atol=1.5)


def test_html_page_colours_and_legend():
    recs = text_records(torch.tensor([[2.0, -1.0, 0.0]]), [["good", "bad", "meh"]], attr_class=["joy"])
    page = captum_html(recs)
    colours = mark_colours(page)
    assert colours == {"good": RED, "bad": css(-0.5), "meh": css(0)} and css(-0.5) == "rgb(127, 127, 255)"
    assert "hsl(" not in page  # not Captum's green/red colours
    legend_part = page.split("<table>")[0]
    assert "Legend" in legend_part and f"background-color:{RED}" in legend_part and f"background-color:{BLUE}" in legend_part
    assert "for the explained class (positive)" in legend_part and "against it (negative)" in legend_part


def test_documented_text_records_call():
    """docs/visualization.md: ``text_records(relevance, tokens)`` alone works."""
    relevance, tokens = torch.tensor([[0.5, -1.0, 0.25]]), [["i", "feel", "sad"]]
    (rec,) = text_records(relevance, tokens)
    assert rec.word_attributions.tolist() == [0.5, -1.0, 0.25] and rec.attr_score == pytest.approx(-0.25)
    assert rec.pred_class == "" and rec.attr_class == "" and rec.convergence_score == 0.0
    assert "<mark" in captum_html([rec])


def test_image_heatmap_colours():
    heat = torch.zeros(1, 8, 8)
    heat[0, :4] = 1.0  # top half for the class
    heat[0, 4:] = -1.0  # bottom half against it
    fig, ax = image_attr_figure(heat, outlier_perc=0)
    shown = ax.images[-1]
    rgba = shown.cmap(shown.norm(shown.get_array()))
    assert np.allclose(rgba[0, 0, :3], (1, 0, 0)) and np.allclose(rgba[-1, -1, :3], (0, 0, 1))  # red for, blue against
    assert len(fig.axes) == 2  # the heatmap and its colour bar (the legend)
    fig, ax = image_attr_figure(heat, sign="negative", outlier_perc=0)
    shown = ax.images[-1]
    rgba = shown.cmap(shown.norm(shown.get_array()))
    assert rgba[-1, -1, 2] > rgba[-1, -1, 0]  # negative relevance in blues


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


def test_llm_plots_colours():
    import matplotlib.pyplot as plt
    from captum.attr import LLMAttributionResult

    from captum_mambalrp.llm import MambaLLMAttributionResult

    base = LLMAttributionResult(
        input_tokens=["the", "cat"],
        output_tokens=["sat"],
        seq_attr=torch.tensor([2.0, -1.0]),
        token_attr=torch.tensor([[2.0, -2.0]]),
    )
    result = MambaLLMAttributionResult(base, torch.zeros(1, 1), torch.tensor([1.0]), torch.tensor([0.0]), "logit")
    fig, ax = result.plot_token_attr()
    shown = ax.images[0]
    rgba = shown.cmap(shown.norm(shown.get_array()))
    assert np.allclose(rgba[0, 0, :3], (1, 0, 0)) and np.allclose(rgba[0, 1, :3], (0, 0, 1))  # "the" for, "cat" against
    plt.close(fig)
    fig, ax = result.plot_seq_attr()
    bars = {round(b.get_height(), 3): b.get_facecolor()[:3] for b in ax.patches if b.get_height() != 0}
    assert np.allclose(bars[2.0], (1, 0, 0)) and np.allclose(bars[-1.0], (0, 0, 1))
    plt.close(fig)


def test_explain_command_colours(tmp_path, capsys):
    """``captum-mambalrp explain``: the most positive token is red and the most negative blue,
    in the terminal and in the HTML page it writes, each with a legend."""
    from captum_mambalrp.cli import main

    ckpt = make_demo_checkpoint(str(tmp_path / "ckpt"))
    text = "i am scared of the dark and feel so alone"
    page_path = tmp_path / "out.html"
    assert main(["explain", "--model", ckpt, text, "--target", "joy", "--html", str(page_path), "--color"]) == 0
    out = capsys.readouterr().out
    model, tokenizer = load_model_and_tokenizer(ckpt)
    (e,) = explain_texts(model, tokenizer, [text], target="joy")
    top, low = e.tokens[int(e.relevance.argmax())], e.tokens[int(e.relevance.argmin())]
    assert float(e.relevance.max()) > 0 > float(e.relevance.min())
    assert legend() in out  # the legend line
    peak = float(e.relevance.abs().max())
    low_v = float(e.relevance.min()) / peak
    r, g, b = rgb(low_v)
    fg = "255;255;255" if abs(low_v) > 0.6 else "0;0;0"
    assert f"\x1b[48;2;{r};{g};{b}m\x1b[38;2;{fg}m {low} " in out and b == 255 and r < 255  # blue
    r, g, b = rgb(1.0)
    assert f"\x1b[48;2;{r};{g};{b}m\x1b[38;2;255;255;255m {top} " in out and r == 255 and b < 255  # red
    page = page_path.read_text()
    colours = mark_colours(page)
    assert colours[top].startswith("rgb(255, ") and colours[low].endswith(", 255)") and colours[low] != "rgb(255, 255, 255)"
    assert "Legend" in page and "hsl(" not in page


def test_notebook_visualize_text_in_our_colours(capsys):
    from captum_mambalrp.visualization import visualize_text

    shown = visualize_text(text_records(torch.tensor([[1.0, -1.0]]), [["good", "bad"]]))
    assert mark_colours(shown.data) == {"good": RED, "bad": BLUE} and "Legend" in shown.data


def test_docstring_examples():
    import doctest

    import captum_mambalrp.results
    import captum_mambalrp.text
    import captum_mambalrp.visualization.colors
    import captum_mambalrp.visualization.text
    import captum_mambalrp.visualization.words

    for module in (
        captum_mambalrp.results,
        captum_mambalrp.text,
        captum_mambalrp.visualization.colors,
        captum_mambalrp.visualization.text,
        captum_mambalrp.visualization.words,
    ):
        failed, attempted = doctest.testmod(module)
        assert failed == 0 and attempted > 0, module.__name__
