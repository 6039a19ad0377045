"""``leukoedge bench latency``: per-image latency of one or more bundles on this machine.

Each measured call is one :meth:`Classifier.classify` on encoded image bytes,
the device code path, split into the runtime's own ``preprocess`` (decode +
resize), ``invoke`` and ``postprocess`` timings plus end-to-end wall time
measured here around the call.

Several bundles are measured *interleaved*: iteration ``i`` classifies one
image with every bundle in turn (the starting bundle rotates each iteration),
so a burst of background load hits all of them alike and the ratio of each
bundle to the first survives a noisy machine even when absolute numbers don't.
Thread counts are measured one after the other; each gets fresh interpreters.

What can fail: a bad config (UsageError), a damaged or invalid bundle
(BundleError from ``load_bundle``), no TFLite runtime (RuntimeUnavailableError).
Never imports TensorFlow.
"""
from __future__ import annotations

import gc
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

from tqdm import tqdm

from .. import RESEARCH_NOTICE
from ..errors import UsageError
from .images import BenchImages
from .machine import current_rss_bytes, machine_info, peak_rss_bytes
from .stats import summarise

STAGES = ("preprocess", "invoke", "postprocess")
MAX_RUNS = 100_000
MAX_THREADS = 64


@dataclass(frozen=True)
class LatencyConfig:
    """How to measure.

    Attributes:
        runs: measured classifications per bundle and thread count (after warm-up).
        warmup: unmeasured classifications first (allocations, caches, XNNPACK packing).
        threads: interpreter thread counts to measure, in order.
        edgetpu: passed to ``Classifier(edgetpu=...)``: ``"auto"`` uses a Coral when present.
        allow_invalid: also measure bundles whose parity gate failed (speed does not
            depend on accuracy; the report marks them).
        heatmap: draw the class activation map as the app does (when the bundle has one).
        progress: show a tqdm bar on stderr.
    """

    runs: int = 50
    warmup: int = 5
    threads: tuple[int, ...] = (1,)
    edgetpu: str = "auto"
    allow_invalid: bool = False
    heatmap: bool = True
    progress: bool = True

    def __post_init__(self) -> None:
        if not 1 <= self.runs <= MAX_RUNS:
            raise UsageError(f"--runs must be between 1 and {MAX_RUNS}, got {self.runs}")
        if not 0 <= self.warmup <= MAX_RUNS:
            raise UsageError(f"--warmup must be between 0 and {MAX_RUNS}, got {self.warmup}")
        if not self.threads:
            raise UsageError("--threads needs at least one thread count, e.g. 1,2,4")
        if any(not 1 <= t <= MAX_THREADS for t in self.threads):
            raise UsageError(f"--threads values must be between 1 and {MAX_THREADS}, got {list(self.threads)}")
        if len(set(self.threads)) != len(self.threads):
            raise UsageError(f"--threads has duplicates: {list(self.threads)}")


def parse_int_list(text: str, option: str) -> tuple[int, ...]:
    """``"1,2,4"`` -> ``(1, 2, 4)``; anything else is a UsageError naming the option."""
    try:
        values = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise UsageError(f"{option} takes comma-separated integers like 1,2,4, got {text!r}") from None
    if not values:
        raise UsageError(f"{option} takes comma-separated integers like 1,2,4, got {text!r}")
    return values


def _model_file(bundle: object, info: dict) -> Path | None:
    """The .tflite file the interpreter actually runs (the Edge TPU model when delegated)."""
    path = Path(bundle.path) / str(info.get("model_file") or "model.tflite")
    return path if path.is_file() else None


@dataclass
class _Subject:
    """One bundle under test at one thread count, with its collected samples."""

    index: int
    path: Path
    bundle: object
    classifier: object
    info: dict
    rss_delta: int | None
    samples: dict
    heatmap_drawn: bool | None = None

    def measure(self, image: bytes, record: bool, heatmap: bool) -> None:
        start = time.perf_counter()
        pred = self.classifier.classify(image, heatmap=heatmap)
        total = (time.perf_counter() - start) * 1000.0
        if record:
            timings = pred.timings
            for stage in STAGES:
                self.samples[stage].append(float(timings[f"{stage}_ms"]))
            self.samples["end_to_end"].append(total)
            self.heatmap_drawn = pred.heatmap is not None


def _load(paths: Sequence[Path], allow_invalid: bool) -> list[object]:
    from ..runtime import load_bundle

    return [load_bundle(p, allow_invalid=allow_invalid) for p in paths]


def _make_subjects(paths: Sequence[Path], bundles: Sequence[object], threads: int, edgetpu: str) -> list[_Subject]:
    from ..runtime import Classifier

    subjects = []
    for i, (path, bundle) in enumerate(zip(paths, bundles)):
        before = current_rss_bytes()
        clf = Classifier(bundle, num_threads=threads, edgetpu=edgetpu)
        after = current_rss_bytes()
        delta = after - before if before is not None and after is not None else None
        samples = {stage: [] for stage in (*STAGES, "end_to_end")}
        subjects.append(_Subject(i, path, bundle, clf, dict(clf.info()), delta, samples))
    return subjects


def _result(subject: _Subject, threads: int) -> dict:
    model_file = _model_file(subject.bundle, subject.info)
    e2e = summarise(subject.samples["end_to_end"])
    mean_s = e2e["mean_ms"] / 1000.0
    return {
        "bundle": str(subject.path),
        "model": subject.info.get("model"),
        "version": subject.info.get("version"),
        "valid": bool(getattr(subject.bundle, "valid", True)),
        "quantize": subject.info.get("quantize"),
        "input_dtype": (subject.info.get("input") or {}).get("dtype"),
        "threads": threads,
        "runtime": subject.info.get("runtime"),
        "runtime_version": subject.info.get("runtime_version"),
        "delegate": subject.info.get("delegate"),
        # The Classifier builds its interpreter with the default op resolver, which
        # applies the runtime's default delegate (XNNPACK) to the ops it supports.
        "cpu_kernels": "builtin + XNNPACK (runtime default)" if subject.info.get("delegate") == "cpu" else None,
        "fallback_reason": subject.info.get("fallback_reason"),
        "model_file": model_file.name if model_file else None,
        "model_bytes": model_file.stat().st_size if model_file else None,
        "heatmap": subject.heatmap_drawn,
        "p50_ms": e2e["p50_ms"],
        "p90_ms": e2e["p90_ms"],
        "p99_ms": e2e["p99_ms"],
        "mean_ms": e2e["mean_ms"],
        "throughput_ips": round(1.0 / mean_s, 3) if mean_s > 0 else None,
        "stages": {stage: summarise(subject.samples[stage]) for stage in (*STAGES, "end_to_end")},
        "rss_load_delta_bytes": subject.rss_delta,
        "info": subject.info,
    }


def _add_ratios(results: list[dict]) -> None:
    """Ratio of each bundle's p50 (end-to-end and invoke) to the first bundle's, per thread count."""
    by_threads: dict[int, dict] = {}
    for r in results:
        by_threads.setdefault(r["threads"], r)  # first bundle at each thread count
    for r in results:
        ref = by_threads[r["threads"]]
        r["ratio_to_first"] = round(r["p50_ms"] / ref["p50_ms"], 4) if ref["p50_ms"] > 0 else None
        ref_inv = ref["stages"]["invoke"]["p50_ms"]
        inv = r["stages"]["invoke"]["p50_ms"]
        r["invoke_ratio_to_first"] = round(inv / ref_inv, 4) if ref_inv > 0 else None


def run_latency(bundle_paths: Sequence[str | Path], config: LatencyConfig, images: BenchImages) -> dict:
    """Measure every bundle at every thread count, interleaved; returns the JSON report."""
    paths = [Path(p) for p in bundle_paths]
    if not paths:
        raise UsageError("give at least one bundle to benchmark")
    if len(set(map(str, paths))) != len(paths):
        raise UsageError("the same bundle is listed twice; list each bundle once")
    bundles = _load(paths, config.allow_invalid)
    results: list[dict] = []
    total = len(config.threads) * (config.warmup + config.runs) * len(paths)
    started = time.perf_counter()
    with tqdm(total=total, desc="bench latency", unit="img", disable=not config.progress, leave=False) as bar:
        for threads in config.threads:
            subjects = _make_subjects(paths, bundles, threads, config.edgetpu)
            for i in range(config.warmup + config.runs):
                image = images.images[i % len(images.images)]
                start = i % len(subjects)
                for subject in subjects[start:] + subjects[:start]:
                    subject.measure(image, record=i >= config.warmup, heatmap=config.heatmap)
                bar.update(len(subjects))
            results.extend(_result(s, threads) for s in subjects)
            del subjects
            gc.collect()
    _add_ratios(results)
    return {
        "kind": "latency",
        "notice": RESEARCH_NOTICE,
        "machine": machine_info(),
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(config).items() if k != "progress"},
        "images": {"source": images.source, "description": images.description, "count": len(images.images)},
        "interleaved": len(paths) > 1,
        "duration_s": round(time.perf_counter() - started, 2),
        "peak_rss_bytes": peak_rss_bytes(),
        "results": results,
    }
