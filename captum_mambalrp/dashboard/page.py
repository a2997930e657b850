"""The dashboard page: one HTML file with inline CSS, JavaScript and data.

The same page is served (``mode="server"``: it asks the server to explain new texts) and
exported (``mode="static"``: the explained texts are embedded; no server, no network).
Its Content-Security-Policy allows only its own inline script and style (by hash), data:
images and, when served, requests to its own origin.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import os
from functools import cache
from typing import Any, Dict, List, Optional

ASSETS = os.path.join(os.path.dirname(__file__), "assets")


@cache
def asset(name: str) -> str:
    with open(os.path.join(ASSETS, name), encoding="utf-8") as f:
        return f.read()


def json_for_script(data: Any) -> str:
    """JSON that cannot end its ``<script>`` block or open a comment in it."""
    text = json.dumps(data, ensure_ascii=False, allow_nan=False)
    return text.replace("&", "\\u0026").replace("<", "\\u003c").replace(">", "\\u003e")


def _sha256(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode("ascii") + "'"


def content_security_policy(mode: str) -> str:
    connect = "'self'" if mode == "server" else "'none'"
    return (
        f"default-src 'none'; script-src {_sha256(asset('dashboard.js'))}; "
        f"style-src {_sha256(asset('dashboard.css'))}; img-src data:; connect-src {connect}; "
        "base-uri 'none'; form-action 'none'"
    )


def render_page(
    info: Dict[str, Any],
    results: List[Dict[str, Any]],
    mode: str = "static",
    examples: Optional[List[str]] = None,
    study: Optional[Dict[str, Any]] = None,
    title: str = "MambaLRP dashboard",
) -> str:
    """The page with its data; ``mode`` is ``"server"`` or ``"static"``."""
    if mode not in ("server", "static"):
        raise ValueError(f"mode must be 'server' or 'static'; got {mode!r}")
    data = {"mode": mode, "info": info, "results": results, "examples": examples or [], "study": study}
    page = asset("page.html")
    # data last: what it holds must never be taken for a placeholder
    for key, value in (
        ("__CSP__", html.escape(content_security_policy(mode), quote=False)),
        ("__TITLE__", html.escape(title)),
        ("__CSS__", asset("dashboard.css")),
        ("__JS__", asset("dashboard.js")),
    ):
        page = page.replace(key, value, 1)
    head, tail = page.split("__DATA__", 1)
    return head + json_for_script(data) + tail
