#!/usr/bin/env python3
"""Which images do several models get wrong: the errors they share, and what they would cost a 99 % goal.

    python benchmarks/error_overlap.py --run NAME=RUN_DIR --run NAME=RUN_DIR ... [--split test]
                                       [--sheet-max 30] [--name error_overlap] [--out-dir DIR]

Reads each run's ``predictions.csv`` (``leukoedge eval RUN_DIR`` writes it: the
Keras model's answer on every image of the split) and lines the runs up image
by image; every run must have been evaluated on the same images (the same
manifest). Why: a 4-class accuracy of 98 % on 390 test images is 8 errors, and
whether a better recipe can remove them depends on whether they are the same
images for every recipe and seed (ambiguous or mislabelled fields, a capture
batch unlike the training blocks) or different ones (noise a recipe or an
ensemble can average away).

Writes benchmarks/results/<name>.{md,json} and <name>.png, a contact sheet of
the images most runs get wrong (the original files, with their label and the
runs' answers). Figures: each run's accuracy and errors; how many images are
wrong in exactly k of the n runs; the accuracy of the runs' mean probability
(their ensemble, in float) and of an oracle that is right whenever any run is;
and every image all runs get wrong. Needs matplotlib and Pillow, not TensorFlow.
"""
from __future__ import annotations

import argparse
import math
from collections import Counter
from pathlib import Path

import numpy as np
from _common import RESULTS, main_guard, write_results

from leukoedge.data.records import Manifest
from leukoedge.errors import RunError, UsageError
from leukoedge.train.predictions import read_predictions
from leukoedge.train.rundir import RunDir

SHEET_PX = 256


def parse_run(text: str) -> tuple[str, Path]:
    """``NAME=RUN_DIR`` -> (name, path); :class:`UsageError` for anything else."""
    name, sep, path = text.partition("=")
    if not sep or not name.strip() or not path.strip():
        raise UsageError(f"--run {text!r}: expected NAME=RUN_DIR")
    return name.strip(), Path(path.strip())


def load_runs(runs: list[tuple[str, Path]], split: str) -> tuple[list[str], list, np.ndarray, list[str]]:
    """``(names, images (root, path, label), probabilities [runs, images, classes], classes)`` in one image order."""
    if len(runs) < 2:
        raise UsageError("give at least two --run NAME=RUN_DIR: overlap needs more than one model")
    names = [n for n, _ in runs]
    if len(set(names)) != len(names):
        raise UsageError(f"--run names repeat: {', '.join(names)}")
    tables, classes = [], None
    for name, run in runs:
        rows = read_predictions(RunDir(run).predictions_path(split))
        if not rows:
            raise RunError(f"{run}: its {split} predictions are empty")
        run_classes = list(rows[0].probabilities)
        if classes is not None and run_classes != classes:
            raise UsageError(f"{name} has classes {run_classes}, {names[0]} has {classes}: not the same task")
        classes = run_classes
        tables.append({r.key: r for r in rows})
    keys = list(tables[0])
    for name, table in zip(names[1:], tables[1:]):
        if set(table) != set(keys):
            raise UsageError(f"{name} was evaluated on other {split} images than {names[0]} "
                             f"({len(set(table) ^ set(keys))} differ): use runs made on the same manifest")
        labels = [table[k].label for k in keys]
        if labels != [tables[0][k].label for k in keys]:
            raise UsageError(f"{name} labels the same images differently from {names[0]}")
    images = [(k[0], k[1], tables[0][k].label) for k in keys]
    probs = np.array([[[t[k].probabilities[c] for c in classes] for k in keys] for t in tables], dtype=np.float64)
    return names, images, probs, classes


def aligned_answers(images: list, probs: np.ndarray, classes: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(labels [images], predicted [runs, images], wrong-run count [images])`` of the aligned probabilities."""
    y = np.array([classes.index(label) for _, _, label in images])
    predicted = probs.argmax(2)
    return y, predicted, (predicted != y[None, :]).sum(0)


def overlap(names: list[str], images: list, probs: np.ndarray, classes: list[str]) -> dict:
    """Every figure of the table (see the module docstring) from the aligned probabilities."""
    y, predicted, k = aligned_answers(images, probs, classes)
    wrong = predicted != y[None, :]
    n_runs, n = wrong.shape
    mean_pred = probs.mean(0).argmax(1)
    per_run = []
    for i, name in enumerate(names):
        recall = {c: float(np.mean(~wrong[i][y == j])) if np.any(y == j) else None for j, c in enumerate(classes)}
        per_run.append({"run": name, "accuracy": float(np.mean(~wrong[i])), "errors": int(wrong[i].sum()),
                        "recall": recall})
    by_k = []
    for j in range(n_runs + 1):
        sel = k == j
        by_k.append({"wrong_in": j, "images": int(sel.sum()),
                     "by_class": {c: int(np.sum(sel & (y == ci))) for ci, c in enumerate(classes)}})
    shared = []
    for idx in np.flatnonzero(k == n_runs):
        answers = [(names[i], classes[int(predicted[i, idx])], float(probs[i, idx].max())) for i in range(n_runs)]
        shared.append({"path": images[idx][1], "root": images[idx][0], "label": images[idx][2],
                       "answers": [{"run": r, "predicted": p, "confidence": round(c, 4)} for r, p, c in answers]})
    pairs = Counter()
    for idx in np.flatnonzero(k > n_runs / 2):
        votes = Counter(classes[int(p)] for p in predicted[:, idx] if p != y[idx])
        pairs[(images[idx][2], votes.most_common(1)[0][0])] += 1
    # at most 1 % of the split wrong: the errors a 99 % accuracy allows
    allowed = math.floor(0.01 * n + 1e-9)
    return {"n_images": n, "n_runs": n_runs, "classes": classes, "per_run": per_run, "by_wrong_count": by_k,
            "mean_probability_accuracy": float(np.mean(mean_pred == y)),
            "oracle_accuracy": float(np.mean(k < n_runs)), "wrong_in_all": shared,
            "errors_allowed_at_99": allowed,
            "majority_confusions": [{"label": a, "predicted": b, "images": c} for (a, b), c in pairs.most_common()]}


def reading(result: dict) -> list[str]:
    """Plain sentences, computed from the figures (never written by hand)."""
    n, runs, shared = result["n_images"], result["n_runs"], len(result["wrong_in_all"])
    allowed = result["errors_allowed_at_99"]
    lines = [f"{shared} of the {n} images {'is' if shared == 1 else 'are'} wrong in all {runs} runs; 99 % on this split allows {allowed} "
             f"errors in all, so {'these alone rule it out for every model here' if shared > allowed else 'a model could still reach 99 % if it fixed the rest'}."]
    lines.append(f"Right whenever any run is right (an oracle choosing among them): {100 * result['oracle_accuracy']:.1f} %; "
                 f"the runs' mean probability (their float ensemble): {100 * result['mean_probability_accuracy']:.1f} %; "
                 f"the best single run: {100 * max(r['accuracy'] for r in result['per_run']):.1f} %.")
    if result["majority_confusions"]:
        top = result["majority_confusions"][0]
        total = sum(c["images"] for c in result["majority_confusions"])
        lines.append(f"Of the {total} images most runs get wrong, {top['images']} are {top['label']} called "
                     f"{top['predicted']}.")
    return lines


def render(result: dict, names: list[str], sheet: str | None, split: str) -> str:
    classes = result["classes"]
    out = [f"Split `{split}` ({result['n_images']} images), each run's Keras model as `leukoedge eval` scored it "
           "(`predictions.csv`); the runs were evaluated on the same manifest.", "",
           "**Reading:**", ""] + [f"- {r}" for r in reading(result)] + ["",
           "| run | accuracy | errors | " + " | ".join(f"{c} recall" for c in classes) + " |",
           "|---|---|---|" + "---|" * len(classes)]
    for r in result["per_run"]:
        out.append(f"| {r['run']} | {100 * r['accuracy']:.1f} % | {r['errors']} | "
                   + " | ".join("n/a" if r["recall"][c] is None else f"{100 * r['recall'][c]:.1f} %" for c in classes)
                   + " |")
    out += ["", "Images wrong in exactly k of the runs:", "",
            "| wrong in | images | " + " | ".join(classes) + " |", "|---|---|" + "---|" * len(classes)]
    for b in result["by_wrong_count"]:
        out.append(f"| {b['wrong_in']} of {result['n_runs']} | {b['images']} | "
                   + " | ".join(str(b["by_class"][c]) for c in classes) + " |")
    if result["majority_confusions"]:
        out += ["", "Images wrong in more than half of the runs, by true label and the wrong answer most of them give:",
                "", "| true label | called | images |", "|---|---|---|"]
        out += [f"| {c['label']} | {c['predicted']} | {c['images']} |" for c in result["majority_confusions"]]
    if result["wrong_in_all"]:
        out += ["", "Wrong in every run:", "", "| image | label | " + " | ".join(names) + " |",
                "|---|---|" + "---|" * len(names)]
        for s in result["wrong_in_all"]:
            out.append(f"| `{s['path']}` | {s['label']} | "
                       + " | ".join(f"{a['predicted']} ({a['confidence']:.2f})" for a in s["answers"]) + " |")
    if sheet:
        out += ["", f"![images most runs get wrong]({sheet})", "",
                f"Contact sheet `{sheet}`: the images wrong in more than half of the runs (most runs wrong first), "
                "as captured; title: true label, how many runs are wrong, their commonest wrong answer."]
    out += ["", "Research use only; not a diagnostic device."]
    return "\n".join(out)


def contact_sheet(run: Path, images: list, probs: np.ndarray, classes: list[str], path: Path, limit: int) -> bool:
    """The original files of the images most runs get wrong, as one PNG; False when there are none."""
    from PIL import Image

    from leukoedge.train.plots import audit_panel

    y, predicted, k = aligned_answers(images, probs, classes)
    order = [i for i in np.argsort(-k, kind="stable") if k[i] > probs.shape[0] / 2][:limit]
    if not order:
        return False
    manifest = Manifest.load(RunDir(run).manifest_path)
    config = RunDir(run).config()
    entries = {(e.root, e.path): e for e in manifest.entries}
    examples = []
    for i in order:
        root, rel, label = images[i]
        with Image.open(manifest.resolve(entries[(root, rel)], config.data_root or None)) as im:
            im = im.convert("RGB")
            im.thumbnail((SHEET_PX, SHEET_PX))
            pixels = np.asarray(im)
        wrong_answer = Counter(classes[int(p)] for p in predicted[:, i] if p != y[i]).most_common(1)[0][0]
        examples.append({"image": pixels, "wrong": True,
                         "title": f"{Path(rel).name[:32]}\n{label}: {k[i]}/{probs.shape[0]} wrong -> {wrong_answer}"})
    audit_panel(examples, path, title="images most runs get wrong (as captured)")
    return True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", action="append", default=[], metavar="NAME=RUN_DIR", help="a run (repeat; 2 or more)")
    ap.add_argument("--split", default="test", help="the split to compare (default test)")
    ap.add_argument("--sheet-max", type=int, default=30, help="images on the contact sheet (default 30)")
    ap.add_argument("--name", default="error_overlap")
    ap.add_argument("--title", default="Errors several models share")
    ap.add_argument("--out-dir", type=Path, default=RESULTS)
    args = ap.parse_args()
    runs = [parse_run(r) for r in args.run]
    names, images, probs, classes = load_runs(runs, args.split)
    result = overlap(names, images, probs, classes)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    sheet = f"{args.name}.png"
    if not contact_sheet(runs[0][1], images, probs, classes, args.out_dir / sheet, args.sheet_max):
        sheet = None
    result.update(split=args.split, runs={n: str(p) for n, p in runs}, contact_sheet=sheet)
    write_results(args.name, result, render(result, names, sheet, args.split), args.title, args.out_dir)


if __name__ == "__main__":
    main_guard(main)
