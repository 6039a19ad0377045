#!/usr/bin/env python3
"""Does the model read cells or stain? Training recipes compared under the shortcut audit.

    nice -n 10 python benchmarks/robustness.py [--runs /work/runs] [--train] [--convert] [--work DIR]

Variants (same net ``leuko-small``, same block-split manifest, same 24 epochs as
the Taleqani benchmark's baseline row unless a variant says otherwise; only the
colour handling differs):

- ``baseline``: default augmentation, pixels as captured (the benchmark row);
- ``robust-aug``: ``--augment robust`` (HED stain jitter 0.15, random grayscale
  p = 0.3, stronger brightness / contrast / hue);
- ``grayscale``: ``--colour grayscale`` in the ONE preprocessing path (the model
  never sees colour, on the workstation or on the device);
- ``reinhard-robust``: ``--colour reinhard`` (per-image CIELAB statistics mapped
  to a fixed reference) plus the robust augmentation;
- ``consistency``: the robust augmentation plus ``--consistency 10``: each image
  twice per batch with the same geometry and independent colour draws, and
  10 x the Jensen-Shannon divergence of the two predictions added to the loss
  (``leukoedge.train.consistency``);
- ``consistency-48ep``: the same with 48 epochs;
- ``robust-aug-48ep``: the control for it, ``--augment robust`` for 48 epochs
  without the consistency loss;
- ``macenko-consistency``: ``--colour macenko`` (per-image stain vectors mapped to
  a fixed reference) plus the robust augmentation and the consistency loss.

For each finished run: ``leukoedge eval RUN --audit`` (colour-only baseline,
accuracy under grayscale / colour normalisation / HED jitter / background
flattening with 95 % intervals, heatmap mass on white cells) and, with
``--convert``, the int8 conversion through the parity gate. ``--train`` trains
missing variants first (about 10-20 min each on 2 cores). A variant whose run
directory is absent keeps its row from the committed ``robustness.json``
(marked with the date it was measured), so one new variant can be added
without retraining the others.

Writes ``benchmarks/results/robustness.{md,json}``. Needs TensorFlow and the
Taleqani images (``/work/shared/datasets``).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from _common import REPO, RESULTS, main_guard, write_results

DATA = Path("/work/shared/datasets/taleqani-all/Original")
OOD = Path("/work/shared/datasets/ood/bccd-fields")
OOD_SETS = (Path("/work/shared/datasets/ood/pbc-cells"), OOD)
COMMON = ["--model", "leuko-small", "--batch", "32"]
EPOCHS = 24

VARIANTS = [
    dict(name="baseline", run="taleqani-leuko-small", args=[], colour="as-captured", augment="default",
         what="default augmentation (flips, small affine, light colour jitter)"),
    dict(name="robust-aug", run="robust-leuko-small-robust-aug", args=["--augment", "robust"], colour="as-captured",
         augment="robust", what="HED jitter 0.15 + random grayscale 0.3 + stronger lamp jitter"),
    dict(name="grayscale", run="robust-leuko-small-grayscale", args=["--colour", "grayscale"], colour="grayscale",
         augment="default", what="grayscale in the preprocessing path (device too)"),
    dict(name="reinhard-robust", run="robust-leuko-small-reinhard-robust",
         args=["--colour", "reinhard", "--augment", "robust"], colour="reinhard", augment="robust",
         what="Reinhard normalisation in the preprocessing path + robust augmentation"),
    dict(name="consistency", run="robust-leuko-small-consistency", args=["--augment", "robust", "--consistency", "10"],
         colour="as-captured", augment="robust + consistency 10",
         what="robust augmentation + Jensen-Shannon consistency between two colour views (weight 10)"),
    dict(name="consistency-48ep", run="robust-leuko-small-consistency-48ep",
         args=["--augment", "robust", "--consistency", "10"], epochs=48, colour="as-captured",
         augment="robust + consistency 10, 48 epochs",
         what="as consistency, twice the epochs (its validation accuracy was flat at 24)"),
    dict(name="robust-aug-48ep", run="robust-leuko-small-robust-aug-48ep", args=["--augment", "robust"], epochs=48,
         colour="as-captured", augment="robust, 48 epochs",
         what="control for consistency-48ep: the same epochs without the consistency loss"),
    dict(name="macenko-consistency", run="robust-leuko-small-macenko-consistency",
         args=["--colour", "macenko", "--augment", "robust", "--consistency", "10"], colour="macenko",
         augment="robust + consistency 10",
         what="Macenko stain normalisation in the preprocessing path + robust augmentation + consistency"),
    dict(name="cells", run="robust-leuko-small-cells", args=["--augment", "cells"], colour="as-captured",
         augment="cells", what="robust augmentation + background swap between training images (p 0.5) + "
                               "cell-centred crops (p 0.25)"),
    dict(name="cells-consistency-48ep", run="robust-leuko-small-cells-consistency-48ep",
         args=["--augment", "cells", "--consistency", "10"], epochs=48, colour="as-captured",
         augment="cells + consistency 10, 48 epochs",
         what="as consistency-48ep with background swap and cell-centred crops added"),
    dict(name="background-swap-48ep", run="robust-leuko-small-background-swap-48ep",
         args=["--augment", "background-swap"], epochs=48, colour="as-captured", augment="background-swap, 48 epochs",
         what="robust augmentation + background swap (p 0.5), no cell crops; compare robust-aug-48ep"),
    dict(name="robust-aug-224px", run="robust-leuko-small-robust-aug-224px",
         args=["--augment", "robust", "--input-size", "224"], epochs=48, colour="as-captured",
         augment="robust, 48 epochs, 224 px input",
         what="robust-aug-48ep at the images' native 224 px instead of 160 px (do finer details lift clean accuracy?)"),
]

#: Audit perturbations shown as columns (names from leukoedge.train.audit.PERTURBATIONS).
COLUMNS = [("clean", "clean"), ("grayscale", "grayscale"), ("colour_normalised", "colour-normalised"),
           ("hed_jitter_0.2", "HED 0.2"), ("white_balance_cool", "cool white balance"),
           ("background_flattened", "background flattened")]

#: Collected too, shown in "What the model reads": the scale-bar label corner against its control corner.
LABEL_KEYS = ("label_corner_covered", "control_corner_covered")

GOALS = {"bvm_grayscale": 0.97, "bvm_colour_normalised": 0.97, "clean": 0.99}


def train_cmd(variant: dict, runs: Path, manifest: Path) -> list[str]:
    return ["leukoedge", "train", "--data", str(DATA), "--manifest", str(manifest), *COMMON,
            "--epochs", str(variant.get("epochs", EPOCHS)), *variant["args"],
            "--ood", str(OOD), "--out", str(runs / variant["run"])]


def leukoedge(argv: list[str]) -> int:
    print("+ " + " ".join(argv), file=sys.stderr, flush=True)
    return subprocess.call([sys.executable, "-m", "leukoedge.cli", *argv[1:]], cwd=REPO)


def ci(fig: dict | None) -> str:
    if not fig:
        return "n/a"
    return f"{fig['value']:.1%} [{fig['low']:.1%}, {fig['high']:.1%}]"


def pct(fig: dict | None) -> str:
    return "n/a" if not fig else f"{fig['value']:.1%}"


def collect(variant: dict, run: Path, work: Path, convert: bool) -> dict:
    audit = json.loads((run / "audit.json").read_text())
    metrics = json.loads((run / "metrics.json").read_text())
    pert = audit["perturbations"]
    row = dict(variant, run_dir=str(run), split_kind=metrics["split_kind"], n_test=metrics["n"],
               accuracy=metrics["accuracy"], macro_f1=metrics["macro_f1"],
               macro_f1_ci=[metrics["intervals"]["macro_f1"]["low"], metrics["intervals"]["macro_f1"]["high"]],
               colour_baseline=audit["colour_baseline"], heatmap=audit.get("heatmap"), perturbations={})
    for key in [k for k, _ in COLUMNS] + list(LABEL_KEYS):
        if key in pert:
            row["perturbations"][key] = {"accuracy": pert[key]["accuracy"],
                                         "benign_vs_malignant": pert[key].get("benign_vs_malignant_accuracy")}
    if convert:
        bundle = work / variant["name"]
        if not (bundle / "parity.json").exists():
            leukoedge(["leukoedge", "convert", str(run), "--quantize", "int8", "--with-heatmap", "--force",
                       *[a for d in OOD_SETS for a in ("--ood-dir", str(d))], "--out", str(bundle)])
        if (bundle / "parity.json").exists():
            p = json.loads((bundle / "parity.json").read_text())
            row["int8"] = {k: p[k] for k in ("float_accuracy", "quant_accuracy", "delta_accuracy", "agreement", "passed")}
        if (bundle / "trust.json").exists():
            ab = json.loads((bundle / "trust.json").read_text())["abstention"]
            row["abstention"] = {"test_abstain_rate": ab["test_abstain_rate"],
                                 "auroc": {name: f["auroc"] for name, f in ab.get("ood", {}).items()}}
    return row


def committed_rows() -> dict[str, dict]:
    """Rows of the committed results by variant name (for variants not re-run now)."""
    path = RESULTS / "robustness.json"
    if not path.exists():
        return {}
    data = json.loads(path.read_text())
    date = data.get("machine", {}).get("date_utc", "")[:10]
    return {r["name"]: {**r, "measured": r.get("measured") or date} for r in data.get("rows", [])}


def goal_lines(row: dict) -> list[str]:
    p = row["perturbations"]
    checks = [
        ("benign-vs-malignant on grayscale", p.get("grayscale", {}).get("benign_vs_malignant"), GOALS["bvm_grayscale"]),
        ("benign-vs-malignant on colour-normalised", p.get("colour_normalised", {}).get("benign_vs_malignant"),
         GOALS["bvm_colour_normalised"]),
        ("four-class accuracy, clean", p.get("clean", {}).get("accuracy"), GOALS["clean"]),
    ]
    out = []
    for what, fig, goal in checks:
        if fig is None:
            out.append(f"{what}: not measured")
        else:
            out.append(f"{what} {fig['value']:.1%} {'>=' if fig['value'] >= goal else '<'} {goal:.0%}")
    if "int8" in row:
        out.append("int8 parity gate " + ("passed" if row["int8"]["passed"] else "FAILED")
                   + f" (agreement {row['int8']['agreement']:.4f})")
    return out


def label_cell(row: dict) -> str:
    """Accuracy with the scale-bar corner covered, then with the control corner covered."""
    figs = [row["perturbations"].get(k, {}).get("accuracy") for k in LABEL_KEYS]
    return "not measured" if None in figs else " / ".join(ci(f) for f in figs)


def markdown(rows: list[dict]) -> str:
    lines = [
        "Research use only; not a diagnostic device.",
        "",
        f"Data: `taleqani-all/Original`, capture-block split (the Taleqani benchmark's block manifest); every figure "
        f"is on its test split ({rows[0]['n_test'] if rows else '?'} images) with a 95 % bootstrap interval. "
        "Same net (leuko-small, 160 px), 24 epochs unless the variant says otherwise; only the training recipe differs. Perturbations are applied "
        "to the resized image BEFORE the run's own colour step, as a camera or stain change would be.",
        "",
        "## Four-class accuracy under perturbations",
        "",
        "| variant | colour step | augmentation | " + " | ".join(label for _, label in COLUMNS) + " | macro-F1 (clean) |",
        "|---|---|---|" + "---|" * len(COLUMNS) + "---|",
    ]
    for r in rows:
        cells = [ci(r["perturbations"].get(k, {}).get("accuracy")) for k, _ in COLUMNS]
        lines.append(f"| {r['name']} | {r['colour']} | {r['augment']} | " + " | ".join(cells) + f" | {r['macro_f1']:.4f} |")
    lines += ["", "## Benign versus malignant (Benign against any B-ALL subtype)", "",
              "| variant | " + " | ".join(label for _, label in COLUMNS) + " |", "|---|" + "---|" * len(COLUMNS)]
    for r in rows:
        cells = [ci(r["perturbations"].get(k, {}).get("benign_vs_malignant")) for k, _ in COLUMNS]
        lines.append(f"| {r['name']} | " + " | ".join(cells) + " |")
    lines += ["", "## What the model reads", "",
              "| variant | colour-only baseline (histograms) | colour-only (6 numbers) | heatmap mass on white cells | "
              "white-cell area (chance) | scale-bar corner covered / same area bottom-left | int8 parity | "
              "int8 abstention: test abstained, OOD AUROC |",
              "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cb = r["colour_baseline"]
        hm = r.get("heatmap") or {}
        mass, chance = hm.get("mass_on_cells"), hm.get("chance")
        int8 = r.get("int8")
        ab = r.get("abstention")
        parity = "not converted" if not int8 else (
            f"{'passed' if int8['passed'] else 'FAILED'}: {int8['float_accuracy']:.2%} -> {int8['quant_accuracy']:.2%}, "
            f"agreement {int8['agreement']:.4f}")
        lines.append(f"| {r['name']} | {ci(cb.get('histogram', {}).get('accuracy'))} | "
                     f"{ci(cb.get('mean_std', {}).get('accuracy'))} | {ci(mass)} | {ci(chance)} | {label_cell(r)} | "
                     f"{parity} | "
                     + ("n/a" if not ab else f"{ab['test_abstain_rate']:.1%}; " + ", ".join(
                         f"{k} {v:.3f}" for k, v in ab["auroc"].items() if v is not None)) + " |")
    lines += ["", "The colour-only baselines (logistic regression on colour histograms, or on six numbers: per-channel "
              "mean and spread) are fitted on the raw training pixels of the same split, so they are the same for every "
              "variant: what colour alone achieves on this split. Heatmap mass: share of the class activation map "
              "inside the white-cell mask; a map spread evenly would score the mask's area (chance). Scale-bar "
              "corner: every Taleqani image has a burnt-in scale-bar label bottom-right, drawn differently per "
              "capture session; covering that corner (18 % x 30 % of the image) with the background colour against "
              "covering the same area bottom-left says whether a net reads the label (rows measured before the "
              "check existed say 'not measured').", "",
              "The `cells` and `background-swap` recipes build their training images with the same white-cell mask "
              "that the background-flattened column and the heatmap mass use: a net taught to ignore what lies outside "
              "that mask is favoured by both measures, so read them together with the clean and grayscale columns.", "",
              "## Variants", ""]
    whats = {v["name"]: v["what"] for v in VARIANTS}
    for r in rows:
        lines.append(f"- **{r['name']}**: {whats.get(r['name'], r.get('what', ''))}")
    lines += ["", "## Goals (issue 7)", ""]
    for r in rows:
        lines.append(f"- **{r['name']}**: " + "; ".join(goal_lines(r)))
    lines += ["", "## Commands", ""]
    for r in rows:
        lines.append(f"- {r['name']} (measured {r.get('measured', '?')}): `{r['train_command']}` then "
                     f"`leukoedge eval {r['run_dir']} --audit`")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=Path, default=Path("/work/runs"))
    p.add_argument("--manifest", type=Path, help="block-split manifest (default RUNS/taleqani-manifest-block.json)")
    p.add_argument("--train", action="store_true", help="train variants whose run dir is missing")
    p.add_argument("--convert", action="store_true", help="convert each variant to int8 through the parity gate")
    p.add_argument("--work", type=Path, default=Path("/tmp/leukoedge-robustness"), help="bundles go here")
    p.add_argument("--only", nargs="*", help="variant names (default: all)")
    p.add_argument("--reaudit", action="store_true", help="run the audit again even if audit.json exists")
    args = p.parse_args()
    manifest = args.manifest or args.runs / "taleqani-manifest-block.json"
    if not DATA.is_dir() or not manifest.exists():
        print(f"needs {DATA} and {manifest} (made by benchmarks/taleqani_zoo.py)", file=sys.stderr)
        return 1
    rows = []
    committed = committed_rows()
    for variant in VARIANTS:
        if args.only and variant["name"] not in args.only:
            if variant["name"] in committed:
                rows.append(committed[variant["name"]])
            continue
        run = args.runs / variant["run"]
        cmd = train_cmd(variant, args.runs, manifest)
        if not (run / "metrics.json").exists():
            if not args.train:
                if variant["name"] in committed:
                    print(f"{variant['name']}: {run} absent, keeping the committed row", file=sys.stderr)
                    rows.append(committed[variant["name"]])
                else:
                    print(f"skip {variant['name']}: {run} not trained (use --train)", file=sys.stderr)
                continue
            if leukoedge(cmd) != 0:
                print(f"training {variant['name']} failed", file=sys.stderr)
                continue
        if args.reaudit or not (run / "audit.json").exists():
            if leukoedge(["leukoedge", "eval", str(run), "--audit", "--ood", str(OOD)]) != 0:
                print(f"audit of {variant['name']} failed", file=sys.stderr)
                continue
        rows.append(dict(collect(variant, run, args.work, args.convert), train_command=" ".join(cmd),
                         measured=time.strftime("%Y-%m-%d", time.gmtime())))
    if not rows:
        print("no finished variant to report", file=sys.stderr)
        return 1
    write_results("robustness", {"rows": rows, "goals": GOALS}, markdown(rows),
                  "Robustness: training that does not take the colour shortcut (Taleqani, block split)")
    return 0


if __name__ == "__main__":
    main_guard(main)
