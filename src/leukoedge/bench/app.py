"""``leukoedge bench app``: HTTP latency and throughput of a running app under load.

``C`` client threads share a fixed budget of ``POST /api/classify`` requests
(each with its own keep-alive ``http.client`` connection, multipart body
encoded by hand so nothing beyond the standard library is needed on the Pi).
Every response is counted by status; only 2xx responses with a JSON body
count as successes and enter the latency percentiles.

Loopback only: this is a load generator, and pointing it at somebody else's
server would be an attack, so any host other than 127.0.0.0/8, ``localhost``
or ``::1`` is refused with a UsageError before a single packet is sent.
The request count and the total wall time are both bounded.

What can fail: a non-loopback or malformed URL, bad counts (UsageError); a
server that cannot be reached at all (UsageError naming the URL, raised before
the measured phase so no report of pure errors is produced).
"""
from __future__ import annotations

import http.client
import ipaddress
import json
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from urllib.parse import urlsplit

from tqdm import tqdm

from .. import RESEARCH_NOTICE
from ..errors import UsageError
from .machine import machine_info
from .stats import summarise

API_PATH = "/api/classify"
MAX_REQUESTS = 10_000
MAX_CLIENTS = 64


def check_loopback(url: str) -> tuple[str, str, int, str]:
    """Validate ``url``: ``(scheme, host, port, path of /api/classify)``.

    A bare base URL (``http://127.0.0.1:8000``) gets ``/api/classify`` appended.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise UsageError(f"{url!r}: give an http:// URL of the running app, e.g. http://127.0.0.1:8000")
    host = parts.hostname
    if not host:
        raise UsageError(f"{url!r}: no host in the URL")
    if not _is_loopback(host):
        raise UsageError(
            f"refusing to load-test {host!r}: bench app only targets this machine's loopback "
            "(127.0.0.0/8, localhost, ::1)",
            hint="run the benchmark on the device itself against http://127.0.0.1:PORT",
        )
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise UsageError(f"{url!r}: the port is not a number between 0 and 65535") from None
    path = parts.path.rstrip("/")
    if not path.endswith(API_PATH):
        path = path + API_PATH
    return parts.scheme, host, port, path


def _is_loopback(host: str) -> bool:
    if host.lower() in ("localhost", "localhost.", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # other names are not resolved: DNS could point anywhere


def multipart_body(image: bytes, filename: str = "bench.jpg", field: str = "image") -> tuple[bytes, str]:
    """A ``multipart/form-data`` body with one file field; returns (body, content type)."""
    boundary = f"leukoedge-bench-{uuid.uuid4().hex}"
    ctype = "image/png" if image[:8] == b"\x89PNG\r\n\x1a\n" else "image/jpeg"
    head = (
        f"--{boundary}\r\n"
        f'Content-Disposition: form-data; name="{field}"; filename="{filename}"\r\n'
        f"Content-Type: {ctype}\r\n\r\n"
    ).encode("ascii")
    return head + image + f"\r\n--{boundary}--\r\n".encode("ascii"), f"multipart/form-data; boundary={boundary}"


@dataclass(frozen=True)
class AppBenchConfig:
    """How to load the app.

    Attributes:
        url: the app's base URL or its ``/api/classify`` URL (loopback only).
        clients: concurrent client counts, measured one after the other.
        requests: measured requests per client count (shared by the clients).
        warmup: unmeasured requests first, so the first model call is not counted.
        timeout_s: per-request socket timeout.
        time_limit_s: wall-time cap for the whole benchmark; clients stop when it passes.
        token: the app's access token, sent as ``Authorization: Bearer <token>``.
    """

    url: str
    clients: tuple[int, ...] = (1, 4)
    requests: int = 40
    warmup: int = 2
    timeout_s: float = 30.0
    time_limit_s: float = 300.0
    token: str | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        check_loopback(self.url)
        if not self.clients or any(not 1 <= c <= MAX_CLIENTS for c in self.clients):
            raise UsageError(f"--clients values must be between 1 and {MAX_CLIENTS}, got {list(self.clients)}")
        if not 1 <= self.requests <= MAX_REQUESTS:
            raise UsageError(f"--requests must be between 1 and {MAX_REQUESTS}, got {self.requests}")
        if not 0 <= self.warmup <= 100:
            raise UsageError(f"--warmup must be between 0 and 100, got {self.warmup}")
        if not 0 < self.timeout_s <= 600 or not 0 < self.time_limit_s <= 24 * 3600:
            raise UsageError("timeouts must be positive (request <= 600 s, total <= 24 h)")


class _Client:
    """One keep-alive connection; reconnects after any transport error."""

    def __init__(self, config: AppBenchConfig, body: bytes, ctype: str) -> None:
        self.scheme, self.host, self.port, self.path = check_loopback(config.url)
        self.timeout = config.timeout_s
        self.body = body
        self.headers = {"Content-Type": ctype, "Content-Length": str(len(body)), "Accept": "application/json"}
        if config.token:
            self.headers["Authorization"] = f"Bearer {config.token}"
        self.conn: http.client.HTTPConnection | None = None

    def _connect(self) -> http.client.HTTPConnection:
        cls = http.client.HTTPSConnection if self.scheme == "https" else http.client.HTTPConnection
        return cls(self.host, self.port, timeout=self.timeout)

    def post(self) -> tuple[str, float, dict | None]:
        """One request: (status key, milliseconds, server JSON or None)."""
        if self.conn is None:
            self.conn = self._connect()
        start = time.perf_counter()
        try:
            self.conn.request("POST", self.path, body=self.body, headers=self.headers)
            resp = self.conn.getresponse()
            data = resp.read()
            status = str(resp.status)
            if resp.getheader("Connection", "").lower() == "close":
                self.close()
        except (OSError, http.client.HTTPException) as err:
            self.close()
            return f"error:{type(err).__name__}", (time.perf_counter() - start) * 1000.0, None
        elapsed = (time.perf_counter() - start) * 1000.0
        payload = None
        if status.startswith("2"):
            try:
                payload = json.loads(data)
            except ValueError:
                status = f"{status}:not-json"
        return status, elapsed, payload

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


def _probe(config: AppBenchConfig, body: bytes, ctype: str) -> None:
    client = _Client(config, body, ctype)
    status, _, _ = client.post()
    client.close()
    if status.startswith("error:"):
        raise UsageError(f"cannot reach the app at {config.url} ({status[6:]})",
                         hint="start it first: leukoedge serve --bundle BUNDLE --port PORT")


def _run_level(config: AppBenchConfig, clients: int, body: bytes, ctype: str, deadline: float, bar) -> dict:
    remaining = [config.requests]
    lock = threading.Lock()
    latencies: list[float] = []
    server_ms: list[float] = []
    statuses: Counter = Counter()

    def take() -> bool:
        with lock:
            if remaining[0] <= 0 or time.monotonic() >= deadline:
                return False
            remaining[0] -= 1
            return True

    def worker() -> None:
        client = _Client(config, body, ctype)
        try:
            while take():
                status, ms, payload = client.post()
                with lock:
                    statuses[status] += 1
                    if payload is not None:
                        latencies.append(ms)
                        if isinstance(payload, dict) and isinstance(payload.get("latency_ms"), (int, float)):
                            server_ms.append(float(payload["latency_ms"]))
                bar.update(1)
        finally:
            client.close()

    # Warm the server once per level so its first model call is not measured.
    warm = _Client(config, body, ctype)
    for _ in range(config.warmup):
        warm.post()
    warm.close()
    threads = [threading.Thread(target=worker, name=f"bench-client-{i}", daemon=True) for i in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()) + config.timeout_s)
    wall = time.perf_counter() - start
    with lock:  # a client stuck past its timeout must not change the numbers under us
        statuses, latencies, server_ms = Counter(statuses), list(latencies), list(server_ms)
    sent = sum(statuses.values())
    ok = len(latencies)
    level = {
        "clients": clients,
        "requests": sent,
        "ok": ok,
        "errors": sent - ok,
        "status_counts": dict(sorted(statuses.items())),
        "wall_s": round(wall, 3),
        "throughput_rps": round(ok / wall, 3) if wall > 0 else None,
        "timed_out": remaining[0] > 0,
    }
    if latencies:
        level.update({k: v for k, v in summarise(latencies).items() if k != "n"})
    if server_ms:
        level["server_latency_p50_ms"] = summarise(server_ms)["p50_ms"]
    return level


def run_app_bench(config: AppBenchConfig, image: bytes, image_description: str) -> dict:
    """Run every client level in turn against the app; returns the JSON report."""
    body, ctype = multipart_body(image)
    _probe(config, body, ctype)
    deadline = time.monotonic() + config.time_limit_s
    levels = []
    total = config.requests * len(config.clients)
    with tqdm(total=total, desc="bench app", unit="req", disable=not config.progress, leave=False) as bar:
        for clients in config.clients:
            if time.monotonic() >= deadline:
                break
            levels.append(_run_level(config, clients, body, ctype, deadline, bar))
    return {
        "kind": "app",
        "notice": RESEARCH_NOTICE,
        "machine": machine_info(),
        "url": config.url,
        "endpoint": check_loopback(config.url)[3],
        "config": {"clients": list(config.clients), "requests": config.requests, "warmup": config.warmup,
                   "timeout_s": config.timeout_s, "time_limit_s": config.time_limit_s},
        "image": image_description,
        "levels": levels,
    }
