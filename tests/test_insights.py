"""MambaLRP in Captum Insights (Captum 0.8, in its own virtualenv), end to end in Chromium.

The main environment has Captum 0.9 (no Insights); the Insights server runs with the
python of ``.venv-insights`` (``python -m captum_mambalrp.insights --make-venv
.venv-insights``, done by scripts/setup_browser.sh; created here when missing), or of
``$MAMBALRP_INSIGHTS_PYTHON``.
"""

from __future__ import annotations

import importlib.util
import os
import socket

import pytest
import torch

from captum_mambalrp import MambaLRP
from captum_mambalrp.dashboard.browser import chromium_context, find_chromium
from captum_mambalrp.dashboard.demo import DEMO_TEXTS, make_demo_checkpoint
from captum_mambalrp.insights import make_venv, register_mambalrp, serve_in_subprocess
from captum_mambalrp.models import load_model_and_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXTS = DEMO_TEXTS[:4]
READ_WORDS = """() => Array.from(document.querySelectorAll('span[class*="text-feature-word"]')).map(span => [
    span.firstChild.textContent, span.querySelector('[class*="tooltip__label"]').textContent])"""


@pytest.mark.skipif(importlib.util.find_spec("captum.insights") is not None, reason="this Captum has Insights")
def test_clear_message_without_insights():
    with pytest.raises(ImportError, match=r"removed in 0\.9.*captum-mambalrp\[insights\]"):
        register_mambalrp()


@pytest.fixture(scope="module")
def insights_python():
    python = os.environ.get("MAMBALRP_INSIGHTS_PYTHON") or os.path.join(REPO, ".venv-insights", "bin", "python")
    if not os.path.isfile(python):
        python = make_venv(os.path.join(REPO, ".venv-insights"))
    return python


@pytest.fixture(scope="module")
def served(insights_python, tmp_path_factory):
    folder = tmp_path_factory.mktemp("insights")
    checkpoint = make_demo_checkpoint(str(folder / "ckpt"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    log = str(folder / "server.log")
    proc = serve_in_subprocess(insights_python, checkpoint, TEXTS, port, log, env=env)
    yield checkpoint, f"http://127.0.0.1:{port}/", log
    proc.terminate()
    proc.wait(timeout=30)


def expected_labels(checkpoint: str) -> list:
    """What Insights should show per token: MambaLRP relevance (Captum 0.9, token ids) for
    the predicted class, scaled to a largest magnitude of 100."""
    model, tokenizer = load_model_and_tokenizer(checkpoint)
    out = []
    for text in TEXTS:
        ids = tokenizer([text], return_tensors="pt")["input_ids"]
        relevance = MambaLRP(model).attribute(ids)[0]
        out += list(zip(tokenizer.convert_ids_to_tokens(ids[0].tolist()), (100 * relevance / relevance.abs().max()).tolist()))
    return out


@pytest.mark.browser
@pytest.mark.skipif(
    find_chromium() is None,
    reason="Chromium is not installed (apt-get install -y chromium chromium-driver; scripts/setup_browser.sh does it in CI)",
)
def test_mambalrp_in_the_insights_page(served):
    checkpoint, url, log = served
    with chromium_context() as browser:
        page = browser.new_page()
        page.goto(url)
        # the page fills its method list from the server's /init after loading: wait for it (a loaded
        # machine answered later than the page's load event; an empty list was read once in CI)
        try:
            page.wait_for_selector("select[name=selected_method] option", state="attached", timeout=120_000)
        except Exception as err:  # playwright's TimeoutError: the server's log says why
            raise AssertionError(f"no methods on the page ({err}); server log:\n{open(log).read()[-3000:]}") from None
        methods = page.eval_on_selector_all("select[name=selected_method] option", "os => os.map(o => o.value)")
        assert "MambaLRP" in methods and {"Integrated Gradients", "Saliency", "Occlusion"} <= set(methods)
        page.select_option("select[name=selected_method]", "Integrated Gradients")  # start from Captum's own
        page.select_option("select[name=selected_method]", "MambaLRP")
        with page.expect_response(lambda r: r.url.endswith("/fetch"), timeout=120_000) as response:
            page.click("button:has-text('Fetch')")
        assert response.value.status == 200, open(log).read()[-3000:]
        page.wait_for_selector('span[class*="text-feature-word"]')
        shown = page.evaluate(READ_WORDS)
        sent = [v for example in response.value.json() for v in example[0]["feature_outputs"][0]["modified"]]
    expected = expected_labels(checkpoint)
    assert [token for token, _ in shown] == [token for token, _ in expected]
    assert torch.allclose(
        torch.tensor([float(label) for _, label in shown]), torch.tensor([value for _, value in expected]), atol=1.5e-3
    )  # rendered with 3 decimals
    assert torch.allclose(torch.tensor(sent), torch.tensor([v for _, v in expected]), atol=1e-4)
    assert "Traceback" not in open(log).read()
