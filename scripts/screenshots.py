"""Screenshots of the dashboard and of Captum Insights with MambaLRP, for docs/img/.

    python3 scripts/screenshots.py [--model DIR] [--study DIR] [--out docs/img]

Uses the embedded default model when it is built (else a tiny random demo classifier, whose
relevance means nothing), headless Chromium from Debian's packages, and the Insights
virtualenv (.venv-insights, created when missing). Run by hand after changing the pages.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from captum_mambalrp.cli import quiet_transformers  # noqa: E402
from captum_mambalrp.dashboard import EXAMPLES, DashboardApp, Explainer, load_study, start_in_thread  # noqa: E402
from captum_mambalrp.dashboard.browser import chromium_context, explain_in_page  # noqa: E402
from captum_mambalrp.dashboard.demo import make_demo_checkpoint  # noqa: E402
from captum_mambalrp.insights import make_venv, serve_in_subprocess  # noqa: E402
from captum_mambalrp.models import DEFAULT_MODEL_DIR, load_model_and_tokenizer  # noqa: E402


def model_path(given: str, scratch: str) -> str:
    if given:
        return given
    if os.path.isfile(os.path.join(DEFAULT_MODEL_DIR, "config.json")):
        return DEFAULT_MODEL_DIR
    print("the default model is not built: using a random demo classifier", file=sys.stderr)
    return make_demo_checkpoint(os.path.join(scratch, "demo"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dashboard_shot(path: str, study: str, out: str, text: str) -> None:
    model, tokenizer = load_model_and_tokenizer(path)
    source = "embedded default (Emotion classifier)" if path == DEFAULT_MODEL_DIR else os.path.basename(path)
    app = DashboardApp(Explainer(model, tokenizer, source=source), EXAMPLES, load_study(study) if study else None)
    server, url = start_in_thread(app)
    try:
        with chromium_context(viewport={"width": 1280, "height": 900}) as browser:
            page = browser.new_page()
            page.goto(url)
            page.wait_for_selector("body[data-ready]")
            explain_in_page(page, text)
            page.screenshot(path=os.path.join(out, "dashboard.png"), full_page=True)
    finally:
        server.shutdown()
        server.server_close()


def insights_shot(path: str, out: str, scratch: str) -> None:
    python = os.path.join(REPO, ".venv-insights", "bin", "python")
    if not os.path.isfile(python):
        python = make_venv(os.path.join(REPO, ".venv-insights"))
    port = free_port()
    env = {**os.environ, "PYTHONPATH": REPO}
    proc = serve_in_subprocess(python, path, EXAMPLES[:4], port, os.path.join(scratch, "insights.log"), env=env)
    try:
        with chromium_context(viewport={"width": 1280, "height": 900}) as browser:
            page = browser.new_page()
            page.goto(f"http://127.0.0.1:{port}/")
            page.select_option("select[name=selected_method]", "MambaLRP")
            with page.expect_response(lambda r: r.url.endswith("/fetch"), timeout=300_000):
                page.click("button:has-text('Fetch')")
            page.wait_for_selector('span[class*="text-feature-word"]')
            page.screenshot(path=os.path.join(out, "insights.png"), full_page=True)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="", help="checkpoint folder (default: the embedded model, else a demo)")
    p.add_argument("--study", default="", help="a compare --out folder to show in the dashboard")
    p.add_argument("--out", default=os.path.join(REPO, "docs", "img"))
    p.add_argument("--text", default=EXAMPLES[0], help="the text typed into the dashboard")
    p.add_argument("--skip-insights", action="store_true")
    args = p.parse_args()
    quiet_transformers()
    os.makedirs(args.out, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        path = model_path(args.model, scratch)
        dashboard_shot(path, args.study, args.out, args.text)
        if not args.skip_insights:
            insights_shot(path, args.out, scratch)
    print(f"screenshots in {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
