#!/usr/bin/env python3
"""TFLite runtimes side by side: ai-edge-litert vs tflite-runtime on the same bundles.

    python benchmarks/runtimes.py --bundle B [--bundle B2] [--python tflite-runtime=/tmp/tflrt/bin/python]

Each runtime lives in its own Python environment (tflite-runtime 2.14 needs
numpy < 2, ai-edge-litert 2.x numpy 2), so each is measured in a subprocess
running ``python -m leukoedge.bench latency ... --json`` with this checkout's
``src`` on ``PYTHONPATH`` (the other environment needs only numpy, Pillow,
tqdm and its runtime). Two processes cannot be interleaved image by image, so
the runs are split into ``--rounds`` short rounds that alternate between the
runtimes; the table gives the median over rounds of each round's p50, and the
ratio to the first runtime.

A runtime whose interpreter is missing or cannot import its package is
reported as unavailable with the reason, not silently dropped. Set one up with:

    python3 -m venv /tmp/tflrt && /tmp/tflrt/bin/pip install tflite-runtime 'numpy<2' pillow tqdm

Writes ``benchmarks/results/runtimes.{md,json}``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from _common import REPO, RESULTS, main_guard, write_results
from leukoedge.bench.machine import machine_info
from leukoedge.bench.report import md_table

DEFAULT_TFLRT_PYTHON = "/tmp/tflrt/bin/python"
PROBE = ("import json; from leukoedge.runtime import find_litert; r = find_litert(); "
         "import numpy; print(json.dumps({'runtime': r.name, 'version': r.version, 'numpy': numpy.__version__}))")


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO / "src") + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def probe(python: str) -> dict:
    """Which runtime ``python`` finds, or {"error": reason}."""
    if not Path(python).exists():
        return {"error": f"{python} does not exist"}
    proc = subprocess.run([python, "-c", PROBE], capture_output=True, text=True, env=_env(), timeout=120)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["unknown error"])[-1]
        return {"error": f"{python}: {last}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def one_round(python: str, bundles: list[str], runs: int, warmup: int, threads: str, images: str | None) -> dict:
    cmd = [python, "-m", "leukoedge.bench", "latency", *bundles, "--runs", str(runs), "--warmup", str(warmup),
           "--threads", threads, "--json", "--quiet", *(["--images", images] if images else [])]
    print("+ " + " ".join(cmd), file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env())
    if proc.returncode != 0:
        raise SystemExit(f"{python} bench latency failed ({proc.returncode}): {proc.stderr.strip()[-500:]}")
    return json.loads(proc.stdout)


def measure(pythons: dict[str, str], bundles: list[str], runs: int, warmup: int, threads: str, rounds: int,
            images: str | None = None) -> dict:
    runtimes = []
    for label, python in pythons.items():
        info = probe(python)
        info.update({"label": label, "python": python})
        runtimes.append(info)
    available = [r for r in runtimes if "error" not in r]
    if not available:
        raise SystemExit("no runtime could be probed: " + "; ".join(r["error"] for r in runtimes))
    names = [r["runtime"] for r in available]
    if len(set(names)) != len(names):
        raise SystemExit(f"two environments load the same runtime ({names}); give one environment per runtime")
    per_round = max(1, runs // rounds)
    samples: dict[tuple, list[float]] = {}
    invoke: dict[tuple, list[float]] = {}
    rounds_out = []
    for k in range(rounds):
        order = available[k % len(available):] + available[:k % len(available)]
        for rt in order:
            report = one_round(rt["python"], bundles, per_round, warmup, threads, images)
            images_desc = report["images"]["description"]
            rounds_out.append({"round": k, "runtime": rt["runtime"],
                               "results": [{key: r[key] for key in ("bundle", "model", "threads", "runtime",
                                                                    "runtime_version", "p50_ms", "p90_ms")}
                                           for r in report["results"]]})
            for r in report["results"]:
                if r["runtime"] != rt["runtime"]:
                    raise SystemExit(f"{rt['python']} ran {r['runtime']}, expected {rt['runtime']}")
                key = (rt["runtime"], r["bundle"], r["threads"])
                samples.setdefault(key, []).append(r["p50_ms"])
                invoke.setdefault(key, []).append(r["stages"]["invoke"]["p50_ms"])
                rt.setdefault("model_of", {})[r["bundle"]] = r["model"]
    first = available[0]["runtime"]
    rows = []
    for (runtime, bundle, t), values in samples.items():
        ref = statistics.median(samples[(first, bundle, t)])
        med = statistics.median(values)
        rows.append({"runtime": runtime, "bundle": bundle, "threads": t,
                     "model": next(r["model_of"][bundle] for r in available if r["runtime"] == runtime),
                     "p50_ms_median_of_rounds": round(med, 4),
                     "invoke_p50_ms_median_of_rounds": round(statistics.median(invoke[(runtime, bundle, t)]), 4),
                     "round_p50s_ms": values, "ratio_to_first": round(med / ref, 4) if ref > 0 else None})
    rows.sort(key=lambda r: (r["bundle"], r["threads"], r["runtime"] != first, r["runtime"]))
    return {"machine": machine_info(), "runtimes": runtimes, "reference_runtime": first, "rounds": rounds,
            "images": images_desc,
            "runs_per_round": per_round, "warmup": warmup, "threads": threads, "rows": rows, "round_reports": rounds_out}


def markdown(result: dict) -> str:
    env_rows = [(r["label"], r.get("runtime"), r.get("version"), r.get("numpy"), r["python"], r.get("error"))
                for r in result["runtimes"]]
    rows = [(r["model"], Path(r["bundle"]).name, r["threads"], r["runtime"], r["p50_ms_median_of_rounds"],
             r["invoke_p50_ms_median_of_rounds"], r["ratio_to_first"]) for r in result["rows"]]
    return (f"{result['rounds']} alternating rounds of {result['runs_per_round']} runs (after {result['warmup']} "
            f"warm-up each) per runtime; latency = median over rounds of the round's end-to-end p50; ratio to "
            f"{result['reference_runtime']}. Images: {result['images']}.\n\n"
            + md_table(("environment", "runtime", "version", "numpy", "python", "unavailable because"), env_rows)
            + "\n\n" + md_table(("model", "bundle", "threads", "runtime", "p50 ms", "invoke p50 ms", "ratio"), rows)
            + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", action="append", required=True, help="bundle to measure (repeatable)")
    parser.add_argument("--python", action="append", default=[], metavar="LABEL=PYTHON",
                        help=f"extra environment (default: tflite-runtime={DEFAULT_TFLRT_PYTHON})")
    parser.add_argument("--runs", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--images", help="images to classify (default: synthetic smears / seeded noise)")
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    args = parser.parse_args()
    pythons = {"this environment": sys.executable}
    for item in args.python or [f"tflite-runtime={DEFAULT_TFLRT_PYTHON}"]:
        label, sep, path = item.partition("=")
        if not sep:
            raise SystemExit(f"--python takes LABEL=PYTHON, got {item!r}")
        pythons[label] = path
    bundles = [str(Path(b).resolve()) for b in args.bundle]
    images = str(Path(args.images).resolve()) if args.images else None
    result = measure(pythons, bundles, args.runs, args.warmup, args.threads, max(1, args.rounds), images)
    write_results("runtimes", result, markdown(result), "TFLite runtimes", args.out_dir)
    return 0


if __name__ == "__main__":
    main_guard(main)
