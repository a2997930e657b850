"""Load on a running dashboard: many requests from concurrent clients, latency and errors.

Used by ``tests/test_dashboard_load.py`` and ``benchmarks/dashboard_load.py``; loopback
only (it refuses any other host), a fixed number of requests, so it always stops.
"""

from __future__ import annotations

import http.client
import json
import threading
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


def rss_mib() -> Optional[float]:
    """This process's resident memory in MiB (Linux ``/proc``), or None elsewhere."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


@dataclass
class LoadReport:
    """What a load run saw: statuses, per-request latency (seconds), failures."""

    requests: int = 0
    clients: int = 0
    seconds: float = 0.0
    statuses: Dict[int, int] = field(default_factory=dict)
    latencies: List[float] = field(default_factory=list)
    failures: List[str] = field(default_factory=list)

    def percentile(self, q: float) -> float:
        """The ``q`` quantile (0..1) of the latencies, nearest rank."""
        ordered = sorted(self.latencies)
        if not ordered:
            return float("nan")
        return ordered[min(len(ordered) - 1, max(0, int(round(q * len(ordered) + 0.5)) - 1))]

    def summary(self) -> str:
        return (
            f"{self.requests} requests from {self.clients} concurrent clients in {self.seconds:.1f} s "
            f"({self.requests / max(self.seconds, 1e-9):.1f} req/s): statuses {dict(sorted(self.statuses.items()))}, "
            f"p50 {1000 * self.percentile(0.5):.0f} ms, p95 {1000 * self.percentile(0.95):.0f} ms, "
            f"max {1000 * max(self.latencies or [0]):.0f} ms, failures {len(self.failures)}"
        )


def request(url: str, method: str = "GET", path: str = "/", body: Optional[dict] = None, timeout: float = 60.0):
    """One request on a fresh connection: ``(status, body bytes)``."""
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=timeout)
    try:
        data = None if body is None else json.dumps(body).encode("utf-8")
        headers = {"Content-Type": "application/json"} if data is not None else {}
        conn.request(method, path, body=data, headers=headers)
        res = conn.getresponse()
        return res.status, res.read()
    finally:
        conn.close()


def run_load(
    url: str,
    texts: Sequence[str],
    requests: int = 500,
    clients: int = 16,
    methods: Sequence[str] = (),
    timeout: float = 60.0,
) -> LoadReport:
    """Send ``requests`` requests from ``clients`` threads to the dashboard at ``url``: of
    every five, three explain a text (cycling through ``texts``, with ``methods`` beside
    MambaLRP), one fetches the page and one ``/api/info``. A 200 whose body is not what
    the route gives counts as a failure.

    Returns:
        a :class:`LoadReport`.

    Raises:
        ValueError: ``url`` is not on a loopback host.
    """
    host = urllib.parse.urlsplit(url).hostname
    if host not in LOOPBACK_HOSTS:
        raise ValueError(f"run_load only loads a dashboard on this machine (127.0.0.1, localhost, ::1); got {host!r}")
    report = LoadReport(requests=requests, clients=clients)
    lock = threading.Lock()

    def one(i: int) -> None:
        kind = i % 5
        start = time.perf_counter()
        try:
            if kind == 0:
                status, body = request(url, "GET", "/", timeout=timeout)
                ok = status == 200 and b"dashboard-data" in body
            elif kind == 1:
                status, body = request(url, "GET", "/api/info", timeout=timeout)
                ok = status == 200 and "labels" in json.loads(body)
            else:
                text = texts[i % len(texts)]
                status, body = request(url, "POST", "/api/explain", {"text": text, "methods": list(methods)}, timeout)
                ok = status == 200 and json.loads(body)["text"] == text
            problem = None if ok else f"request {i}: status {status}: {body[:200]!r}"
        except Exception as err:  # a refused or dropped connection: the server failed this request
            status, problem = -1, f"request {i}: {type(err).__name__}: {err}"
        elapsed = time.perf_counter() - start
        with lock:
            report.statuses[status] = report.statuses.get(status, 0) + 1
            report.latencies.append(elapsed)
            if problem:
                report.failures.append(problem)

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=clients) as pool:
        list(pool.map(one, range(requests)))
    report.seconds = time.perf_counter() - start
    return report


__all__ = ["LoadReport", "request", "rss_mib", "run_load"]
