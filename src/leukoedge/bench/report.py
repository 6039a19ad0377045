"""Report writers: JSON for scripts, Markdown for people; both written atomically.

A benchmark that crashes half-way must not leave a truncated table in
``benchmarks/results/`` that looks finished, so every file is written with
:func:`leukoedge.files.atomic_write_text` (a temporary sibling renamed into place).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Sequence

from .. import RESEARCH_NOTICE
from ..files import atomic_write_text
from .machine import describe_machine

#: The name the scripts in ``benchmarks/`` write their result files with (``benchmarks/_common.py``):
#: kept as a contract for them; it IS :func:`leukoedge.files.atomic_write_text`.
write_atomic = atomic_write_text


def to_json(report: dict) -> str:
    return json.dumps(report, indent=2, sort_keys=False) + "\n"


def md_table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """A GitHub Markdown table; ``None`` cells show as an em dash."""
    def cell(v: object) -> str:
        if v is None:
            return "—"
        if isinstance(v, float):
            return f"{v:.2f}"
        return str(v).replace("|", "\\|")

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def fmt_bytes(n: int | None) -> str | None:
    if n is None:
        return None
    for unit, size in (("MB", 1 << 20), ("KB", 1 << 10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def machine_section(machine: dict) -> str:
    """The header every Markdown report starts with: where and when it was measured."""
    keys = ("device_model", "cpu_model", "cores", "usable_cores", "cpu_governor", "cpu_max_mhz",
            "os", "kernel", "python", "leukoedge", "numpy", "ai_edge_litert", "tflite_runtime",
            "load_average", "date_utc")
    rows = [(k, machine.get(k)) for k in keys if machine.get(k) is not None]
    return (f"Measured on: **{describe_machine(machine)}**\n\n"
            + md_table(("machine", "value"), rows))


def header(title: str, machine: dict, command: str | None = None) -> str:
    parts = [f"# {title}", "", f"_{RESEARCH_NOTICE}_", "", machine_section(machine)]
    if command:
        parts += ["", f"Command: `{command}`"]
    return "\n".join(parts) + "\n"


def latency_markdown(report: dict, command: str | None = None) -> str:
    """The latency report for people: machine header, then :func:`latency_body`."""
    return header("Latency", report["machine"], command) + "\n" + latency_body(report)


def latency_body(report: dict) -> str:
    """One row per bundle and thread count, stages split, ratios to the first bundle."""
    rows = []
    for r in report["results"]:
        st = r["stages"]
        name = r.get("model") or Path(r["bundle"]).name
        if r.get("valid") is False:
            name += " (invalid bundle)"
        delegate = "cpu/XNNPACK" if r.get("cpu_kernels") else r.get("delegate")
        rows.append((
            name, Path(r["bundle"]).name, r.get("quantize") or r.get("input_dtype"), r["threads"], delegate,
            fmt_bytes(r.get("model_bytes")),
            st["preprocess"]["p50_ms"], st["invoke"]["p50_ms"], st["postprocess"]["p50_ms"],
            r["p50_ms"], r["p90_ms"], r["p99_ms"], r.get("throughput_ips"),
            r.get("ratio_to_first"),
        ))
    cfg = report["config"]
    runtimes = sorted({f"{r.get('runtime')} {r.get('runtime_version')}" for r in report["results"]})
    lines = [
        f"Runs: {cfg['runs']} measured after {cfg['warmup']} warm-up, threads {cfg['threads']}; "
        f"images: {report['images']['description']}; "
        + ("bundles interleaved round-robin, ratios are to the first bundle at the same thread count."
           if report.get("interleaved") else "one bundle."),
        "",
        md_table(("model", "bundle", "quantize", "threads", "delegate", "size", "preprocess p50 ms", "invoke p50 ms",
                  "postprocess p50 ms", "end-to-end p50 ms", "p90 ms", "p99 ms", "images/s", "ratio"), rows),
        "",
        f"Peak RSS of the benchmark process: {fmt_bytes(report.get('peak_rss_bytes'))}. "
        f"Runtime: {', '.join(runtimes)}.",
    ]
    return "\n".join(lines) + "\n"


def app_markdown(report: dict, command: str | None = None) -> str:
    """The app load report for people: machine header, then :func:`app_body`."""
    return header("App under load", report["machine"], command) + "\n" + app_body(report)


def app_body(report: dict) -> str:
    """One row per client count: requests, errors by status, latency, throughput."""
    rows = []
    for lv in report["levels"]:
        rows.append((lv["clients"], lv["requests"], lv["ok"], lv["errors"],
                     ", ".join(f"{k}: {v}" for k, v in lv["status_counts"].items()),
                     lv.get("p50_ms"), lv.get("p90_ms"), lv.get("p99_ms"),
                     lv.get("server_latency_p50_ms"), lv.get("throughput_rps")))
    cfg = report["config"]
    lines = [
        f"`POST {report['endpoint']}` on {report['url']}, {cfg['requests']} measured requests per client "
        f"count after {cfg['warmup']} warm-up; image: {report['image']}.",
        "",
        md_table(("clients", "requests", "ok", "errors", "statuses", "p50 ms", "p90 ms", "p99 ms",
                  "server p50 ms", "requests/s"), rows),
    ]
    return "\n".join(lines) + "\n"
