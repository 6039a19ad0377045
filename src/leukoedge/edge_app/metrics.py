"""Prometheus text-format metrics without a dependency.

Three families are enough to watch a microscope station: HTTP requests by
endpoint and status, classification latency (histogram, from the runtime's own
measurement) and errors by type. Counters live in one object owned by the app
(no module globals) and are guarded by one lock.

Every label value comes from a fixed set, never from raw client text: the
method is one of :data:`KNOWN_METHODS` or ``"other"`` (the app answers any
other method 405 before it is counted), the endpoint is a registered view
name or ``"unmatched"``, the status a three-digit code. Before this rule, 300
requests with made-up 100 KB method names grew the process by 33 MB and
``/metrics`` to 40 MB (issue 13).
"""
from __future__ import annotations

import bisect
import threading
from collections import defaultdict

#: HTTP methods the app knows; anything else is answered 405 and counted as "other".
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
_MAX_LABEL = 100

#: Latency buckets in seconds: a Pi 4 classifies a small int8 model in 5-200 ms.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(pairs: tuple[tuple[str, str], ...]) -> str:
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in pairs) + "}" if pairs else ""


class Metrics:
    """Thread-safe counters and one latency histogram, rendered on demand."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._requests: dict[tuple, int] = defaultdict(int)
        self._errors: dict[tuple, int] = defaultdict(int)
        self._classifications: dict[tuple, int] = defaultdict(int)
        self._buckets = [0] * (len(LATENCY_BUCKETS) + 1)
        self._latency_sum = 0.0
        self._latency_count = 0

    def request(self, endpoint: str, method: str, status: int) -> None:
        method = method if method in KNOWN_METHODS else "other"
        status_label = str(status) if 100 <= int(status) <= 599 else "other"
        with self._lock:
            self._requests[(("endpoint", endpoint[:_MAX_LABEL]), ("method", method), ("status", status_label))] += 1

    def error(self, kind: str) -> None:
        with self._lock:
            self._errors[(("type", kind[:_MAX_LABEL]),)] += 1

    def classified(self, label: str, abstained: bool, source: str, latency_ms: float) -> None:
        seconds = latency_ms / 1000.0
        with self._lock:
            key = (("label", label), ("abstained", str(bool(abstained)).lower()), ("source", source))
            self._classifications[key] += 1
            self._buckets[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
            self._latency_sum += seconds
            self._latency_count += 1

    def render(self, gauges: dict[str, tuple[str, float]] | None = None) -> str:
        """The exposition text; ``gauges`` adds ``name -> (help, value)`` read at scrape time."""
        lines: list[str] = []
        with self._lock:
            self._family(lines, "leukoedge_http_requests_total", "HTTP requests by endpoint, method and status.",
                         "counter", self._requests)
            self._family(lines, "leukoedge_errors_total", "Errors turned into HTTP responses, by type.",
                         "counter", self._errors)
            self._family(lines, "leukoedge_classifications_total", "Images classified.",
                         "counter", self._classifications)
            name = "leukoedge_classify_latency_seconds"
            lines += [f"# HELP {name} Classification latency (preprocess + invoke + postprocess).",
                      f"# TYPE {name} histogram"]
            cumulative = 0
            for bound, count in zip((*LATENCY_BUCKETS, float("inf")), self._buckets):
                cumulative += count
                le = "+Inf" if bound == float("inf") else repr(bound)
                lines.append(f'{name}_bucket{{le="{le}"}} {cumulative}')
            lines += [f"{name}_sum {self._latency_sum:.6f}", f"{name}_count {self._latency_count}"]
        for gname, (ghelp, value) in (gauges or {}).items():
            lines += [f"# HELP {gname} {ghelp}", f"# TYPE {gname} gauge", f"{gname} {value:g}"]
        return "\n".join(lines) + "\n"

    @staticmethod
    def _family(lines: list[str], name: str, help_text: str, kind: str, values: dict) -> None:
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
        for key in sorted(values):
            lines.append(f"{name}{_labels(key)} {values[key]}")
