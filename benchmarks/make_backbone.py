#!/usr/bin/env python3
"""Make the shipped pretrained backbone (``leukoedge train --init leukoedge-smear``), reproducibly.

    python benchmarks/make_backbone.py --manifest MANIFEST.json --data TALEQANI_ROOT --run RUN_DIR \
        [--out src/leukoedge/models/weights/leukoedge-smear-v1.npz]
    python benchmarks/make_backbone.py ... --augment cells --name NAME --out NAME.npz   # an experiment

1. Trains (or, when ``RUN_DIR`` already holds a finished run, checks) leuko-small
   with the backbone recipe below on the manifest's TRAIN split only:
   ``leukoedge train --model leuko-small --augment robust --scale-jitter 0.15
   --epochs 24 --seed 0 --no-audit``. Robust augmentation (colour, stain,
   grayscale, geometry) and the scale jitter make features that do not read
   one lab's stain, which a backbone meant for other labs needs; supervised
   on the four Taleqani classes (the sizes this machine can train in ~12 min).
   Training is deterministic on one machine (op determinism), so the same
   command gives the same weights there; another CPU gives a close but not
   bit-equal net (oneDNN summation order), hence the SHA-256 in every card.
2. Exports every layer but the classifier with its provenance: which data
   (counts per class, the split kind, how many val/test images were held
   out), what was excluded (``../shared/datasets/ood/`` is never read, so
   abstention stays honestly tested against it), the command, and the
   run's own block-split test figures.

``--augment cells`` makes an experimental backbone (never the shipped file):
the same recipe with background swaps and cell-centred crops (cells shown
1.4-2.5x larger), to test whether features learnt at single-cell zoom
transfer better to single-cell crops such as PBC's.

An existing run is accepted only when its config is the recipe's and its
training entries are the manifest's, so the file always matches its record.
"""
from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import subprocess
import sys
from pathlib import Path

from _common import REPO, run

from leukoedge.data.records import Manifest

RECIPE = {"model": "leuko-small", "augment": "robust", "scale_jitter": 0.15, "epochs": 24, "seed": 0}
#: ``--augment`` variants a backbone experiment may try (the shipped file is made with ``robust``).
AUGMENTS = ("robust", "cells")
NAME, VERSION = "leukoedge-smear", 1
DEFAULT_OUT = REPO / "src" / "leukoedge" / "models" / "weights" / f"{NAME}-v{VERSION}.npz"


def recipe_options(recipe: dict) -> list[str]:
    return ["--model", recipe["model"], "--augment", recipe["augment"], "--scale-jitter", str(recipe["scale_jitter"]),
            "--epochs", str(recipe["epochs"]), "--seed", str(recipe["seed"]), "--no-audit"]


def train_command(args, recipe: dict) -> list[str]:
    return [sys.executable, "-m", "leukoedge", "train", "--manifest", str(args.manifest), "--data", str(args.data),
            *recipe_options(recipe), "--out", str(args.run)]


def check_run(run_dir: Path, manifest: Manifest, recipe: dict = RECIPE) -> tuple[dict, dict]:
    """(config, history) of a finished run made by the recipe on the manifest's train split; else exit."""
    config = json.loads((run_dir / "config.json").read_text())
    history = json.loads((run_dir / "history.json").read_text())
    aug = config["augmentation"]
    got = {"model": config["model"], "augment": aug["recipe"], "scale_jitter": aug.get("scale_jitter", 0.0),
           "epochs": config["epochs"], "seed": config["seed"]}
    if got != recipe:
        raise SystemExit(f"{run_dir} was not trained with the backbone recipe: {got} vs {recipe}")
    if (config["extra"].get("init")):
        raise SystemExit(f"{run_dir} was itself initialised from a backbone; the recipe trains from scratch")
    if train_entries(Manifest.load(run_dir / "manifest.json")) != train_entries(manifest):
        raise SystemExit(f"{run_dir}'s training split is not the manifest's")
    return config, history


def train_entries(manifest: Manifest) -> list[tuple[str, str]]:
    return sorted((e.path, e.label) for e in manifest.subset("train"))


def git_commit() -> str | None:
    proc = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True)
    return proc.stdout.strip() or None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--manifest", type=Path, required=True, help="split manifest (capture-block split of Taleqani)")
    ap.add_argument("--data", type=Path, required=True, help="where the manifest's root is now")
    ap.add_argument("--run", type=Path, required=True, help="run directory: trained here unless it holds the run")
    ap.add_argument("--out", type=Path, default=None, help=f"default: {DEFAULT_OUT.relative_to(REPO)} (the shipped "
                    "file; only for the shipped recipe)")
    ap.add_argument("--augment", choices=AUGMENTS, default=RECIPE["augment"],
                    help="augmentation recipe of an experimental backbone (the shipped one: robust)")
    ap.add_argument("--name", default=NAME, help="the backbone's recorded name (an experiment's own)")
    args = ap.parse_args()
    recipe = {**RECIPE, "augment": args.augment}
    if args.out is None:
        if recipe != RECIPE or args.name != NAME:
            raise SystemExit("an experimental backbone needs its own --out (the default is the shipped file)")
        args.out = DEFAULT_OUT
    manifest = Manifest.load(args.manifest)
    if manifest.leaky:
        raise SystemExit("the backbone's held-out figures need a non-leaky split (block or group)")
    if not (args.run / "history.json").exists():
        run(train_command(args, recipe))
    config, history = check_run(args.run, manifest, recipe)

    import keras

    from leukoedge.models.pretrained import export_backbone, load_backbone

    model = keras.models.load_model(args.run / "model.keras", compile=False)
    metrics = {s: json.loads(p.read_text()) for s, name in (("val", "metrics_val.json"), ("test", "metrics.json"))
               if (p := args.run / name).exists()}
    counts = {split: {c: n for c, n in per_class.items() if n} for split, per_class in manifest.counts().items()}
    train_counts = counts["train"]
    meta = {
        "name": args.name, "version": VERSION, "model": config["model"], "input_size": config["input_size"],
        "colour": config["colour"], "classes_trained_on": config["classes"],
        "provenance": {
            "data": f"Taleqani ALL smear fields (Ghaderzadeh et al. 2022), the TRAIN split only of a "
                    f"{manifest.split_kind} split (seed {manifest.seed}): {sum(train_counts.values())} images, "
                    + ", ".join(f"{k} {v}" for k, v in sorted(train_counts.items())),
            "held_out": f"{sum(counts['val'].values())} val and {sum(counts['test'].values())} "
                        "test images of that split (never trained on)",
            "excluded": "no out-of-distribution images (../shared/datasets/ood/: BCCD, PBC) and no synthetic smears",
            "labels": "supervised, 4 classes: " + ", ".join(config["classes"]),
            "train_entries_sha256": hashlib.sha256(json.dumps(train_entries(manifest)).encode()).hexdigest(),
        },
        "trained_with": {
            "command": " ".join(["leukoedge train", *recipe_options(recipe),
                                 "--manifest MANIFEST --data ROOT --out RUN"]),
            "made_by": "benchmarks/make_backbone.py", "commit": git_commit(),
            "epochs_run": history.get("epochs_run"), "kept_epoch": history.get("kept_epoch"),
            "train_seconds": history.get("train_seconds"), "devices": history.get("devices"),
            "tensorflow": config["extra"].get("tensorflow_version"), "made": dt.date.today().isoformat(),
        },
        "figures": {s: {"accuracy": round(m["accuracy"], 4), "n": m["n"], "split_kind": m.get("split_kind")}
                    for s, m in metrics.items()},
    }
    path = export_backbone(model, args.out, meta)
    backbone = load_backbone(path)
    print(f"wrote {path} ({path.stat().st_size / 1024:.0f} KB, {len(backbone.weights)} layers, "
          f"sha256 {backbone.sha256[:16]}...)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
