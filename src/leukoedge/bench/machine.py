"""What machine a benchmark ran on, so every committed figure names its source.

Latency numbers are meaningless without the board, CPU, governor and software
they came from (pycoral's benchmarks record the same facts next to each
reference table). Everything here is read from ``/proc``, ``/sys`` and the
standard library; a fact that cannot be read is ``None``, never guessed.
Nothing here can fail: unreadable files simply give ``None``.
"""
from __future__ import annotations

import os
import platform
import resource
import sys
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

from .. import __version__


def _read_text(path: str | Path) -> str | None:
    try:
        return Path(path).read_text(encoding="utf-8", errors="replace").strip("\x00\n ")
    except OSError:
        return None


def cpu_model(cpuinfo: str | None = None) -> str | None:
    """The CPU's marketing name from ``/proc/cpuinfo`` (x86 ``model name``,
    ARM ``Model``/``Hardware`` lines), else :func:`platform.processor`."""
    text = cpuinfo if cpuinfo is not None else _read_text("/proc/cpuinfo")
    if text:
        fields: dict[str, str] = {}
        for line in text.splitlines():
            key, sep, value = line.partition(":")
            if sep and value.strip():
                fields.setdefault(key.strip().lower(), value.strip())
        for key in ("model name", "cpu model", "model", "hardware", "processor"):
            value = fields.get(key)
            # On ARM, "processor" is just the core index; skip bare numbers.
            if value and not value.isdigit():
                return value
    return platform.processor() or None


def device_model() -> str | None:
    """The board name from the device tree, e.g. ``Raspberry Pi 5 Model B Rev 1.0``."""
    return _read_text("/proc/device-tree/model")


def cpu_governor() -> str | None:
    """cpufreq scaling governor of CPU 0 (``performance``, ``ondemand``...), when exposed."""
    return _read_text("/sys/devices/system/cpu/cpu0/cpufreq/scaling_governor")


def cpu_max_mhz() -> float | None:
    """Maximum frequency of CPU 0 in MHz, when cpufreq exposes it."""
    text = _read_text("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq")
    try:
        return int(text) / 1000.0 if text else None
    except ValueError:
        return None


def os_name() -> str:
    """``PRETTY_NAME`` from ``/etc/os-release`` (e.g. Debian 12), else ``platform.platform()``."""
    text = _read_text("/etc/os-release") or ""
    for line in text.splitlines():
        if line.startswith("PRETTY_NAME="):
            return line.split("=", 1)[1].strip().strip('"')
    return platform.platform()


def package_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def peak_rss_bytes() -> int | None:
    """This process's peak resident set size (``VmHWM``, else ``ru_maxrss``)."""
    text = _read_text("/proc/self/status") or ""
    for line in text.splitlines():
        if line.startswith("VmHWM:"):
            parts = line.split()
            if len(parts) >= 2 and parts[1].isdigit():
                return int(parts[1]) * 1024
    usage = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes.
    return int(usage) * (1 if sys.platform == "darwin" else 1024) if usage else None


def current_rss_bytes() -> int | None:
    """This process's resident set size now (``VmRSS``), or None off Linux."""
    text = _read_text("/proc/self/status") or ""
    for line in text.splitlines():
        if line.startswith("VmRSS:"):
            parts = line.split()
            if len(parts) >= 2 and parts[1].isdigit():
                return int(parts[1]) * 1024
    return None


def machine_info() -> dict:
    """All the facts above plus host, Python and package versions, as JSON-ready data."""
    cores = os.cpu_count()
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = cores
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = None
    return {
        "hostname": platform.node() or None,
        "device_model": device_model(),
        "cpu_model": cpu_model(),
        "machine": platform.machine(),
        "cores": cores,
        "usable_cores": usable,
        "cpu_governor": cpu_governor(),
        "cpu_max_mhz": cpu_max_mhz(),
        "os": os_name(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "leukoedge": __version__,
        "numpy": package_version("numpy"),
        "pillow": package_version("pillow"),
        "ai_edge_litert": package_version("ai-edge-litert"),
        "tflite_runtime": package_version("tflite-runtime"),
        "load_average": load,
        "date_utc": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def describe_machine(info: dict) -> str:
    """One line for Markdown headers: board or CPU, cores, governor, OS, Python."""
    board = info.get("device_model") or info.get("cpu_model") or info.get("machine") or "unknown machine"
    parts = [board]
    if info.get("device_model") and info.get("cpu_model"):
        parts.append(info["cpu_model"])
    parts.append(f"{info.get('usable_cores') or info.get('cores')} cores")
    if info.get("cpu_governor"):
        parts.append(f"governor {info['cpu_governor']}")
    parts.append(str(info.get("os")))
    parts.append(f"Python {info.get('python')}")
    return ", ".join(parts)
