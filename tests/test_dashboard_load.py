"""The dashboard under load and abuse, on 127.0.0.1 only, with a tiny model: 500 requests from
16 concurrent clients without an error and with stable memory; malformed, oversized, slow,
scripted, path-traversing and foreign-Host requests each get a clean 4xx and the server
stays up; a client leaving mid-response leaves no traceback."""

from __future__ import annotations

import http.client
import json
import socket
import time

import pytest

from captum_mambalrp.dashboard import DashboardApp, Explainer, Limits, start_in_thread
from captum_mambalrp.dashboard.demo import DEMO_TEXTS, make_demo_checkpoint
from captum_mambalrp.dashboard.loadtest import request, rss_mib, run_load
from captum_mambalrp.models import load_model_and_tokenizer

TIMEOUT = 1.5  # the server's request timeout in these tests
JSON_HEAD = "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n"
SCRIPT = "<script>alert(1)</script>"


@pytest.fixture(scope="module")
def explainer(tmp_path_factory):
    model, tokenizer = load_model_and_tokenizer(make_demo_checkpoint(str(tmp_path_factory.mktemp("demo"))))
    model.config.id2label = {i: f"<script>alert({i})</script>" if i == 1 else name for i, name in model.config.id2label.items()}
    return Explainer(model, tokenizer, source="<b>demo</b>", limits=Limits(max_chars=2000, max_tokens=64), ig_steps=4)


@pytest.fixture(scope="module")
def server(explainer):
    server, url = start_in_thread(DashboardApp(explainer, examples=[SCRIPT]), request_timeout=TIMEOUT)
    yield server, url
    server.shutdown()
    server.server_close()


def raw(url: str, data: bytes, wait: float = 10.0) -> bytes:
    """Send ``data`` as it is on a fresh socket; everything the server answers."""
    port = int(url.rsplit(":", 1)[1].strip("/"))
    with socket.create_connection(("127.0.0.1", port), timeout=wait) as s:
        s.sendall(data)
        chunks = []
        while True:
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            chunks.append(chunk)
    return b"".join(chunks)


def status_of(response: bytes) -> int:
    return int(response.split(b" ", 2)[1]) if response.startswith(b"HTTP/") else -1


def alive(url: str) -> bool:
    status, body = request(url, "GET", "/api/info", timeout=10)
    return status == 200 and b"labels" in body


def test_500_requests_from_16_clients(explainer, capsys):
    server, url = start_in_thread(DashboardApp(explainer))  # the default request timeout (15 s)
    try:
        _load(url, capsys)
    finally:
        server.shutdown()
        server.server_close()


def _load(url: str, capsys) -> None:
    run_load(url, DEMO_TEXTS, requests=48, clients=16)  # warm-up: threads, allocator, caches
    before = rss_mib()
    report = run_load(url, DEMO_TEXTS, requests=500, clients=16)
    after = rss_mib()
    before, after = (round(x) if x is not None else None for x in (before, after))
    with capsys.disabled():  # the figures, always shown
        print(f"\ndashboard load: {report.summary()}; RSS {before} -> {after} MiB")
    assert report.failures == [] and report.statuses == {200: 500}
    assert len(report.latencies) == 500 and report.percentile(0.95) < 30
    if before is not None and after is not None:
        assert after - before < 200, f"memory grew by {after - before:.0f} MiB over 500 requests"
    assert alive(url)


def test_malformed_and_oversized_requests(server):
    _, url = server
    host = url.split("//")[1].strip("/")

    def request_bytes(body: bytes, headers: str = "Content-Type: application/json\r\n", length=None) -> bytes:
        length = len(body) if length is None else length
        return f"POST /api/explain HTTP/1.1\r\nHost: {host}\r\n{headers}Content-Length: {length}\r\n\r\n".encode() + body

    def post(body: bytes, headers: str = "Content-Type: application/json\r\n", length=None) -> bytes:
        return raw(url, request_bytes(body, headers, length))

    superscript_two = request_bytes(b"{}", length="X").replace(b"Length: X", b"Length: \xb2")  # a latin-1 digit
    cases = {
        "not JSON": (post(b"{not json"), 400, "not valid JSON"),
        "a JSON list": (post(b"[1, 2]"), 400, "must be a JSON object"),
        "bytes that are not UTF-8": (post(b'{"text": "\xff\xfe"}'), 400, "not valid JSON"),
        "a text that is a number": (post(b'{"text": 5}'), 400, "Type a text"),
        "methods not a list": (post(b'{"text": "i feel", "methods": "saliency"}'), 400, "methods must be a list"),
        "a target that is an object": (post(b'{"text": "i feel", "target": {"a": 1}}'), 400, "target must be"),
        "no Content-Type": (post(b"{}", headers=""), 415, "send JSON"),
        "Content-Length not a number": (post(b"{}", length="abc"), 400, "Content-Length"),
        "negative Content-Length": (post(b"{}", length="-5"), 400, "Content-Length"),
        "a Content-Length in other digits": (raw(url, superscript_two), 400, "Content-Length"),
        "a body shorter than its Content-Length": (post(b"{}", length=3), 408, "did not arrive in time"),
        "a body over 64 KiB": (post(b"x" * (100 * 1024)), 413, "Request too large"),
        "a huge Content-Length": (post(b"", length=10**10), 413, "Request too large"),
        "a text over 2000 characters": (post(json.dumps({"text": "a " * 1001}).encode()), 413, "limit is 2000 characters"),
        "an unknown method key": (post(b'{"text": "i feel", "methods": ["../../etc"]}'), 400, "Unknown method"),
        "PUT": (raw(url, f"PUT /api/explain HTTP/1.1\r\nHost: {host}\r\nContent-Length: 0\r\n\r\n".encode()), 405, "PUT"),
        "GET on a POST route": (raw(url, f"GET /api/explain HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()), 405, "takes POST"),
        "a garbage request line": (raw(url, b"GARBAGE\r\n\r\n"), 400, "Bad request syntax"),
        "a bad HTTP version": (raw(url, b"GET / HTTP/9.9\r\n\r\n"), 400, "HTTP version not supported"),
    }
    for name, (response, status, words) in cases.items():
        expected_status = status
        assert status_of(response) == expected_status, f"{name}: {response[:300]!r}"
        head, _, body = response.partition(b"\r\n\r\n")
        assert b"application/json" in head, name
        assert words in json.loads(body)["error"], f"{name}: {body!r}"
    assert alive(url)


def test_script_payloads_are_escaped(server):
    _, url = server
    status, body = request(url, "POST", "/api/explain", {"text": f"{SCRIPT} i feel so happy", "target": SCRIPT})
    assert status == 200  # the markup is the (legitimate) name of class 1
    assert b"<" not in body and b">" not in body  # JSON answers carry no markup at all
    view = json.loads(body)
    assert view["target"]["label"] == SCRIPT and view["text"].startswith(SCRIPT)
    status, body = request(url, "POST", "/api/explain", {"text": "i feel", "target": "<img src=x onerror=alert(2)>"})
    assert status == 400 and b"<img" not in body and "Unknown target" in json.loads(body)["error"]
    status, page = request(url, "GET", "/")
    assert status == 200 and b"<script>alert" not in page and b"<b>demo" not in page  # labels, examples, model name
    status, exported = request(url, "POST", "/api/export", {"results": [view]})
    assert status == 200 and b"<script>alert" not in exported and b"\\u003cscript\\u003ealert(1)" in exported
    assert alive(url)


@pytest.mark.parametrize(
    "path",
    [
        "/static/../../etc/passwd",
        "/static/%2e%2e/%2e%2e/etc/passwd",
        "/static/%2E%2E%2F%2E%2E%2Fetc%2Fpasswd",
        "/..%2f..%2f..%2fetc%2fpasswd",
        "/static/..%5c..%5cetc%5cpasswd",
        "/static/%252e%252e/etc/passwd",
        "//etc/passwd",
        "/../../../../etc/passwd",
        "/static/....//....//etc/passwd",
        "http://127.0.0.1/etc/passwd",
    ],
)
def test_path_traversal_finds_nothing(server, path):
    _, url = server
    host = url.split("//")[1].strip("/")
    response = raw(url, f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    assert status_of(response) == 404 and b"root:" not in response
    assert json.loads(response.partition(b"\r\n\r\n")[2]) == {"error": "not found"}


def test_only_loopback_hosts(server):
    srv, url = server
    port = srv.server_address[1]
    for host in ("evil.example", f"evil.example:{port}", f"127.0.0.1.evil.example:{port}", "localhost.evil", "0.0.0.0", ""):
        response = raw(url, f"GET /api/info HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        assert status_of(response) == 403, host
        assert json.loads(response.partition(b"\r\n\r\n")[2]) == {"error": "unexpected Host header"}
    response = raw(url, b"GET /api/info HTTP/1.0\r\n\r\n")  # no Host at all
    assert status_of(response) == 403
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}", "LOCALHOST"):
        response = raw(url, f"GET /api/info HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        assert status_of(response) == 200, host
    body = b'{"text": "i feel"}'
    post = "POST /api/explain HTTP/1.1\r\nHost: evil.example\r\n" + JSON_HEAD.format(len(body))
    assert status_of(raw(url, post.encode() + body)) == 403


def test_slow_clients_do_not_block_others(server):
    srv, url = server
    port = srv.server_address[1]
    slow = []
    try:
        # one that never finishes its headers, one that never finishes its body, one that trickles
        a = socket.create_connection(("127.0.0.1", port), timeout=10)
        a.sendall(b"POST /api/explain HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        b = socket.create_connection(("127.0.0.1", port), timeout=10)
        b.sendall(
            b"POST /api/explain HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{"
        )
        c = socket.create_connection(("127.0.0.1", port), timeout=10)
        slow = [a, b, c]
        start = time.perf_counter()
        for i in range(3):  # others are served meanwhile, at once
            c.sendall(b"GET /api/info HTTP/1.1\r\n"[i : i + 1])
            status, body = request(url, "POST", "/api/explain", {"text": "i feel so happy"}, timeout=10)
            assert status == 200
        assert time.perf_counter() - start < TIMEOUT + 5
        time.sleep(0.2)
        deadline = time.perf_counter() + TIMEOUT + 5
        answers = []
        for s in slow:  # each slow client is cut off after the request timeout: read to the end
            chunks = []
            while True:
                s.settimeout(max(0.1, deadline - time.perf_counter()))
                try:
                    chunk = s.recv(65536)
                except ConnectionResetError:
                    chunk = b""
                if not chunk:
                    break
                chunks.append(chunk)
            answers.append(b"".join(chunks))
        for answer in answers[0], answers[2]:  # headers never completed: closed, or a 408
            assert answer == b"" or status_of(answer) == 408, answer
        assert status_of(answers[1]) == 408 and b"did not arrive in time" in answers[1]
        assert time.perf_counter() - start < TIMEOUT + 6
    finally:
        for s in slow:
            s.close()
    assert alive(url)


def test_connection_cap(explainer):
    server, url = start_in_thread(DashboardApp(explainer), request_timeout=TIMEOUT, max_connections=3)
    idle = []
    try:
        idle = [socket.create_connection(server.server_address[:2], timeout=10) for _ in range(3)]
        time.sleep(0.2)
        status, body = request(url, "GET", "/api/info", timeout=10)
        assert status == 503 and "busy" in json.loads(body)["error"]
        time.sleep(TIMEOUT + 0.5)  # the idle connections time out and free their slots
        assert alive(url)
    finally:
        for s in idle:
            s.close()
        server.shutdown()
        server.server_close()


def test_client_leaving_mid_response_leaves_no_traceback(server, capfd):
    srv, url = server
    port = srv.server_address[1]
    capfd.readouterr()
    for path in ("/api/explain", "/"):
        for _ in range(5):
            s = socket.create_connection(("127.0.0.1", port), timeout=10)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")  # close = reset
            body = json.dumps({"text": "i feel so happy and loved today", "methods": ["integrated_gradients"]}).encode()
            if path == "/":
                s.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            else:
                head = f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n" + JSON_HEAD.format(len(body))
                s.sendall(head.encode() + body)
            s.close()  # before the answer
    time.sleep(1.0)
    assert alive(url)
    err = capfd.readouterr().err
    assert "Traceback" not in err and "BrokenPipe" not in err and "ConnectionReset" not in err, err


def test_http_client_sees_clean_errors(server):
    """The standard library's client: every refusal is a well-formed HTTP answer."""
    _, url = server
    port = int(url.rsplit(":", 1)[1].strip("/"))
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("DELETE", "/api/explain")
    res = conn.getresponse()
    assert res.status == 405 and json.loads(res.read())["error"].startswith("DELETE is not supported")
    conn.close()


def test_ipv6_loopback(explainer):
    try:
        server, url = start_in_thread(DashboardApp(explainer), host="::1")
    except OSError as err:  # a machine without IPv6
        pytest.skip(f"no IPv6 loopback here: {err}")
    try:
        assert url.startswith("http://[::1]:") and alive(url)
        with socket.create_connection(("::1", server.server_address[1]), timeout=10) as s:
            s.sendall(b"GET /api/info HTTP/1.1\r\nHost: evil.example\r\n\r\n")
            assert status_of(s.recv(65536)) == 403
    finally:
        server.shutdown()
        server.server_close()


def test_random_requests_leave_the_server_up(server, capfd):
    """64 seeded random requests (garbage request lines, headers and bodies): each gets a 4xx
    or a closed connection, never a 2xx or 5xx, and no traceback is printed."""
    import random
    from concurrent.futures import ThreadPoolExecutor

    _, url = server
    rng = random.Random(0)
    pieces = [b"GET", b"POST", b"/api/explain", b"/", b"HTTP/1.1", b"HTTP/1.0", b"Host: 127.0.0.1", b"Host: evil", b"\r\n"]
    pieces += [b"Content-Length: 5", b"Content-Length: -1", b"Content-Type: application/json", b"{", b'"text"', b"\x00\xff"]

    def fuzz(i: int) -> bytes:
        parts = [rng.choice(pieces) if rng.random() < 0.7 else bytes(rng.randrange(256) for _ in range(8)) for _ in range(10)]
        return b" ".join(parts) + b"\r\n\r\n"

    cases = [fuzz(i) for i in range(64)]
    capfd.readouterr()
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda data: raw(url, data), cases))
    for data, answer in zip(cases, answers):
        status = status_of(answer)
        assert answer == b"" or 400 <= status < 500, (data, answer[:200])
    assert alive(url)
    err = capfd.readouterr().err
    assert "Traceback" not in err, err
