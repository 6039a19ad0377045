#!/usr/bin/env python3
"""Does the shipped backbone help a lab with few images? From scratch vs ``--init leukoedge-smear`` (issue 18).

    python benchmarks/transfer.py --manifest MANIFEST.json --data TALEQANI_ROOT --pbc PBC_ROOT --work DIR
                                  [--fractions 0.10 0.25] [--folds 5] [--tasks pbc taleqani]
                                  [--extra-arms mixup cutmix] [--extra-tasks pbc]

Two tasks, each trained twice per fold with the same options except the
initial weights (``leukoedge train --model leuko-small --no-audit``; the
pretrained arm adds ``--init leukoedge-smear``; learning rate, epochs and
augmentation are the model's defaults in both):

* **pbc** (cross-lab): the 8 normal cell types x 40 single-cell crops of
  ``ood/pbc-cells`` (another lab, another stain, another magnification; the
  backbone never saw them), 5-fold cross-validation by the product itself
  (``leukoedge train --data PBC --folds 5``: capture-order blocks, val before
  each test block). Figure: test accuracy per fold, mean +- sd, pooled.
* **taleqani-F** (small lab data of the same kind): a stratified random
  fraction F of the Taleqani TRAIN split of ``--manifest`` (seed 0), cut per
  class into 5 capture-order blocks; fold k validates on block k and trains on
  the other four; every fold is tested on the manifest's whole TEST block
  (390 images, capture-block split). NOT a transfer test in the strict sense:
  the backbone was trained on the whole train split with labels, so the
  subsets' images are images it has seen; it measures what a lab gets from
  starting at our backbone when its data resembles ours (an upper bound).
  PBC is the honest transfer figure.

``--extra-arms`` adds recipes trained from scratch on the same folds of the
``--extra-tasks`` (default pbc), each compared with the scratch arm fold by
fold in a second table: ``mixup`` / ``cutmix`` (``--mix``, at its defaults),
the small-data regularisers a lab would try before a backbone. ``--arm
NAME=OPTIONS`` (repeatable) adds any other arm the same way, e.g. another
backbone file or a lower fine-tuning rate:
``--arm "smear-lr5e-4=--init leukoedge-smear --lr 5e-4"``.

Runs are cached under ``--work`` (a finished run is read, not retrained);
the arms of each fold run back to back so an interrupted benchmark still
gives paired folds. Writes benchmarks/results/transfer.{md,json}.
"""
from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
from pathlib import Path

from _common import RESULTS, run, write_results

from leukoedge.bench.machine import machine_info
from leukoedge.data.records import Manifest, ManifestEntry

ARMS = {"scratch": [], "leukoedge-smear": ["--init", "leukoedge-smear"]}
#: Recipes compared with the scratch arm on the same folds (``--extra-arms``).
EXTRA_ARMS = {"mixup": ["--mix", "mixup"], "cutmix": ["--mix", "cutmix"]}
BASE = ["--model", "leuko-small", "--no-audit"]


def parse_arm(text: str) -> tuple[str, list[str]]:
    """``NAME=OPTIONS`` of ``--arm``: the arm's name and the options it adds to the scratch command."""
    name, sep, options = text.partition("=")
    name = name.strip()
    if not sep or not name or not options.strip() or name in ARMS or "/" in name:
        raise argparse.ArgumentTypeError(f"--arm wants NAME=OPTIONS with a new name (no '/'), e.g. "
                                         f"'lr5e-4=--init leukoedge-smear --lr 5e-4'; got {text!r}")
    return name, shlex.split(options)


def train_cmd(*args) -> list[str]:
    return [sys.executable, "-m", "leukoedge", "train", *BASE, *map(str, args)]


def subset_folds(manifest: Manifest, fraction: float, folds: int, seed: int = 0) -> list[Manifest]:
    """Fold manifests of a stratified ``fraction`` of the train split; val rotates, test is the whole test split."""
    import numpy as np

    rng = np.random.default_rng(seed)
    chosen: dict[str, list[ManifestEntry]] = {}
    for label in manifest.classes:
        pool = [e for e in manifest.subset("train") if e.label == label]
        n = max(folds, round(fraction * len(pool)))
        picked = sorted(rng.choice(len(pool), size=n, replace=False))
        chosen[label] = sorted((pool[i] for i in picked), key=lambda e: (e.order is None, e.order, e.path))
    out = []
    for k in range(folds):
        entries = []
        for label, items in chosen.items():
            blocks = np.array_split(np.arange(len(items)), folds)
            val = set(blocks[k].tolist())
            entries += [ManifestEntry(e.path, e.label, e.group, e.order, e.root, split="val" if i in val else "train")
                        for i, e in enumerate(items)]
        entries += list(manifest.subset("test"))
        out.append(Manifest(root=manifest.root, layout=manifest.layout, classes=manifest.classes,
                            split_kind=manifest.split_kind, seed=seed, entries=tuple(entries),
                            params={**manifest.params, "subset": f"{fraction:g} of the train split, stratified, "
                                    f"seed {seed}", "fold": k + 1, "folds": folds,
                                    "val": f"capture-order block {k + 1} of {folds} of the subset",
                                    "test": "the whole test split of the source manifest"}))
    return out


def run_taleqani(args, fraction: float) -> dict:
    source = Manifest.load(args.manifest)
    task = args.work / f"taleqani-{round(100 * fraction)}"
    folds = subset_folds(source, fraction, args.folds)
    arms = arms_of(args, task.name)
    rows: dict[str, list[dict]] = {arm: [] for arm in arms}
    for k, manifest in enumerate(folds, 1):
        path = task / "folds" / f"fold-{k}.json"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            manifest.save(path)
        for arm, extra in arms.items():
            out = task / arm / f"fold-{k}"
            if not (out / "metrics.json").exists():
                run(train_cmd("--manifest", path, "--data", args.data, "--um-per-px", args.um_per_px, *extra,
                              "--out", out))
            rows[arm].append(fold_row(out, k, audit=task.name in args.audit))
    counts = folds[0].counts()
    return {"task": task.name, "fraction": fraction, "n_subset": sum(counts["train"].values()) + sum(
        counts["val"].values()), "n_test": sum(counts["test"].values()), "arms": summarise(rows), "options": arms}


def run_pbc(args) -> dict:
    rows: dict[str, list[dict]] = {}
    arms = arms_of(args, "pbc")
    for arm, extra in arms.items():
        out = args.work / "pbc" / arm
        if not (out / "cv.json").exists() or not json.loads((out / "cv.json").read_text()).get("complete"):
            resume = ["--resume"] if (out / "cv_config.json").exists() else ["--data", args.pbc, "--folds", args.folds]
            run(train_cmd(*resume, *extra, "--out", out))
        rows[arm] = [fold_row(out / f"fold-{k}", k, audit="pbc" in args.audit) for k in range(1, args.folds + 1)]
    cv = json.loads((args.work / "pbc" / "scratch" / "cv.json").read_text())
    return {"task": "pbc", "fraction": None, "n_subset": cv["pooled"]["n"], "n_test": cv["pooled"]["n"],
            "split_kind": cv.get("split_kind"), "arms": summarise(rows), "options": arms}


def arms_of(args, task: str) -> dict[str, list[str]]:
    """The arms trained on ``task``: scratch and the backbone, plus ``--extra-arms`` and ``--arm`` where
    ``--extra-tasks`` names it."""
    wanted = task in args.extra_tasks or task.split("-")[0] in args.extra_tasks
    extra = {**{a: EXTRA_ARMS[a] for a in args.extra_arms}, **dict(args.arm)}
    return {**ARMS, **(extra if wanted else {})}


def fold_row(run_dir: Path, k: int, audit: bool = False) -> dict:
    """One fold's figures; ``audit``: run the shortcut audit first where the run has none (grayscale column)."""
    if audit and not (run_dir / "audit.json").exists():
        run([sys.executable, "-m", "leukoedge", "eval", run_dir, "--audit"])
    test = json.loads((run_dir / "metrics.json").read_text())
    history = json.loads((run_dir / "history.json").read_text())
    config = json.loads((run_dir / "config.json").read_text())
    counts = json.loads((run_dir / "manifest.json").read_text())
    n_train = sum(e["split"] == "train" for e in counts["entries"])
    report = json.loads((run_dir / "audit.json").read_text()) if (run_dir / "audit.json").exists() else {}
    grayscale = ((report.get("perturbations") or {}).get("grayscale") or {}).get("accuracy") or {}
    return {"fold": k, "accuracy": test["accuracy"], "macro_f1": test["macro_f1"], "n_test": test["n"],
            "grayscale": grayscale.get("value"), "n_train": n_train, "kept_epoch": history.get("kept_epoch"), "epochs_run": history.get("epochs_run"),
            "train_seconds": history.get("train_seconds"), "learning_rate": config["learning_rate"],
            "init": (config["extra"].get("init") or {}).get("sha256")}


def summarise(rows: dict[str, list[dict]]) -> dict:
    out = {}
    for arm, folds in rows.items():
        acc = [f["accuracy"] for f in folds]
        out[arm] = {"folds": folds, "accuracy_mean": statistics.fmean(acc),
                    "accuracy_sd": statistics.stdev(acc) if len(acc) > 1 else None,
                    "train_seconds_mean": statistics.fmean(f["train_seconds"] or 0 for f in folds),
                    "grayscale_mean": statistics.fmean(g) if (g := [f["grayscale"] for f in folds
                                                                    if f["grayscale"] is not None]) and
                    len(g) == len(folds) else None}
    scratch, init = (rows.get(a) for a in ARMS)
    if scratch and init:
        out["gain"] = gain(scratch, init)
    extras = {arm: gain(scratch, folds) for arm, folds in rows.items() if arm not in ARMS and scratch}
    if extras:
        out["extra_gains"] = extras
    return out


def gain(scratch: list[dict], other: list[dict]) -> dict:
    """``other`` minus ``scratch``, fold by fold (the same folds): mean, sd, and how many folds it wins."""
    diffs = [b["accuracy"] - a["accuracy"] for a, b in zip(scratch, other)]
    return {"mean": statistics.fmean(diffs), "sd": statistics.stdev(diffs) if len(diffs) > 1 else None,
            "per_fold": diffs, "folds_better": sum(d > 0 for d in diffs), "folds": len(diffs)}


def pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}"


def markdown(tasks: list[dict]) -> str:
    lines = ["leuko-small at the model's defaults (40 epochs max, patience 8, lr 2e-3, default augmentation), Keras "
             "test accuracy (mean +- sd over 5 folds); the same folds for both arms, which differ only in their "
             "initial weights.", "",
             "- **pbc** (the transfer test): ood/pbc-cells, 8 normal cell types x 40 single-cell crops from another "
             "lab, which the backbone never saw; 5-fold capture-order-block CV by `leukoedge train --folds 5`.",
             "- **taleqani-F** (NOT a transfer test): a stratified F of the Taleqani capture-block TRAIN split; fold k "
             "validates on capture-order block k of the subset and trains on the rest; every fold is tested on the "
             "whole 390-image TEST block. The backbone was trained on that whole train split with labels, so these "
             "are images it has seen: an upper bound for a lab whose fields resemble Taleqani's.",
             "", "| task | images (pbc: all 320, each tested once; taleqani: the subset) | test images per fold | from scratch | `--init leukoedge-smear` "
             "| gain (points, mean +- sd over folds) | folds better | grayscale test copies (audit), scratch / init "
             "| mean training time, scratch / init |",
             "|---|---|---|---|---|---|---|---|---|"]
    for t in tasks:
        a, b, g = t["arms"]["scratch"], t["arms"]["leukoedge-smear"], t["arms"]["gain"]
        test = t["n_test"] // 5 if t["task"] == "pbc" else t["n_test"]
        lines.append(f"| {t['task']} | {t['n_subset']} | {test} | {pct(a['accuracy_mean'])} +- {pct(a['accuracy_sd'])} "
                     f"| {pct(b['accuracy_mean'])} +- {pct(b['accuracy_sd'])} | {pct(g['mean'])} +- {pct(g['sd'])} "
                     f"| {g['folds_better']} of {g['folds']} | {pct(a['grayscale_mean'])} / {pct(b['grayscale_mean'])} "
                     f"| {a['train_seconds_mean']:.0f} s / "
                     f"{b['train_seconds_mean']:.0f} s |")
    lines += ["", "Per fold (test accuracy %, kept epoch / epochs run):", ""]
    for t in tasks:
        lines.append(f"- {t['task']}: " + "; ".join(
            f"fold {a['fold']}: {pct(a['accuracy'])} ({a['kept_epoch']}/{a['epochs_run']}) -> "
            f"{pct(b['accuracy'])} ({b['kept_epoch']}/{b['epochs_run']})"
            for a, b in zip(t["arms"]["scratch"]["folds"], t["arms"]["leukoedge-smear"]["folds"])))
    extra = [t for t in tasks if t["arms"].get("extra_gains")]
    if extra:
        lines += ["", "Other small-data recipes on the same folds (`--extra-arms`, `--arm`; each arm adds only its "
                  "options to the scratch command):", "",
                  "| task | arm | option | accuracy | gain over scratch (points, mean +- sd over folds) | folds better "
                  "| per fold (test accuracy %, kept epoch / epochs run) | mean training time |",
                  "|---|---|---|---|---|---|---|---|"]
        for t in extra:
            for arm, g in t["arms"]["extra_gains"].items():
                a = t["arms"][arm]
                options = (t.get("options") or {}).get(arm, EXTRA_ARMS.get(arm, []))
                per_fold = "; ".join(f"{pct(f['accuracy'])} ({f['kept_epoch']}/{f['epochs_run']})" for f in a["folds"])
                lines.append(f"| {t['task']} | {arm} | `{shlex.join(options)}` | {pct(a['accuracy_mean'])} +- "
                             f"{pct(a['accuracy_sd'])} | {pct(g['mean'])} +- {pct(g['sd'])} | {g['folds_better']} of "
                             f"{g['folds']} | {per_fold} | {a['train_seconds_mean']:.0f} s |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--manifest", type=Path, required=True, help="Taleqani capture-block manifest (the backbone's)")
    ap.add_argument("--data", type=Path, required=True, help="where its root is now")
    ap.add_argument("--pbc", type=Path, required=True, help="ood/pbc-cells (8 class folders)")
    ap.add_argument("--work", type=Path, required=True, help="run cache")
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.10, 0.25])
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--tasks", nargs="+", choices=("pbc", "taleqani"), default=["pbc", "taleqani"])
    ap.add_argument("--um-per-px", type=float, default=0.401, help="the Taleqani training scale (skips measuring)")
    ap.add_argument("--audit", nargs="*", default=[], metavar="TASK",
                    help="also run `leukoedge eval RUN --audit` on every fold run of these tasks (e.g. taleqani-10): "
                         "the grayscale column")
    ap.add_argument("--extra-arms", nargs="*", default=[], choices=sorted(EXTRA_ARMS),
                    help="also train these recipes from scratch on the same folds (second table)")
    ap.add_argument("--arm", type=parse_arm, action="append", default=[], metavar="NAME=OPTIONS",
                    help="another arm: these `leukoedge train` options added to the scratch command (repeatable; "
                         "second table), e.g. 'cells=--init /path/backbone.npz'")
    ap.add_argument("--extra-tasks", nargs="*", default=["pbc"], metavar="TASK",
                    help="the tasks the extra arms run on: pbc, taleqani, or taleqani-10 (default: pbc)")
    ap.add_argument("--name", default="transfer", help="results file name (NAME.md, NAME.json)")
    ap.add_argument("--title", default="Transfer: from scratch vs the shipped backbone (leuko-small)")
    ap.add_argument("--out-dir", type=Path, default=RESULTS, help="where transfer.{md,json} go")
    args = ap.parse_args()
    tasks = []
    if "pbc" in args.tasks:
        tasks.append(run_pbc(args))
    if "taleqani" in args.tasks:
        tasks += [run_taleqani(args, f) for f in args.fractions]
    write_results(args.name, {"machine": machine_info(), "tasks": tasks}, markdown(tasks),
                  args.title, args.out_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
