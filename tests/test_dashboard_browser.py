"""The dashboard in headless Chromium: typing an input shows heatmaps whose values are the
Python API's, markup shows as text, oversized inputs are refused, the export works offline."""

from __future__ import annotations

import pytest
import torch
from test_dashboard import write_study

from captum_mambalrp import LayerMambaLRP, MambaLRP
from captum_mambalrp.dashboard import DashboardApp, Limits, load_study, start_in_thread
from captum_mambalrp.dashboard.browser import chromium_context, explain_in_page, find_chromium, read_heatmaps, read_layers
from captum_mambalrp.dashboard.demo import demo_explainer
from captum_mambalrp.dashboard.views import result_view
from captum_mambalrp.results import AttributionResult, load_results
from captum_mambalrp.visualization.colors import css

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(
        find_chromium() is None,
        reason="Chromium is not installed (apt-get install -y chromium chromium-driver; scripts/setup_browser.sh does it in CI)",
    ),
]

TEXT = "i feel so happy and loved today"
XSS = '<img src=x onerror="window.__xss=1"><script>window.__xss=2</script> i feel sad'


@pytest.fixture(scope="module")
def explainer(tmp_path_factory):
    return demo_explainer(str(tmp_path_factory.mktemp("demo")), limits=Limits(max_chars=1000, max_tokens=64), ig_steps=16)


@pytest.fixture(scope="module")
def url(explainer, tmp_path_factory):
    folder = tmp_path_factory.mktemp("study") / "out"
    write_study(folder)
    server, address = start_in_thread(
        DashboardApp(explainer, examples=[TEXT, "what a scary night"], study=load_study(str(folder)))
    )
    yield address
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def browser():
    with chromium_context() as context:
        yield context


@pytest.fixture
def page(browser, url):
    page = browser.new_page()
    dialogs = []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    page.goto(url)
    page.wait_for_selector("body[data-ready]")
    yield page
    page.close()
    assert dialogs == [], "the page opened a dialog"


def test_typing_an_input_shows_heatmaps_matching_the_api(page, explainer):
    explain_in_page(page, TEXT)
    shown = read_heatmaps(page)
    assert list(shown) == ["mambalrp", "input_x_gradient", "integrated_gradients", "feature_ablation"]
    model, ids = explainer.model, explainer.tokenizer([TEXT], return_tensors="pt")["input_ids"]
    lrp, delta = MambaLRP(model).attribute(ids, return_convergence_delta=True)
    tokens, values = shown["mambalrp"]
    assert tokens == TEXT.split()
    assert torch.allclose(torch.tensor(values), lrp[0], atol=1e-6)
    api = explainer.explain(TEXT)
    for row in api["methods"][1:]:
        assert shown[row["key"]][0] == tokens
        assert torch.allclose(torch.tensor(shown[row["key"]][1]), torch.tensor(row["relevance"]), atol=1e-6)
    assert page.inner_text("#s-prediction").startswith(api["prediction"]["label"] + " (p = ")
    assert page.inner_text("#s-explained").endswith(f"= {api['target']['logit']:.4f}")
    assert abs(float(page.inner_text("#s-delta"))) < 1e-5 and abs(float(delta)) < 1e-5
    layers = read_layers(page)
    expected = LayerMambaLRP(model, [model.backbone.embeddings, *model.backbone.layers]).attribute(ids)
    assert list(layers) == ["embedding", "backbone.layers.0", "backbone.layers.1"]
    for values, rel in zip(layers.values(), expected):
        assert torch.allclose(torch.tensor(values), rel[0].sum(-1), atol=1e-6)
    # picking an example fills the box; only the checked methods are computed
    page.select_option("#examples", "what a scary night")
    assert page.input_value("#text") == "what a scary night"
    page.uncheck("#method-integrated_gradients")
    page.uncheck("#method-feature_ablation")
    page.check("#method-smoothgrad")
    page.select_option("#target", "fear")
    explain_in_page(page, "what a scary night")
    assert page.inner_text("#s-explained").startswith("logit of fear at position 3 = ")
    assert (
        list(read_heatmaps(page)) == ["mambalrp", "input_x_gradient", "smoothgrad"]
        and page.get_attribute("body", "data-results") == "2"
    )
    assert page.is_visible("#study-images img") and page.inner_text("#study-tables").count("MambaLRP") >= 1


def test_markup_in_the_input_shows_as_text(page):
    explain_in_page(page, XSS)
    assert page.text_content("#s-text") == XSS
    assert page.evaluate("window.__xss") is None
    assert page.query_selector_all("#result img, #result script") == []
    assert page.eval_on_selector("#pick", "s => s.options[0].textContent") == "1. " + XSS[:80]
    # the study's own markup-like cells are text too
    assert "<b>GxI</b>" in page.inner_text("#study-tables") and page.query_selector_all("#study-tables b") == []


def test_oversized_input_is_refused_with_a_message(page):
    explain_in_page(page, "happy " * 80)
    assert page.is_visible("#message")
    assert page.inner_text("#message") == "Input too long: 80 tokens; the limit is 64 tokens."
    assert page.is_hidden("#result")
    explain_in_page(page, "x" * 1001)
    assert page.inner_text("#message") == "Input too long: 1001 characters; the limit is 1000 characters."
    explain_in_page(page, "i feel sad")  # a good input clears the message
    assert page.is_hidden("#message") and page.is_visible("#result")


def test_export_opens_offline(page, browser, tmp_path):
    explain_in_page(page, TEXT)
    explain_in_page(page, "i feel sad and lonely tonight")
    served = read_heatmaps(page)  # the second input's view
    with page.expect_download() as download:
        page.click("#export")
    path = tmp_path / "export.html"
    download.value.save_as(path)
    requests = []
    offline = browser.new_page()
    try:
        browser.set_offline(True)
        offline.on("request", lambda r: requests.append(r.url))
        offline.goto(path.as_uri())
        offline.wait_for_selector("body[data-ready]")
        assert offline.is_hidden("#controls") and "exported view" in offline.inner_text("#model-line")
        offline.select_option("#pick", "1")
        assert read_heatmaps(offline) == served
        assert_colours_follow_the_convention(offline)
        assert offline.eval_on_selector("#study-images img", "img => img.complete && img.naturalWidth > 0")
        assert requests == [path.as_uri()]  # nothing else was asked for
    finally:
        browser.set_offline(False)
        offline.close()


def assert_colours_follow_the_convention(page) -> None:
    """Every token's background is the package's colour of its scaled relevance (red for,
    blue against), and the legend shows red, white and blue."""
    cards = page.evaluate("""() => Array.from(document.querySelectorAll('#methods .method')).map(card =>
        Array.from(card.querySelectorAll('.tok')).map(
            s => [Number(s.dataset.relevance), getComputedStyle(s).backgroundColor]))""")
    assert cards
    for card in cards:
        peak = max(abs(v) for v, _ in card) or 1.0
        for value, colour in card:
            assert colour == css(value / peak), (value, colour)
    top = max(cards[0], key=lambda x: x[0])
    low = min(cards[0], key=lambda x: x[0])
    assert top[0] > 0 and top[1].startswith("rgb(255, ")  # the most positive token is red
    assert low[0] < 0 and low[1].endswith(", 255)")  # the most negative token is blue
    swatches = page.evaluate(
        "() => Array.from(document.querySelectorAll('#legend .swatch')).map(s => getComputedStyle(s).backgroundColor)"
    )
    assert swatches == ["rgb(255, 0, 0)", "rgb(255, 255, 255)", "rgb(0, 0, 255)"]
    assert "for the explained class" in page.inner_text("#legend") and "against" in page.inner_text("#legend")


def test_colours_and_legend(page):
    explain_in_page(page, "i am scared of the dark and feel so alone")
    assert_colours_follow_the_convention(page)


STUDY_HEADER = ["method", "reference", "n", "ΔA^F", "AOPC", "ABPC", "ΔA^I", "A(MoRF)", "A(LeRF)", "A_ins(MoRF)", "A_ins(LeRF)"]
STUDY_HEADER += ["ms / example", "CPU ms / example", "forwards / example"]
METHODS = [
    "Mamba-Attr (gradient-weighted rollout)",
    "Attention Rollout (hidden attention)",
    "Occlusion (FeatureAblation)",
    "MambaLRP",
]
# the faithfulness table of a study's summary.md, as evaluation/summary.py writes it (14 columns)
STUDY_SUMMARY = "\n".join(
    ["# Attribution study", "", "| " + " | ".join(STUDY_HEADER) + " |", "|" + "---|" * len(STUDY_HEADER)]
    + [f"| {m} | token:0 | 2000 | " + " | ".join(["-0.267 ± 0.025"] * 8) + " | 151.1 | 257.2 | 20.2 |" for m in METHODS]
)


def test_study_table_fits_its_card_at_1400px(browser, explainer, tmp_path):
    folder = tmp_path / "study"
    folder.mkdir()
    (folder / "summary.md").write_text(STUDY_SUMMARY)
    server, url = start_in_thread(DashboardApp(explainer, study=load_study(str(folder))))
    page = browser.new_page()
    try:
        page.set_viewport_size({"width": 1400, "height": 900})
        page.goto(url)
        page.wait_for_selector("body[data-ready]")
        sizes = page.evaluate("""() => Array.from(document.querySelectorAll('#study-tables .study-table')).map(card =>
            [card.querySelector('table').getBoundingClientRect().width, card.clientWidth, card.scrollWidth])""")
        assert len(sizes) == 1
        for table, card, scroll in sizes:
            assert table <= card and scroll <= card, sizes  # inside its card, nothing to scroll
        assert page.evaluate("() => document.documentElement.scrollWidth") <= 1400
    finally:
        page.close()
        server.shutdown()
        server.server_close()


def test_saved_result_and_the_words_switch(browser, explainer, tmp_path):
    saved = AttributionResult(
        tokens=["<|endoftext|>", "Ġun", "believ", "able", "Ġday"],
        relevance=[0.5, 1.0, 0.25, 0.75, -1.0],
        target_index=1,
        target_name="joy",
        explained=1.5,
        text="<|endoftext|> unbelievable day",
        prediction="joy",
        prediction_prob=0.9,
        model={"name": "a BPE model", "config_hash": "0123456789abcdef"},
        composite="mambalrp",
    )
    server, url = start_in_thread(DashboardApp(explainer, results=[result_view(saved, "kept.json")]))
    page = browser.new_page()
    try:
        page.goto(url)
        page.wait_for_selector("body[data-ready]")
        assert read_heatmaps(page) == {"mambalrp": [saved.tokens, [0.5, 1.0, 0.25, 0.75, -1.0]]}
        assert page.is_hidden("#layers-part") and "kept.json" in page.inner_text("#s-saved")
        assert "0123456789abcdef" in page.inner_text("#s-saved") and page.inner_text("#s-prediction") == "joy (p = 0.900)"
        assert page.is_enabled("#words")
        page.check("#words")
        tokens, values = read_heatmaps(page)["mambalrp"]
        assert tokens == ["<|endoftext|>", "unbelievable", "day"] and values == [0.5, 2.0, -1.0]  # sums of the pieces
        assert_colours_follow_the_convention(page)
        page.uncheck("#words")
        assert read_heatmaps(page)["mambalrp"][0] == saved.tokens
        with page.expect_download() as download:  # saved again from the page: the same result
            page.click("#save")
        path = tmp_path / "again.json"
        download.value.save_as(path)
        assert [r.to_dict() for r in load_results(path)] == [saved.to_dict()]
    finally:
        page.close()
        server.shutdown()
        server.server_close()
