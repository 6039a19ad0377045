#!/usr/bin/env python3
"""The model zoo on this machine: size, int8 latency (1 and 2 threads), ratio to the reference.

    python benchmarks/zoo_latency.py --bundles BUNDLES_DIR
    python benchmarks/zoo_latency.py --from-runs '/work/runs/*' --bundles BUNDLES_DIR   # convert first (needs TF)

For every model in ``BUNDLES_DIR`` (bundle folders made by ``leukoedge
convert``, e.g. ``<run>/int8`` and ``<run>/float32``): float32 and int8
``model.tflite`` sizes, int8 end-to-end latency p50/p90 with 1 and 2 interpreter
threads, and the ratio to ``mobilenetv2-1.0`` int8 measured in the SAME run
(all int8 bundles interleaved, so the ratio holds on a noisy machine or a
throttling Pi). Accuracy columns come from each bundle's own ``parity.json``
(float and int8 accuracy on the run's test split) and the split kind from its
model card, so the table needs nothing but the bundles.

Writes ``benchmarks/results/zoo_latency.{md,json}``. On a Pi, copy the bundle
folder over and run the first form: no TensorFlow needed.
"""
from __future__ import annotations

import argparse
import glob
import json
from pathlib import Path

from _common import (RESULTS, find_bundles, leukoedge_cmd, main_guard, quantization_of, read_bundle_meta, run,
                     write_results)
from leukoedge.bench.images import bench_images
from leukoedge.bench.latency import LatencyConfig, run_latency
from leukoedge.bench.report import fmt_bytes, md_table

INT8_MODES = ("int8", "uint8")
FLOAT_MODES = ("none", "float32", "float")
REFERENCE = "mobilenetv2-1.0"


def convert_runs(pattern: str, out_dir: Path, modes: tuple[str, ...] = ("int8", "none")) -> None:
    """``leukoedge convert`` every run dir matching ``pattern`` into ``out_dir/<run>/<mode>``.

    Existing bundles are kept (delete them to reconvert). A run whose int8 model
    fails the parity gate still yields a bundle marked invalid: it is measured
    and flagged, because hiding it would hide the very failure the gate found.
    """
    # metrics.json is written by evaluation at the end of training: a run still training has none.
    runs = sorted(Path(p) for p in glob.glob(pattern)
                  if (Path(p) / "model.keras").is_file() and (Path(p) / "metrics.json").is_file())
    if not runs:
        raise SystemExit(f"no finished run directories (model.keras + metrics.json) match {pattern!r}")
    for run_dir in runs:
        for mode in modes:
            dest = out_dir / run_dir.name / ("float32" if mode == "none" else mode)
            if (dest / "bundle.json").is_file():
                continue
            proc = run([*leukoedge_cmd("convert"), run_dir, "--quantize", mode, "--with-heatmap", "--out", dest],
                       check=False)
            if proc.returncode != 0 and not (dest / "bundle.json").is_file():
                raise SystemExit(f"converting {run_dir} ({mode}) failed with exit code {proc.returncode}")


def collect(bundles_dir: Path) -> dict[str, dict]:
    """model key -> {"int8": path, "float": path, "meta": ...} from the bundles found."""
    zoo: dict[str, dict] = {}
    for path in find_bundles(bundles_dir):
        if not path.is_dir():
            continue
        info = read_bundle_meta(path)
        meta = info["meta"]
        model = (meta.get("model") or {}).get("name") or path.name
        # float and int8 bundles of one run share the run's name (recorded by convert)
        key = (meta.get("model") or {}).get("run") or f"{model}@{(meta.get('model') or {}).get('version')}"
        mode = quantization_of(meta)
        slot = "int8" if mode in INT8_MODES else "float" if mode in FLOAT_MODES else None
        if slot is None:
            continue  # float16 / dynamic belong to quant_modes.py
        entry = zoo.setdefault(key, {"model": model, "key": key})
        if slot in entry:
            raise SystemExit(f"two {slot} bundles for {key}: {entry[slot]} and {path}; keep one per model")
        entry[slot] = path
        if slot == "int8":
            entry["parity"] = info["parity"]
            entry["card"] = info["card"]
            entry["valid"] = bool(meta.get("valid"))
    return zoo


def _model_bytes(path: Path | None) -> int | None:
    return (path / "model.tflite").stat().st_size if path and (path / "model.tflite").is_file() else None


def _split_kind(card: dict, parity: dict) -> str | None:
    for source in (parity, card, card.get("data") or {}, card.get("split") or {}):
        for key in ("split_kind", "split"):
            if isinstance(source.get(key), str):
                return source[key]
    return None


def training_rows(table: Path | None) -> dict[str, dict]:
    """Rows of the training benchmark (``taleqani_zoo.py``) by run-directory name, or {}.

    They add what a bundle does not carry: parameters, MACs, the Keras model's
    test accuracy and macro-F1 with the split kind it was measured on.
    """
    if table is None or not table.is_file():
        return {}
    rows = json.loads(table.read_text()).get("rows", [])
    return {Path(r["run_dir"]).name: r for r in rows if r.get("run_dir") and "accuracy" in r}


def measure(zoo: dict[str, dict], runs: int, warmup: int, threads: tuple[int, ...], images_dir: str | None,
            reference: str = REFERENCE, training: dict[str, dict] | None = None) -> dict:
    entries = [e for e in zoo.values() if "int8" in e]
    if not entries:
        raise SystemExit("no int8 bundles found; convert the runs with --quantize int8 first")
    entries.sort(key=lambda e: (e["model"] != reference, e["model"], e["key"]))
    wanted_reference = reference
    reference = entries[0]["model"]
    config = LatencyConfig(runs=runs, warmup=warmup, threads=threads, allow_invalid=True)
    latency = run_latency([e["int8"] for e in entries], config, bench_images(images_dir))
    rows = []
    for e in entries:
        per_threads = {r["threads"]: r for r in latency["results"] if r["bundle"] == str(e["int8"])}
        parity = e.get("parity") or {}
        trained = (training or {}).get(e["key"], {})
        row = {
            "model": e["model"],
            "key": e["key"],
            "training_row": trained.get("name"),
            "params": trained.get("params"),
            "macs": trained.get("macs"),
            "input_size": trained.get("input_size"),
            "keras_test_accuracy": trained.get("accuracy"),
            "keras_test_macro_f1": trained.get("macro_f1"),
            "int8_bundle": str(e["int8"]),
            "float_bundle": str(e["float"]) if e.get("float") else None,
            "valid": e.get("valid"),
            "split_kind": trained.get("split_kind") or _split_kind(e.get("card") or {}, parity),
            "float_accuracy": parity.get("float_accuracy"),
            "int8_accuracy": parity.get("quant_accuracy"),
            "agreement": parity.get("agreement"),
            "float_bytes": _model_bytes(e.get("float")),
            "int8_bytes": _model_bytes(e["int8"]),
        }
        for t, r in sorted(per_threads.items()):
            row[f"int8_p50_ms_t{t}"] = r["p50_ms"]
            row[f"int8_p90_ms_t{t}"] = r["p90_ms"]
            row[f"int8_invoke_p50_ms_t{t}"] = r["stages"]["invoke"]["p50_ms"]
            row[f"ratio_to_reference_t{t}"] = r["ratio_to_first"]
        rows.append(row)
    return {"reference": reference, "reference_wanted": wanted_reference, "threads": list(threads),
            "runs": runs, "warmup": warmup, "images": latency["images"], "machine": latency["machine"],
            "rows": rows, "latency_report": latency}


def markdown(result: dict) -> str:
    threads = result["threads"]
    headers = ["model", "params", "MACs", "input", "split", "float acc", "int8 acc", "agreement", "float32 size",
               "int8 size"]
    for t in threads:
        headers += [f"int8 p50 ms ({t} thr)", f"ratio ({t} thr)"]
    rows = []
    for r in result["rows"]:
        name = (r.get("training_row") or r["model"]) + ("" if r["valid"] else " (invalid bundle)")
        pct = lambda v: None if v is None else f"{100 * v:.1f} %"  # noqa: E731
        split = "random (LEAKY)" if r["split_kind"] == "random" else r["split_kind"]
        row = [name, None if r["params"] is None else f"{r['params']:,}",
               None if r["macs"] is None else f"{r['macs'] / 1e6:.1f}M", r["input_size"], split,
               pct(r["float_accuracy"]), pct(r["int8_accuracy"]),
               None if r["agreement"] is None else f"{r['agreement']:.3f}",
               fmt_bytes(r["float_bytes"]), fmt_bytes(r["int8_bytes"])]
        for t in threads:
            row += [r.get(f"int8_p50_ms_t{t}"), r.get(f"ratio_to_reference_t{t}")]
        rows.append(row)
    note = ("" if result["reference"] == result["reference_wanted"] else
            f" ({result['reference_wanted']} int8 was not among the bundles, so ratios are to {result['reference']})")
    return (f"End-to-end latency per image (decode + resize + invoke + post-processing incl. heatmap), "
            f"p50 of {result['runs']} runs after {result['warmup']} warm-up, all int8 bundles interleaved; "
            f"ratio = p50 / p50 of **{result['reference']}** int8 at the same thread count in the same run{note}. "
            f"Accuracy: each bundle's parity gate on its run's test split (float = the Keras model, int8 = the "
            f"bundle through the device runtime); params, MACs and split from the training table. Images: {result['images']['description']}.\n\n"
            + md_table(headers, rows) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundles", type=Path, required=True, help="folder of bundles (searched recursively)")
    parser.add_argument("--from-runs", metavar="GLOB", help="convert these run dirs into --bundles first (needs TF)")
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--images", help="images to classify (default: synthetic smears / seeded noise)")
    parser.add_argument("--reference", default=REFERENCE, help=f"model the ratios are to (default {REFERENCE})")
    parser.add_argument("--training-table", type=Path, default=RESULTS / "taleqani.json",
                        help="taleqani_zoo.py's JSON, for params / MACs / split (skipped when absent)")
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.from_runs:
        convert_runs(args.from_runs, args.bundles)
    threads = tuple(int(t) for t in args.threads.split(","))
    result = measure(collect(args.bundles), args.runs, args.warmup, threads, args.images, args.reference,
                     training_rows(args.training_table))
    write_results("zoo_latency", result, markdown(result), "Model zoo: size and int8 latency", args.out_dir)
    return 0


if __name__ == "__main__":
    main_guard(main)
