#!/usr/bin/env python3
"""Quantisation modes of one run: float32 / float16 / dynamic / int8 side by side.

    python benchmarks/quant_modes.py --run RUN_DIR --bundles WORK_DIR   # converts (needs TF), then measures
    python benchmarks/quant_modes.py --bundles WORK_DIR                 # measures existing bundles (e.g. on a Pi)

Converting calls ``leukoedge convert RUN_DIR --quantize MODE --out WORK_DIR/MODE``
for each mode (existing bundles are reused). Each bundle's own ``parity.json``
gives accuracy and top-1 agreement with the float Keras model on the run's test
split; latency is measured here, all modes interleaved (threads 1 by default),
so their ratios to float32 hold on a noisy machine. A mode whose parity gate
failed is still measured and marked invalid.

Writes ``benchmarks/results/quant_modes.{md,json}``.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from _common import RESULTS, leukoedge_cmd, main_guard, read_bundle_meta, run, write_results
from leukoedge.bench.images import bench_images
from leukoedge.bench.latency import LatencyConfig, run_latency
from leukoedge.bench.report import fmt_bytes, md_table

#: (``--quantize`` value, folder and label); float32 first: ratios are to it.
MODES = (("none", "float32"), ("float16", "float16"), ("dynamic", "dynamic"), ("int8", "int8"))


def convert(run_dir: Path, work: Path, modes: list[str]) -> None:
    for mode, label in MODES:
        if label not in modes:
            continue
        dest = work / label
        if (dest / "bundle.json").is_file():
            continue
        proc = run([*leukoedge_cmd("convert"), run_dir, "--quantize", mode, "--with-heatmap", "--out", dest],
                   check=False)
        if proc.returncode != 0 and not (dest / "bundle.json").is_file():
            raise SystemExit(f"converting {run_dir} with --quantize {mode} failed (exit code {proc.returncode})")


def measure(work: Path, modes: list[str], runs: int, warmup: int, threads: tuple[int, ...],
            images_dir: str | None) -> dict:
    present = [(label, work / label) for _, label in MODES if label in modes and (work / label / "bundle.json").is_file()]
    if not present:
        raise SystemExit(f"no mode bundles under {work} (expected {', '.join(modes)} sub-folders)")
    config = LatencyConfig(runs=runs, warmup=warmup, threads=threads, allow_invalid=True)
    latency = run_latency([p for _, p in present], config, bench_images(images_dir))
    rows = []
    for label, path in present:
        info = read_bundle_meta(path)
        parity = info["parity"]
        row = {
            "mode": label,
            "bundle": str(path),
            "valid": bool(info["meta"].get("valid")),
            "model": (info["meta"].get("model") or {}).get("name"),
            "model_bytes": (path / "model.tflite").stat().st_size,
            "float_accuracy": parity.get("float_accuracy"),
            "accuracy": parity.get("quant_accuracy"),
            # computed here (points, quantised minus float) rather than trusting a field's sign convention
            "delta_points": (None if parity.get("quant_accuracy") is None or parity.get("float_accuracy") is None
                             else round(100 * (parity["quant_accuracy"] - parity["float_accuracy"]), 4)),
            "agreement": parity.get("agreement"),
        }
        for r in latency["results"]:
            if r["bundle"] == str(path):
                t = r["threads"]
                row[f"p50_ms_t{t}"] = r["p50_ms"]
                row[f"invoke_p50_ms_t{t}"] = r["stages"]["invoke"]["p50_ms"]
                row[f"ratio_t{t}"] = r["ratio_to_first"]
        rows.append(row)
    base = rows[0]["model_bytes"]
    for row in rows:
        row["size_ratio"] = round(row["model_bytes"] / base, 4)
    return {"threads": list(threads), "runs": runs, "warmup": warmup, "reference_mode": rows[0]["mode"],
            "images": latency["images"], "machine": latency["machine"], "rows": rows, "latency_report": latency}


def markdown(result: dict) -> str:
    pct = lambda v: None if v is None else f"{100 * v:.2f} %"  # noqa: E731
    headers = ["mode", "valid", "size", "size ratio", "accuracy", "Δ vs float (points)", "agreement"]
    for t in result["threads"]:
        headers += [f"p50 ms ({t} thr)", f"invoke p50 ms ({t} thr)", f"latency ratio ({t} thr)"]
    rows = []
    for r in result["rows"]:
        delta = None if r["delta_points"] is None else f"{r['delta_points']:+.2f}"
        row = [r["mode"], "yes" if r["valid"] else "NO", fmt_bytes(r["model_bytes"]), r["size_ratio"],
               pct(r["accuracy"]), delta, None if r["agreement"] is None else f"{r['agreement']:.4f}"]
        for t in result["threads"]:
            row += [r.get(f"p50_ms_t{t}"), r.get(f"invoke_p50_ms_t{t}"), r.get(f"ratio_t{t}")]
        rows.append(row)
    model = result["rows"][0].get("model")
    return (f"Model **{model}**. Accuracy and agreement (top-1, with the float Keras model) from each bundle's "
            f"parity gate on the run's test split. Latency: end-to-end p50 of {result['runs']} runs after "
            f"{result['warmup']} warm-up, modes interleaved; ratios are to {result['reference_mode']}. "
            f"Images: {result['images']['description']}.\n\n" + md_table(headers, rows) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundles", type=Path, required=True, help="work folder holding one sub-folder per mode")
    parser.add_argument("--run", type=Path, help="run directory to convert first (needs TensorFlow)")
    parser.add_argument("--modes", default="float32,float16,dynamic,int8")
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", default="1")
    parser.add_argument("--images", help="images to classify (default: synthetic smears / seeded noise)")
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    args = parser.parse_args()
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = set(modes) - {label for _, label in MODES}
    if unknown:
        raise SystemExit(f"unknown modes {sorted(unknown)}; choose from {[label for _, label in MODES]}")
    if args.run:
        convert(args.run, args.bundles, modes)
    threads = tuple(int(t) for t in args.threads.split(","))
    result = measure(args.bundles, modes, args.runs, args.warmup, threads, args.images)
    write_results("quant_modes", result, markdown(result), "Quantisation modes", args.out_dir)
    return 0


if __name__ == "__main__":
    main_guard(main)
