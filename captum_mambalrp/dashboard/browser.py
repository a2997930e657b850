"""Headless Chromium for the browser tests and the screenshot script.

Uses the system's Chromium (Debian packages ``chromium`` and ``chromium-driver``) through
Playwright's Python package; no browser is ever downloaded (no ``playwright install``).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from typing import Any, Iterator, Optional

CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser")


def find_chromium() -> Optional[str]:
    """The Chromium executable: ``$CHROMIUM`` or the Debian package's, else None."""
    for path in (os.environ.get("CHROMIUM", ""), *CANDIDATES):
        if path and os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    return None


@contextmanager
def chromium_context(viewport: Optional[dict] = None, **context_options: Any) -> Iterator[Any]:
    """A Playwright browser context of headless Chromium with a fresh user-data dir."""
    executable = find_chromium()
    if executable is None:
        raise RuntimeError("Chromium is not installed: apt-get install -y chromium chromium-driver")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as err:
        raise RuntimeError(
            "Playwright's Python package is missing: pip install playwright "
            "(the system Chromium is used; do not run `playwright install`)"
        ) from err
    profile = tempfile.mkdtemp(prefix="mambalrp-chromium-")
    try:
        with sync_playwright() as p:
            context = p.chromium.launch_persistent_context(
                profile,
                executable_path=executable,
                args=CHROMIUM_ARGS,
                headless=True,
                viewport=viewport or {"width": 1280, "height": 900},  # type: ignore[arg-type]
                accept_downloads=True,
                **context_options,
            )
            try:
                yield context
            finally:
                context.close()
    finally:
        shutil.rmtree(profile, ignore_errors=True)


def explain_in_page(page: Any, text: str, timeout_ms: float = 120_000) -> None:
    """Type ``text`` into a served dashboard page as a person would and press Explain;
    returns when the answer (a view or a refusal) is on the page. (Waits on attributes, not
    on JavaScript predicates, which the page's Content-Security-Policy does not run.)"""
    done = int(page.get_attribute("body", "data-done") or 0)
    box = page.locator("#text")
    box.fill("")
    if len(text) <= 200:
        box.press_sequentially(text)  # key by key
    else:
        box.fill(text)
    with page.expect_response(lambda r: r.url.endswith("/api/explain"), timeout=timeout_ms):
        page.click("#explain")
    page.wait_for_selector(f"body[data-done='{done + 1}']", state="attached", timeout=timeout_ms)


def read_heatmaps(page: Any) -> dict:
    """The token heatmaps shown: method key -> (tokens, relevance values)."""
    return page.evaluate("""() => Object.fromEntries(Array.from(document.querySelectorAll('#methods .method')).map(
        card => [card.dataset.method, [Array.from(card.querySelectorAll('.tok')).map(s => s.textContent),
                                       Array.from(card.querySelectorAll('.tok')).map(s => Number(s.dataset.relevance))]]))""")


def read_layers(page: Any) -> dict:
    """The per-layer table shown: layer name -> relevance values per token."""
    return page.evaluate("""() => Object.fromEntries(Array.from(document.querySelectorAll('#layer-table tr[data-layer]')).map(
        tr => [tr.dataset.layer,
               Array.from(tr.querySelectorAll('td[data-relevance]')).map(td => Number(td.dataset.relevance))]))""")
