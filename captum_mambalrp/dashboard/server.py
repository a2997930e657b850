"""The dashboard's local web server (standard library only).

``GET /`` the page, ``GET /api/info`` the model, ``POST /api/explain`` one text,
``POST /api/export`` the self-contained HTML of the given results, ``POST /api/save`` their
MambaLRP results as a results file (:mod:`captum_mambalrp.results`). It binds to
127.0.0.1 by default and, when bound to a loopback address, answers only requests whose
``Host`` is a loopback name (``localhost``, ``127.0.0.1``, ``[::1]``: no DNS rebinding).
One explanation runs at a time.

Hard to break: every refused request gets a 4xx with a JSON ``{"error": ...}`` (malformed
JSON, bodies over the limit, a bad ``Content-Length``, other methods, unknown paths,
foreign hosts); a client that sends its request slowly is cut off after
``request_timeout`` seconds (each connection has its own thread, so it never holds up
others); at most ``max_connections`` connections are served at once (503 beyond); a
client that disconnects mid-response is dropped silently (no traceback).
"""

from __future__ import annotations

import json
import socket
import sys
import threading
import traceback
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Dict, List, Optional, Tuple

from .explain import Explainer, InputError
from .page import content_security_policy, render_page
from .views import results_file, with_words

MAX_EXPLAIN_BODY = 64 * 1024
MAX_EXPORT_BODY = 32 * 1024 * 1024
MAX_EXPORT_RESULTS = 200
MAX_DRAIN = 4 * 1024 * 1024  # an oversized body up to this size is read and dropped, so the client sees the 413
LOOPBACK = ("127.0.0.1", "localhost", "::1")
REQUEST_TIMEOUT = 15.0  # seconds a client may take to send its request (headers and body)
MAX_CONNECTIONS = 64
CLIENT_GONE = (BrokenPipeError, ConnectionResetError, ConnectionAbortedError, TimeoutError)


def json_bytes(data: Any) -> bytes:
    """JSON in which ``<``, ``>`` and ``&`` are escapes: a response never carries markup."""
    text = json.dumps(data, ensure_ascii=False)
    return text.replace("&", "\\u0026").replace("<", "\\u003c").replace(">", "\\u003e").encode("utf-8")


@dataclass
class DashboardApp:
    """What the server shows: the explainer, examples to pick from, an optional study."""

    explainer: Explainer
    examples: List[str] = field(default_factory=list)
    study: Optional[Dict[str, Any]] = None
    verbose: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)
    results: List[Dict[str, Any]] = field(default_factory=list)  # views shown on opening (saved results)

    def page(self, mode: str = "server", results: Optional[List[Dict[str, Any]]] = None) -> str:
        shown = results if results is not None else self.results
        return render_page(self.explainer.info(), shown, mode=mode, examples=self.examples, study=self.study)

    def explain(self, request: Dict[str, Any]) -> Dict[str, Any]:
        methods = request.get("methods", [])
        if not isinstance(methods, list) or not all(isinstance(m, str) for m in methods):
            raise InputError("methods must be a list of method keys.")
        target = request.get("target") or None
        if target is not None and not isinstance(target, (str, int)):
            raise InputError("target must be a class name or index.")
        with self.lock:
            return with_words(self.explainer.explain(request.get("text"), target, methods))  # type: ignore[arg-type]

    def export(self, request: Dict[str, Any]) -> str:
        results = request.get("results")
        if not isinstance(results, list) or not results or not all(isinstance(r, dict) for r in results):
            raise InputError("Nothing to export yet: explain a text first.")
        if len(results) > MAX_EXPORT_RESULTS:
            raise InputError(f"Too many results to export ({len(results)}; the limit is {MAX_EXPORT_RESULTS}).", 413)
        return self.page("static", results)

    def save(self, request: Dict[str, Any]) -> Dict[str, Any]:
        """The results file of the given views (their MambaLRP relevance and provenance)."""
        results = request.get("results")
        if not isinstance(results, list) or not results or not all(isinstance(r, dict) for r in results):
            raise InputError("Nothing to save yet: explain a text first.")
        if len(results) > MAX_EXPORT_RESULTS:
            raise InputError(f"Too many results to save ({len(results)}; the limit is {MAX_EXPORT_RESULTS}).", 413)
        try:
            with self.lock:  # the rule table may install the rules for a dry run
                return results_file(results, self.explainer)
        except ValueError as err:
            raise InputError(f"Cannot save these results: {err}") from None


class Handler(BaseHTTPRequestHandler):
    """Routes requests to a :class:`DashboardApp` (set as the class attribute ``app``)."""

    app: DashboardApp
    server_version = "captum-mambalrp-dashboard"
    sys_version = ""
    timeout = REQUEST_TIMEOUT  # each socket read or write (StreamRequestHandler sets it on the socket)
    request_timeout = REQUEST_TIMEOUT  # the whole request (headers and body)

    def setup(self) -> None:
        super().setup()
        # a client trickling its request byte by byte would pass every read's timeout:
        # stop reading when the whole request has not arrived in time (and answer 408)
        self._cut = False
        self._watchdog = threading.Timer(self.request_timeout, self._cut_off)
        self._watchdog.daemon = True
        self._watchdog.start()

    def _cut_off(self) -> None:
        self._cut = True
        try:
            self.connection.shutdown(socket.SHUT_RD)
        except OSError:
            pass

    def _request_read(self) -> None:
        self._watchdog.cancel()

    def finish(self) -> None:
        self._watchdog.cancel()
        try:
            super().finish()
        except CLIENT_GONE:
            pass

    def log_message(self, format: str, *args: Any) -> None:
        if self.app.verbose:
            sys.stderr.write("dashboard: " + format % args + "\n")

    def _host_ok(self) -> bool:
        bound = str(self.server.server_address[0])  # type: ignore[index]
        if bound not in LOOPBACK:
            return True
        host = (self.headers.get("Host") or "").strip().lower()
        name = host.rsplit(":", 1)[0] if not host.startswith("[") else host[1:].split("]", 1)[0]
        return name in LOOPBACK

    def _send(self, status: int, body: bytes, content_type: str, extra: Tuple[Tuple[str, str], ...] = ()) -> None:
        try:
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
        except CLIENT_GONE:  # the client went away mid-response: nothing to tell it
            self.close_connection = True

    def _json(self, status: int, data: Any) -> None:
        self._send(status, json_bytes(data), "application/json; charset=utf-8")

    def _error(self, status: int, message: str) -> None:
        if status >= 400:
            self.close_connection = True
        self._json(status, {"error": message})

    def parse_request(self) -> bool:
        """http.server's parsing, refusing HTTP/0.9 (a request line without a version: its
        answers would have no status line)."""
        if not super().parse_request():
            return False
        if self.request_version == "HTTP/0.9":
            self.send_error(HTTPStatus.BAD_REQUEST, "Give the HTTP version in the request line (HTTP/1.0 or HTTP/1.1).")
            return False
        return True

    def send_error(self, code: int, message: Optional[str] = None, explain: Optional[str] = None) -> None:
        """http.server's own refusals (a malformed request line, headers too long) as JSON."""
        self.close_connection = True
        if getattr(self, "request_version", "HTTP/0.9") == "HTTP/0.9":
            self.request_version = "HTTP/1.0"  # answer with a status line and headers, whatever came in
        if code == HTTPStatus.NOT_IMPLEMENTED:  # an unknown method: the client's mistake, not a missing feature
            code, message = HTTPStatus.METHOD_NOT_ALLOWED, "use GET or POST"
        if code == HTTPStatus.HTTP_VERSION_NOT_SUPPORTED:  # likewise: a 4xx
            code, message = HTTPStatus.BAD_REQUEST, f"HTTP version not supported: {message}; use HTTP/1.0 or HTTP/1.1"
        if getattr(self, "_cut", False):  # the request was cut off half-way: that is the problem
            code, message = HTTPStatus.REQUEST_TIMEOUT, "The request did not arrive in time."
        try:
            self._error(code, message or HTTPStatus(code).phrase)
        except ValueError:  # an unknown status code
            self._error(HTTPStatus.BAD_REQUEST, message or "bad request")

    def _body(self, limit: int) -> Dict[str, Any]:
        raw = (self.headers.get("Content-Length") or "0").strip()
        if not (raw.isascii() and raw.isdigit()):
            raise InputError("Content-Length must be a non-negative integer.", 411 if not raw else 400)
        length = int(raw)
        if length > limit:
            if length <= MAX_DRAIN:  # read it, so that the client is not cut off while sending and sees the 413
                self._read(length)
            raise InputError(f"Request too large: {length} bytes; the limit is {limit} bytes.", 413)
        body = self._read(length)
        if len(body) < length:
            raise InputError("The request body ended early.", 400)
        try:
            data = json.loads(body or b"{}")
        except (ValueError, UnicodeDecodeError):
            raise InputError("The request is not valid JSON.") from None
        if not isinstance(data, dict):
            raise InputError("The request must be a JSON object.")
        return data

    def _read(self, length: int) -> bytes:
        try:
            body = self.rfile.read(length)
        except OSError:  # a read timed out, or the watchdog cut the request off
            body = b""
            self._cut = True
        finally:
            self._request_read()
        if self._cut:
            raise InputError("The request body did not arrive in time.", 408)
        return body

    def _late(self) -> bool:
        """The request was cut off while its headers came in: answer 408, do nothing else."""
        if self._cut:
            self._error(HTTPStatus.REQUEST_TIMEOUT, "The request did not arrive in time.")
        return self._cut

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self._request_read()
        if self._late():
            return
        if not self._host_ok():
            return self._error(HTTPStatus.FORBIDDEN, "unexpected Host header")
        path = self.path.split("?", 1)[0]
        if path in ("/", "/index.html"):
            page = self.app.page().encode("utf-8")
            csp = (("Content-Security-Policy", content_security_policy("server")),)
            return self._send(HTTPStatus.OK, page, "text/html; charset=utf-8", csp)
        if path == "/api/info":
            return self._json(HTTPStatus.OK, self.app.explainer.info())
        if path in ("/api/explain", "/api/export", "/api/save"):
            return self._error(HTTPStatus.METHOD_NOT_ALLOWED, f"{path} takes POST")
        self._error(HTTPStatus.NOT_FOUND, "not found")

    def do_POST(self) -> None:  # noqa: N802
        if self._late():
            return self._request_read()
        if not self._host_ok():
            self._request_read()
            return self._error(HTTPStatus.FORBIDDEN, "unexpected Host header")
        path = self.path.split("?", 1)[0]
        try:
            if path not in ("/api/explain", "/api/export", "/api/save"):
                self._request_read()
                return self._error(HTTPStatus.NOT_FOUND, "not found")
            if "json" not in (self.headers.get("Content-Type") or ""):
                self._request_read()
                return self._error(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, "send JSON (Content-Type: application/json)")
            if path == "/api/explain":
                return self._json(HTTPStatus.OK, self.app.explain(self._body(MAX_EXPLAIN_BODY)))
            if path == "/api/save":
                saved = json_bytes(self.app.save(self._body(MAX_EXPORT_BODY)))
                disposition = (("Content-Disposition", 'attachment; filename="mambalrp_results.json"'),)
                return self._send(HTTPStatus.OK, saved, "application/json; charset=utf-8", disposition)
            page = self.app.export(self._body(MAX_EXPORT_BODY)).encode("utf-8")
            disposition = (("Content-Disposition", 'attachment; filename="mambalrp_dashboard.html"'),)
            return self._send(HTTPStatus.OK, page, "text/html; charset=utf-8", disposition)
        except InputError as err:
            return self._error(err.status, str(err))
        except Exception as err:  # a method failing on this model: say so, keep serving
            sys.stderr.write(f"dashboard: {path} failed: {type(err).__name__}: {err}\n")
            if self.app.verbose:
                traceback.print_exc()
            return self._error(HTTPStatus.INTERNAL_SERVER_ERROR, f"{type(err).__name__}: {err}"[:500])

    def _not_allowed(self) -> None:
        self._request_read()
        if self._late():
            return
        self._error(HTTPStatus.METHOD_NOT_ALLOWED, f"{self.command} is not supported; use GET or POST")

    do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_HEAD = do_TRACE = do_CONNECT = _not_allowed  # noqa: N815


class DashboardServer(ThreadingHTTPServer):
    """A threading HTTP server that serves at most ``max_connections`` connections at once
    (503 beyond) and drops clients that went away without a traceback."""

    daemon_threads = True
    request_queue_size = 128  # connections waiting to be accepted (a burst of clients is not turned away)

    def __init__(self, address: Tuple[str, int], handler: type, max_connections: int = MAX_CONNECTIONS) -> None:
        if ":" in address[0]:  # an IPv6 address (``::1``)
            self.address_family = socket.AF_INET6
        super().__init__(address, handler)
        self.slots = threading.BoundedSemaphore(max_connections)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self.slots.acquire(blocking=False):
            body = json_bytes({"error": "The dashboard is busy; try again."})
            try:
                request.settimeout(1.0)
                request.sendall(
                    b"HTTP/1.0 503 Service Unavailable\r\nContent-Type: application/json; charset=utf-8\r\n"
                    + f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode("ascii")
                    + body
                )
            except OSError:
                pass
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except Exception:
            self.slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        if isinstance(sys.exc_info()[1], (*CLIENT_GONE, OSError)):
            return  # the client disconnected or was too slow: not the server's problem
        super().handle_error(request, client_address)


def make_server(
    app: DashboardApp,
    host: str = "127.0.0.1",
    port: int = 8000,
    request_timeout: float = REQUEST_TIMEOUT,
    max_connections: int = MAX_CONNECTIONS,
) -> DashboardServer:
    """A server for ``app`` (``port=0`` picks a free port); call ``serve_forever()``.

    ``request_timeout``: seconds a client may take to send a request; ``max_connections``:
    connections served at once.

    Returns:
        the bound server.

    Raises:
        OSError: the address cannot be bound (a port in use).
    """
    handler = type("DashboardHandler", (Handler,), {"app": app, "timeout": request_timeout, "request_timeout": request_timeout})
    return DashboardServer((host, port), handler, max_connections)


def start_in_thread(app: DashboardApp, host: str = "127.0.0.1", port: int = 0, **options: Any) -> Tuple[DashboardServer, str]:
    """Serve in a daemon thread; the server (``shutdown()`` it) and its URL."""
    server = make_server(app, host, port, **options)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    name = f"[{host}]" if ":" in host else host
    return server, f"http://{name}:{server.server_address[1]}/"
