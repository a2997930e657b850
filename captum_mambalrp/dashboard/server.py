"""The dashboard's local web server (standard library only).

``GET /`` the page, ``GET /api/info`` the model, ``POST /api/explain`` one text,
``POST /api/export`` the self-contained HTML of the given results. It binds to
127.0.0.1 by default and, when bound to a loopback address, answers only requests whose
``Host`` names that address (no DNS rebinding). One explanation runs at a time.
"""

from __future__ import annotations

import json
import sys
import threading
import traceback
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Dict, List, Optional, Tuple

from .explain import Explainer, InputError
from .page import content_security_policy, render_page

MAX_EXPLAIN_BODY = 64 * 1024
MAX_EXPORT_BODY = 32 * 1024 * 1024
MAX_EXPORT_RESULTS = 200
LOOPBACK = ("127.0.0.1", "localhost", "::1")


@dataclass
class DashboardApp:
    """What the server shows: the explainer, examples to pick from, an optional study."""

    explainer: Explainer
    examples: List[str] = field(default_factory=list)
    study: Optional[Dict[str, Any]] = None
    verbose: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)

    def page(self, mode: str = "server", results: Optional[List[Dict[str, Any]]] = None) -> str:
        return render_page(self.explainer.info(), results or [], mode=mode, examples=self.examples, study=self.study)

    def explain(self, request: Dict[str, Any]) -> Dict[str, Any]:
        methods = request.get("methods", [])
        if not isinstance(methods, list) or not all(isinstance(m, str) for m in methods):
            raise InputError("methods must be a list of method keys.")
        with self.lock:
            return self.explainer.explain(request.get("text"), request.get("target") or None, methods)

    def export(self, request: Dict[str, Any]) -> str:
        results = request.get("results")
        if not isinstance(results, list) or not results or not all(isinstance(r, dict) for r in results):
            raise InputError("Nothing to export yet: explain a text first.")
        if len(results) > MAX_EXPORT_RESULTS:
            raise InputError(f"Too many results to export ({len(results)}; the limit is {MAX_EXPORT_RESULTS}).", 413)
        return self.page("static", results)


class Handler(BaseHTTPRequestHandler):
    """Routes requests to a :class:`DashboardApp` (set as the class attribute ``app``)."""

    app: DashboardApp
    server_version = "captum-mambalrp-dashboard"
    sys_version = ""

    def log_message(self, format: str, *args: Any) -> None:
        if self.app.verbose:
            sys.stderr.write("dashboard: " + format % args + "\n")

    def _host_ok(self) -> bool:
        bound = self.server.server_address[0]
        if bound not in LOOPBACK:
            return True
        host = (self.headers.get("Host") or "").strip().lower()
        name = host.rsplit(":", 1)[0] if not host.startswith("[") else host[1:].split("]", 1)[0]
        return name in LOOPBACK

    def _send(self, status: int, body: bytes, content_type: str, extra: Tuple[Tuple[str, str], ...] = ()) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")
        for k, v in extra:
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, data: Any) -> None:
        self._send(status, json.dumps(data).encode("utf-8"), "application/json; charset=utf-8")

    def _error(self, status: int, message: str) -> None:
        self._json(status, {"error": message})

    def _body(self, limit: int) -> Dict[str, Any]:
        length = int(self.headers.get("Content-Length") or 0)
        if length > limit:
            raise InputError(f"Request too large: {length} bytes; the limit is {limit} bytes.", 413)
        try:
            data = json.loads(self.rfile.read(length) or b"{}")
        except (ValueError, UnicodeDecodeError):
            raise InputError("The request is not valid JSON.") from None
        if not isinstance(data, dict):
            raise InputError("The request must be a JSON object.")
        return data

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        if not self._host_ok():
            return self._error(HTTPStatus.FORBIDDEN, "unexpected Host header")
        path = self.path.split("?", 1)[0]
        if path in ("/", "/index.html"):
            page = self.app.page().encode("utf-8")
            csp = (("Content-Security-Policy", content_security_policy("server")),)
            return self._send(HTTPStatus.OK, page, "text/html; charset=utf-8", csp)
        if path == "/api/info":
            return self._json(HTTPStatus.OK, self.app.explainer.info())
        self._error(HTTPStatus.NOT_FOUND, "not found")

    def do_POST(self) -> None:  # noqa: N802
        if not self._host_ok():
            return self._error(HTTPStatus.FORBIDDEN, "unexpected Host header")
        path = self.path.split("?", 1)[0]
        if "json" not in (self.headers.get("Content-Type") or ""):
            return self._error(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, "send JSON (Content-Type: application/json)")
        try:
            if path == "/api/explain":
                return self._json(HTTPStatus.OK, self.app.explain(self._body(MAX_EXPLAIN_BODY)))
            if path == "/api/export":
                page = self.app.export(self._body(MAX_EXPORT_BODY)).encode("utf-8")
                disposition = (("Content-Disposition", 'attachment; filename="mambalrp_dashboard.html"'),)
                return self._send(HTTPStatus.OK, page, "text/html; charset=utf-8", disposition)
        except InputError as err:
            return self._error(err.status, str(err))
        except Exception as err:  # a method failing on this model: say so, keep serving
            traceback.print_exc()
            return self._error(HTTPStatus.INTERNAL_SERVER_ERROR, f"{type(err).__name__}: {err}"[:500])
        self._error(HTTPStatus.NOT_FOUND, "not found")


def make_server(app: DashboardApp, host: str = "127.0.0.1", port: int = 8000) -> ThreadingHTTPServer:
    """A server for ``app`` (``port=0`` picks a free port); call ``serve_forever()``."""
    handler = type("DashboardHandler", (Handler,), {"app": app})
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    return server


def start_in_thread(app: DashboardApp, host: str = "127.0.0.1", port: int = 0) -> Tuple[ThreadingHTTPServer, str]:
    """Serve in a daemon thread; the server (``shutdown()`` it) and its URL."""
    server = make_server(app, host, port)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://{host}:{server.server_address[1]}/"
