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
        assert offline.eval_on_selector("#study-images img", "img => img.complete && img.naturalWidth > 0")
        assert requests == [path.as_uri()]  # nothing else was asked for
    finally:
        browser.set_offline(False)
        offline.close()
