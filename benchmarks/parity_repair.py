#!/usr/bin/env python3
"""The zoo through ``convert --repair``: full int8 as is, and the bundle the repair keeps (issue 17, item 4).

    python benchmarks/parity_repair.py --runs '/work/runs/taleqani-*' [--work DIR] [--force]
                                       [--diagnose-layers K]

Every run directory is converted with the real pipeline (in this process, so
TensorFlow loads once) exactly as ``leukoedge convert RUN --quantize int8
--with-heatmap --repair`` would: full int8 graded by the gate on the run's
test split; if it fails, the diagnosis and the remedies (more calibration
images, float fallback for the 1-3 worst layers, 16x8) chosen on the val
split, the kept one graded on test. The figures come from each bundle's own
parity.json / repair.json / diagnosis.json. For a model whose full int8
passes, nothing is repaired: its latency and Edge TPU share are measured here
the way the repair measures its attempts (p50 of 30 invokes on one thread
through :class:`leukoedge.runtime.Classifier`), so every row's ratios mean
the same.

``--diagnose-layers 0`` makes the diagnosis keep EVERY layer in float in turn
(slow), which checks the issue's goal "the diagnosis names a layer that removes
at least half of the flips, wherever such a layer exists" against all layers
rather than the 5 worst-ranked.

Writes benchmarks/results/parity_repair.{md,json} and the same table as the
"Repair" section of benchmarks/results/parity.md (between markers; the rest of
that file is parity_table.py's). Needs TensorFlow (workstation).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from _common import RESULTS, command_line, main_guard, write_results
from parity_table import find_runs

from leukoedge.errors import ParityError
from leukoedge.quiet import quiet_environment

quiet_environment()  # before TensorFlow is first imported (convert_one imports it)

#: The issue's goals for a repaired bundle against its own full-int8 model.
MAX_SIZE_RATIO = 1.3
MAX_LATENCY_RATIO = 1.5
START, END = "<!-- repair-table:start -->", "<!-- repair-table:end -->"


def convert_one(run: Path, out: Path, force: bool, diagnose_layers: int) -> float | None:
    """Convert with --repair (or reuse the bundle); the seconds it took, None when reused."""
    from leukoedge.convert.options import ConvertOptions
    from leukoedge.convert.pipeline import convert_run

    if not force and (out / "parity.json").is_file():
        return None
    start = time.perf_counter()
    options = ConvertOptions(run_dir=run, out=out, quantize="int8", with_heatmap=True, force=True, repair=True,
                             diagnose_layers=diagnose_layers)
    try:
        convert_run(options)
    except ParityError as err:  # the bundle is written, marked invalid: it is a row like any other
        print(f"{run.name}: gate FAILED after --repair ({err.message})")
    return time.perf_counter() - start


def measure_plain(bundle: Path) -> dict:
    """p50 invoke and Edge TPU share of a bundle whose full int8 passed (the repair's own measurement)."""
    from leukoedge.bundle import MODEL_NAME, load_bundle
    from leukoedge.convert import edgetpu, repair
    from leukoedge.runtime import Classifier

    import numpy as np

    clf = Classifier(load_bundle(bundle, allow_invalid=True), num_threads=1, edgetpu="off")
    shape = clf.bundle.input["shape"]
    image = np.random.default_rng(0).integers(0, 256, (shape[1], shape[2], 3), dtype=np.uint8)
    mapped, total = edgetpu.mappable_ops((bundle / MODEL_NAME).read_bytes())
    p50, _ = repair.p50_beside(clf, clf, image)
    return {"p50_invoke_ms": p50, "tpu_mapped_ops": mapped, "total_ops": total}


def row(run: Path, bundle: Path, seconds: float | None) -> dict:
    parity = json.loads((bundle / "parity.json").read_text())
    meta = json.loads((bundle / "bundle.json").read_text())
    rep_path, diag_path = bundle / "repair.json", bundle / "diagnosis.json"
    diag = json.loads(diag_path.read_text()) if diag_path.is_file() else None
    out = {"run": run.name, "model": meta["model"]["name"], "n_test": parity["n_images"],
           "float_accuracy": parity["float_accuracy"], "convert_seconds": seconds, "valid": meta["valid"],
           "quantize": meta["quantize"], "diagnosis": _diagnosis_summary(diag)}
    if not rep_path.is_file():  # full int8 passed: nothing to repair
        plain = measure_plain(bundle)
        full = {"agreement": parity["agreement"], "accuracy": parity["quant_accuracy"], "flips": parity.get("flips"),
                "passed": parity["passed"], "size_bytes": meta["size"]["converted_bytes"], **plain}
        out.update(full_int8=full, remedy="none needed", kept=dict(full), size_ratio=1.0, latency_ratio=1.0)
        return out
    rep = json.loads(rep_path.read_text())
    attempts = rep["attempts"]
    first = attempts[0]
    out["full_int8"] = {"agreement": first["test"]["agreement"], "accuracy": first["test"]["accuracy"],
                        "flips": first["test"]["flips"], "passed": first["test"]["passed"],
                        "size_bytes": first["size_bytes"], "p50_invoke_ms": first["p50_invoke_ms"],
                        "tpu_mapped_ops": first["tpu_mapped_ops"], "total_ops": first["total_ops"]}
    out["attempts"] = [{k: a[k] for k in ("remedy", "detail", "val_flips", "val_images", "val_passed", "size_vs_int8",
                                          "latency_vs_int8", "tpu_mapped_ops", "total_ops", "error")}
                       for a in attempts]
    kept = next((a for a in attempts if a["kept"]), None)
    left = kept or next((a for a in attempts[1:] if a.get("test")), None)
    if left is None:
        none = ("none: full int8 passes on the val split, so no remedy can be chosen without test"
                if len(attempts) == 1 else "none passed on the val split")
        out.update(remedy=none, kept=None, size_ratio=None, latency_ratio=None,
                   verdict=rep["verdict"])
        return out
    out.update(remedy=f"{left['remedy']} ({left['detail']})" + ("" if kept else ", FAILED, left marked invalid"),
               kept={"agreement": left["test"]["agreement"], "accuracy": left["test"]["accuracy"],
                     "flips": left["test"]["flips"], "passed": left["test"]["passed"] and kept is not None,
                     "size_bytes": left["size_bytes"], "p50_invoke_ms": left["p50_invoke_ms"],
                     "tpu_mapped_ops": left["tpu_mapped_ops"], "total_ops": left["total_ops"]},
               size_ratio=left["size_vs_int8"], latency_ratio=left["latency_vs_int8"], verdict=rep["verdict"])
    return out


def _diagnosis_summary(diag: dict | None) -> dict | None:
    if not diag or "layers" not in diag:
        return None if not diag else {"error": diag.get("error")}
    blame = diag.get("blame") or {}
    return {"gate_flips": diag["gate_flips"], "tested_layers": diag["tested_layers"], "n_layers": len(diag["layers"]),
            "worst_layer": diag["layers"][0]["layer"] if diag["layers"] else None,
            "blamed_layer": blame.get("layer"), "flips_removed": blame.get("flips_removed"),
            "share_removed": blame.get("share_removed"),
            "half_or_more": bool(blame) and blame["flips_removed"] * 2 >= diag["gate_flips"]}


def goals(rows: list[dict]) -> list[str]:
    ok = [r for r in rows if r["kept"] and r["kept"]["passed"] and r["size_ratio"] <= MAX_SIZE_RATIO
          and r["latency_ratio"] <= MAX_LATENCY_RATIO]
    lines = [f"- deployable int8-family bundle (passes the gate, <= {MAX_SIZE_RATIO}x size and <= "
             f"{MAX_LATENCY_RATIO}x latency of its full int8): **{len(ok)} of {len(rows)}** "
             f"(goal: at least 11 of 12){'' if len(ok) >= 11 else ': NOT MET'}"]
    for r in rows:
        if r not in ok:
            why = ("no attempt passed" if not r["kept"] or not r["kept"]["passed"] else
                   f"size {r['size_ratio']:.2f}x, latency {r['latency_ratio']:.2f}x")
            lines.append(f"  - not counted: {r['run']} ({why})")
    failing = [r for r in rows if not r["full_int8"]["passed"] and r["diagnosis"] and "gate_flips" in r["diagnosis"]]
    named = [r for r in failing if r["diagnosis"]["half_or_more"]]
    lines.append(f"- full int8 failed for {len(failing)}; the diagnosis names a layer that, kept in float alone, "
                 f"removes at least half of the test flips for {len(named)} of them:")
    for r in failing:
        d = r["diagnosis"]
        lines.append(f"  - {r['run']}: {d['gate_flips']} flips; best single layer "
                     f"{d['blamed_layer'] or 'none'} removes {d['flips_removed'] or 0} "
                     f"(of the {d['tested_layers']} of {d['n_layers']} layers tested)")
    return lines


def markdown(rows: list[dict]) -> str:
    lines = [
        "Each run converted with `leukoedge convert RUN --quantize int8 --with-heatmap --repair` (default gate: "
        "accuracy drop <= 1 point and top-1 agreement >= 0.99, the statistical decision of the small-datasets "
        "issue). Remedy chosen on the val split, graded on the test split (capture-block split, 390 images); "
        "through the device runtime (LiteRT). Latency: p50 of 30 invokes on one thread on this machine, taken "
        "invoke by invoke in turn with the run's full int8, so only the ratio means something. Edge TPU: ops the compiler "
        "would map, a prefix up to the first float / int16 / unsupported op (static check, no compiler here).",
        "",
        "| run | model | full int8 agreement | full int8 acc (float) | gate | remedy kept | repaired agreement "
        "| repaired acc | gate | size vs int8 | p50 vs int8 | Edge TPU ops: int8 -> kept |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        f, k = r["full_int8"], r["kept"]
        tpu = f"{f['tpu_mapped_ops']}/{f['total_ops']}"
        if k:
            tpu += f" -> {k['tpu_mapped_ops']}/{k['total_ops']}"
        lines.append(
            f"| {r['run']} | {r['model']} | {f['agreement']:.4f} | {f['accuracy']:.4f} ({r['float_accuracy']:.4f}) "
            f"| {'pass' if f['passed'] else 'FAIL'} | {r['remedy']} "
            + (f"| {k['agreement']:.4f} | {k['accuracy']:.4f} | {'pass' if k['passed'] else 'FAIL'} "
               f"| {r['size_ratio']:.2f}x | {r['latency_ratio']:.2f}x " if k else "| | | | | ")
            + f"| {tpu} |")
    lines += ["", "Goals:", "", *goals(rows), "", "Attempts (validation flips of the val images; every attempt in "
              "each bundle's repair.md):", ""]
    for r in rows:
        for a in r.get("attempts", []):
            res = (f"no result: {a['error']}" if a["error"] else
                   f"{a['val_flips']} of {a['val_images']} flip, {'passes' if a['val_passed'] else 'fails'}, "
                   f"size {a['size_vs_int8']:.2f}x, p50 {a['latency_vs_int8']:.2f}x, "
                   f"Edge TPU {a['tpu_mapped_ops']}/{a['total_ops']}")
            lines.append(f"- {r['run']}: {a['remedy']} ({a['detail']}): {res}")
    lines += ["", "Research use only; not a diagnostic device."]
    return "\n".join(lines)


def update_parity_md(body: str, path: Path) -> None:
    """Put the table in parity.md's Repair section (replacing the previous one), keeping the rest."""
    from leukoedge.bench.report import write_atomic

    text = path.read_text() if path.is_file() else "# Parity: float vs converted models\n"
    section = f"{START}\n## Repair (`convert --repair`), issue 17\n\nCommand: `{command_line()}`\n\n{body}\n{END}"
    if START in text and END in text:
        text = text[:text.index(START)] + section + text[text.index(END) + len(END):]
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    write_atomic(path, text)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", nargs="+", default=["/work/runs/taleqani-*"], help="run directory glob(s)")
    ap.add_argument("--work", type=Path, default=Path(__file__).resolve().parent / ".work" / "parity-repair")
    ap.add_argument("--force", action="store_true", help="convert again even if a bundle exists")
    ap.add_argument("--diagnose-layers", type=int, default=5, help="layers the diagnosis tests (0: all)")
    ap.add_argument("--out-dir", type=Path, default=RESULTS)
    args = ap.parse_args()
    runs = find_runs(args.runs)
    if not runs:
        raise SystemExit(f"no complete run directories match {args.runs}")
    rows = []
    for run in runs:
        bundle = args.work / f"{run.name}-repair"
        seconds = convert_one(run, bundle, args.force, args.diagnose_layers)
        rows.append(row(run, bundle, seconds))
        print(f"{run.name}: {rows[-1]['remedy']}")
    body = markdown(rows)
    write_results("parity_repair", {"rows": rows, "goals": goals(rows)}, body, "Parity repair: the zoo through --repair",
                  out_dir=args.out_dir)
    update_parity_md(body, args.out_dir / "parity.md")
    return 0


if __name__ == "__main__":
    main_guard(main)
