#!/usr/bin/env python3
"""The parity table: float Keras vs converted TFLite, per trained model and mode.

    python benchmarks/parity_table.py --runs '/work/runs/*' [--modes int8 float16 dynamic]
                                      [--work benchmarks/.work/parity] [--calibration N] [--force]

Every run directory (config.json + manifest.json + model.keras) is converted
with the real ``leukoedge convert`` pipeline (in this process, so TensorFlow
loads once) for each mode, with the default gate (max drop 1 point, agreement
>= 0.99) and the feature-map output, exactly as a deployable bundle. The
numbers come from each bundle's own ``parity.json`` (graded through the
device runtime on the run's test split); a failed gate is recorded, not
hidden. Existing bundles under ``--work`` are reused unless ``--force``.

Writes ``benchmarks/results/parity.{md,json}``. Needs TensorFlow (workstation).
"""
from __future__ import annotations

import argparse
import glob
import json
from pathlib import Path

from _common import RESULTS, main_guard, write_results
from leukoedge.errors import ParityError

DEFAULT_MODES = ("int8", "float16", "dynamic")


def find_runs(patterns: list[str]) -> list[Path]:
    """Finished, evaluated run directories (a run still training is skipped, not half-measured)."""
    runs = set()
    for pattern in patterns:
        for p in glob.glob(pattern):
            path = Path(p)
            if not all((path / name).is_file() for name in ("model.keras", "config.json", "manifest.json", "metrics.json")):
                continue
            state = path / "state.json"
            if state.is_file() and not json.loads(state.read_text()).get("finished", False):
                print(f"skipping {path}: training has not finished")
                continue
            runs.add(path.resolve())
    return sorted(runs)


def convert_one(run: Path, mode: str, out: Path, force: bool, calibration: int | None) -> dict:
    """Convert (or reuse) one bundle and return its parity.json + bundle.json."""
    from leukoedge.convert.options import ConvertOptions
    from leukoedge.convert.pipeline import convert_run

    if force or not (out / "parity.json").is_file():
        options = ConvertOptions(
            run_dir=run, out=out, quantize=mode, with_heatmap=True, force=True,
            calibration=calibration if mode in ("int8", "uint8") else None,
        )
        try:
            convert_run(options)
        except ParityError as err:  # the bundle is written, marked invalid: record it
            print(f"{run.name} {mode}: gate FAILED ({err.message})")
    return {
        "parity": json.loads((out / "parity.json").read_text()),
        "meta": json.loads((out / "bundle.json").read_text()),
    }


def row(run: Path, mode: str, data: dict) -> dict:
    p, meta = data["parity"], data["meta"]
    size = p.get("size") or meta.get("size") or {}
    return {
        "run": run.name,
        "model": meta["model"]["name"],
        "mode": mode,
        "input": f"{meta['input']['shape'][1]}x{meta['input']['shape'][2]} {meta['input']['dtype']}",
        "split_kind": p.get("split_kind"),
        "n_test": p["n_images"],
        "float_accuracy": p["float_accuracy"],
        "quant_accuracy": p["quant_accuracy"],
        "delta_accuracy": p["delta_accuracy"],
        "float_macro_f1": p["float_macro_f1"],
        "quant_macro_f1": p["quant_macro_f1"],
        "agreement": p["agreement"],
        "per_class_agreement": p["per_class_agreement"],
        "mean_kl": p["mean_kl"],
        "float32_bytes": size.get("float32_bytes"),
        "converted_bytes": size.get("converted_bytes"),
        "ratio": size.get("ratio"),
        "passed": p["passed"],
        "reasons": p.get("reasons", []),
    }


def markdown(rows: list[dict]) -> str:
    lines = [
        "Float Keras model vs the converted model run through the device runtime (LiteRT), "
        "on each run's test split; gate: accuracy drop <= 1 point and top-1 agreement >= 0.99.",
        "",
        "| run | model | mode | input | split | test images | float acc | converted acc | drop (points) "
        "| float / conv. macro-F1 | agreement | mean KL | float32 size | converted size | ratio | gate |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['run']} | {r['model']} | {r['mode']} | {r['input']} | {r['split_kind']} | {r['n_test']} "
            f"| {r['float_accuracy']:.4f} | {r['quant_accuracy']:.4f} | {r['delta_accuracy']:+.2f} "
            f"| {r['float_macro_f1']:.4f} / {r['quant_macro_f1']:.4f} | {r['agreement']:.4f} | {r['mean_kl']:.5f} "
            f"| {r['float32_bytes'] / 1e6:.2f} MB | {r['converted_bytes'] / 1e6:.2f} MB | {r['ratio']:.2f}x "
            f"| {'pass' if r['passed'] else 'FAIL: ' + '; '.join(r['reasons'])} |"
        )
    lines += [
        "",
        "Per-class agreement (true label):",
        "",
        *[
            f"- {r['run']} {r['mode']}: "
            + ", ".join(f"{c} {a:.3f}" for c, a in r["per_class_agreement"].items())
            for r in rows
        ],
        "",
        *(
            ["Accuracy on a 'random' split overstates real-world accuracy (neighbouring captures leak); "
             "the float-vs-converted agreement is what this table is about.", ""]
            if any(r["split_kind"] == "random" for r in rows) else []
        ),
        "Research use only; not a diagnostic device.",
    ]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", nargs="+", default=["/work/runs/*"], help="run directory glob(s)")
    ap.add_argument("--modes", nargs="+", default=list(DEFAULT_MODES), choices=["int8", "uint8", "float16", "dynamic", "none"])
    ap.add_argument("--work", type=Path, default=Path(__file__).resolve().parent / ".work" / "parity")
    ap.add_argument("--force", action="store_true", help="re-convert even if a bundle exists")
    ap.add_argument("--calibration", type=int, default=None, help="int8/uint8 calibration images (default 300)")
    ap.add_argument("--out-dir", type=Path, default=RESULTS)
    args = ap.parse_args()
    runs = find_runs(args.runs)
    if not runs:
        raise SystemExit(f"no complete run directories match {args.runs}")
    rows = []
    for run in runs:
        for mode in args.modes:
            data = convert_one(run, mode, args.work / run.name / mode, args.force, args.calibration)
            rows.append(row(run, mode, data))
            r = rows[-1]
            print(f"{r['model']:>20} {mode:>8}: float {r['float_accuracy']:.4f} conv {r['quant_accuracy']:.4f} "
                  f"agree {r['agreement']:.4f} size {r['converted_bytes']:,} B gate {'pass' if r['passed'] else 'FAIL'}")
    write_results("parity", {"rows": rows, "runs": [str(r) for r in runs]}, markdown(rows), "Parity: float vs converted models",
                  out_dir=args.out_dir)
    return 0


if __name__ == "__main__":
    main_guard(main)
