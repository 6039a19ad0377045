#!/usr/bin/env python3
"""Accuracy levers measured through the device (issue 18): single nets, test-time augmentation, ensembles.

    python benchmarks/accuracy.py --recipe NAME RUN_SEED0 RUN_SEED1 RUN_SEED2 [--recipe ...]
                                  [--variants NAME single,ensemble] [--um-per-px 0.401] [--work DIR]
                                  [--name accuracy]

For every recipe (the same training command at several seeds, one split),
each variant is converted with the real pipeline exactly as
``leukoedge convert RUN [--member RUN2 ...] [--tta flips] --quantize int8
--with-heatmap`` would, graded by its own parity gate, and then measured
through the device runtime (LiteRT, int8) on the run's TEST split:

* ``single``: each seed alone (mean +- sd over seeds);
* ``single + TTA flips``: each seed with the 4 flip views averaged in the model;
* ``ensemble``: all seeds in one model (one figure: the seeds are used up);
* ``ensemble + TTA flips``.

Figures: four-class accuracy, Benign recall, four-class accuracy on grayscale
copies of the test images (the colour-shortcut check of the audit), the gate's
verdict, size, and p50 invoke per tile (one thread, 30 invokes, this machine:
compare ratios within the table). Bundles are cached under ``--work``.

``--variants NAME V1,V2`` keeps only those variants for one recipe (e.g. the
teachers of a distilled recipe as one ensemble, when their runs are different
recipes and a mean over them would mean nothing). Under the table, each
recipe's training is read back from its runs' ``config.json`` /
``history.json`` (augmentation, epochs, kept epoch, minutes, the teachers of a
distilled run), so the table says what every row trained with.

Writes benchmarks/results/<name>.{md,json}. Needs TensorFlow (workstation).
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import numpy as np
from _common import RESULTS, main_guard, write_results

from leukoedge.errors import ParityError
from leukoedge.quiet import quiet_environment

quiet_environment()

LATENCY_INVOKES = 30
VARIANTS = ("single", "single + TTA flips", "ensemble", "ensemble + TTA flips")


def convert(run: Path, members: list[Path], tta: str, out: Path, um_per_px: float | None) -> None:
    from leukoedge.convert.options import ConvertOptions
    from leukoedge.convert.pipeline import convert_run

    if (out / "parity.json").is_file():
        return
    options = ConvertOptions(run_dir=run, out=out, quantize="int8", with_heatmap=True, force=True,
                             members=tuple(members), tta=tta, um_per_px=um_per_px)
    try:
        convert_run(options)
    except ParityError as err:  # written, marked invalid: a row like any other
        print(f"{out.name}: gate FAILED ({err.message})")


def measure(bundle: Path, images: np.ndarray, gray: np.ndarray, y: np.ndarray, classes: list[str],
            baseline: Path | None) -> dict:
    from leukoedge.bundle import load_bundle
    from leukoedge.runtime import Classifier

    b = load_bundle(bundle, allow_invalid=True)
    clf = Classifier(b, edgetpu="off")
    top = np.array([int(np.argmax(clf.run(img).probabilities)) for img in images])
    gtop = np.array([int(np.argmax(clf.run(img).probabilities)) for img in gray])
    benign = classes.index("Benign")
    p50, base = latency(b, baseline or bundle, images[0])
    parity = json.loads((bundle / "parity.json").read_text())
    meta = b.meta
    members = (meta.get("ensemble") or {}).get("members") or [{"parameters": meta["size"].get("parameters")}]
    return {"accuracy": float((top == y).mean()), "benign_recall": float((top[y == benign] == benign).mean()),
            "gray_accuracy": float((gtop == y).mean()), "gate": bool(parity["passed"]),
            "gate_flips": parity.get("flips"), "size_bytes": meta["size"]["converted_bytes"],
            "p50_invoke_ms": p50, "latency_vs_single": p50 / base,
            "params_per_member": max(int(m["parameters"]) for m in members),
            "invokes_per_tile": (meta.get("ensemble") or {}).get("invokes_per_image", 1)}


def latency(bundle, baseline: Path, image: np.ndarray) -> tuple[float, float]:
    """p50 invoke of ``bundle`` and of the baseline bundle, taken in turn (the repair's measurement, one thread each)."""
    from PIL import Image

    from leukoedge.bundle import load_bundle
    from leukoedge.convert.repair import p50_beside
    from leukoedge.runtime import Classifier

    one = Classifier(bundle, num_threads=1, edgetpu="off")
    ref_bundle = load_bundle(baseline, allow_invalid=True)
    ref = Classifier(ref_bundle, num_threads=1, edgetpu="off")
    side = ref_bundle.spec.height  # a recipe at another input size is timed beside the baseline at its own
    ref_image = image if image.shape[:2] == (side, ref_bundle.spec.width) else np.asarray(
        Image.fromarray(image).resize((ref_bundle.spec.width, side)))
    return p50_beside(one, ref, image, LATENCY_INVOKES, reference_image=ref_image)


def _mean_sd(values: list[float]) -> tuple[float, float | None]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def summarise(recipe: str, variant: str, rows: list[dict]) -> dict:
    out = {"recipe": recipe, "variant": variant, "n_bundles": len(rows), "per_bundle": rows}
    for key in ("accuracy", "benign_recall", "gray_accuracy", "p50_invoke_ms", "latency_vs_single", "size_bytes"):
        out[key] = _mean_sd([r[key] for r in rows])
    out["gates_passed"] = sum(r["gate"] for r in rows)
    out["params_per_member"] = rows[0]["params_per_member"]
    out["invokes_per_tile"] = rows[0]["invokes_per_tile"]
    return out


def training_of(runs: list[Path]) -> dict:
    """What a recipe's runs trained with, from their own records (one line of the table's key)."""
    from leukoedge.train.rundir import RunDir, read_json

    configs = [RunDir(r).config() for r in runs]
    histories = [read_json(RunDir(r).history_path) for r in runs]
    first = configs[0]
    distill = first.extra.get("distill")
    return {"runs": [str(r) for r in runs], "models": sorted({c.model for c in configs}),
            "augment": sorted({c.augmentation.get("recipe", "?") for c in configs}),
            "scale_jitter": sorted({c.scale_jitter for c in configs}), "max_epochs": sorted({c.epochs for c in configs}),
            "input_sizes": sorted({c.input_size for c in configs}),
            "ema": sorted({(c.extra.get("averaging") or {}).get("momentum") or 0.0 for c in configs}),
            "label_smoothing": sorted({float(c.extra.get("label_smoothing") or 0.0) for c in configs}),
            "mixing": sorted({json.dumps(c.extra.get("mixing"), sort_keys=True) for c in configs
                              if c.extra.get("mixing")}),
            "seeds": [c.seed for c in configs], "kept_epochs": [h.get("kept_epoch") for h in histories],
            "train_minutes": [round(float(h.get("train_seconds", 0)) / 60, 1) for h in histories],
            "distill": None if not distill else {
                "teachers": [Path(t["run"]).name for t in distill["teachers"]], "alpha": distill["alpha"],
                "temperature": distill["temperature"], "target_train_accuracy": distill.get("target_train_accuracy")}}


def training_markdown(trainings: dict[str, dict]) -> list[str]:
    lines = ["", "How each recipe trained (read from its runs):", ""]
    for name, t in trainings.items():
        jitter = ", ".join(f"{j:g}" for j in t["scale_jitter"])
        sizes = "/".join(map(str, t.get("input_sizes", [])))
        text = (f"- **{name}**: {', '.join(t['models'])} at {sizes} px, `--augment {'/'.join(t['augment'])}`, "
                f"scale jitter {jitter}, "
                f"max {'/'.join(map(str, t['max_epochs']))} epochs, seeds {t['seeds']}, kept epochs "
                f"{t['kept_epochs']}, training {t['train_minutes']} min")
        if any(t.get("ema", [])):
            text += f", weight average (EMA) momentum {'/'.join(f'{m:g}' for m in t['ema'])}"
        if any(t.get("label_smoothing", [])):
            text += f", label smoothing {'/'.join(f'{e:g}' for e in t['label_smoothing'])}"
        for record in map(json.loads, t.get("mixing", [])):
            text += (f", {record['method']} alpha {record['alpha']:g} on {100 * record['probability']:.0f} % of "
                     f"the training images")
        d = t["distill"]
        if d:
            text += (f"; distilled from {len(d['teachers'])} teachers ({', '.join(d['teachers'])}), alpha "
                     f"{d['alpha']:g}, T {d['temperature']:g}, the teachers' mean right on "
                     f"{100 * d['target_train_accuracy']:.1f} % of the training images")
        lines.append(text)
    return lines


def markdown(summaries: list[dict], n_test: int, trainings: dict[str, dict] | None = None) -> str:
    def pct(pair):
        mean, sd = pair
        return f"{100 * mean:.1f} %" + (f" +- {100 * sd:.1f}" if sd is not None else "")

    lines = [f"Capture-block test split ({n_test} images), int8 through the device runtime (LiteRT), each bundle "
             "graded by its own parity gate. `+- sd` is over training seeds (one bundle per seed); an ensemble uses "
             "all the seeds, so it is one figure. Latency: p50 of 30 invokes of one tile on one thread on this "
             "2-core machine (members x views sub-model invokes each), interleaved invoke by invoke with the "
             "table's first single bundle: the ratio is the figure to read, the milliseconds move with the load.", "",
             "| recipe | variant | bundles | four-class | Benign recall | grayscale four-class | gate | params / member "
             "| invokes / tile | p50 invoke (ms) | vs single | size (KB) |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for s in summaries:
        lines.append(f"| {s['recipe']} | {s['variant']} | {s['n_bundles']} | {pct(s['accuracy'])} | "
                     f"{pct(s['benign_recall'])} | {pct(s['gray_accuracy'])} | {s['gates_passed']} of {s['n_bundles']} "
                     f"pass | {s['params_per_member']:,} | {s['invokes_per_tile']} | {s['p50_invoke_ms'][0]:.2f} | "
                     f"{s['latency_vs_single'][0]:.2f}x | "
                     f"{s['size_bytes'][0] / 1024:.0f} |")
    lines += training_markdown(trainings or {})
    lines += ["", "Research use only; not a diagnostic device."]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", nargs="+", action="append", required=True, metavar="NAME RUN",
                    help="a recipe's name, then its run directories (one per seed, same split)")
    ap.add_argument("--variants", nargs=2, action="append", default=[], metavar=("NAME", "LIST"),
                    help=f"only these comma-separated variants for recipe NAME (of: {', '.join(VARIANTS)})")
    ap.add_argument("--um-per-px", type=float, default=None)
    ap.add_argument("--work", type=Path, default=Path(__file__).resolve().parent / ".work" / "accuracy")
    ap.add_argument("--name", default="accuracy")
    ap.add_argument("--out-dir", type=Path, default=RESULTS)
    args = ap.parse_args()
    from PIL import Image

    from leukoedge.convert import calibration
    from leukoedge.train.rundir import RunDir

    only = {name: [v.strip() for v in value.split(",")] for name, value in args.variants}
    for name, chosen in only.items():
        unknown = [v for v in chosen if v not in VARIANTS]
        if unknown or name not in [r[0] for r in args.recipe]:
            raise SystemExit(f"--variants {name}: unknown recipe or variant {unknown}; variants: {', '.join(VARIANTS)}")
    summaries, n_test, trainings = [], 0, {}
    baseline = None  # the first single bundle of the table: every latency is taken beside it
    for recipe in args.recipe:
        name, runs = recipe[0], [Path(r) for r in recipe[1:]]
        if not runs:
            raise SystemExit(f"--recipe {name}: no run directories")
        variants = {"single": [(r, [], "none") for r in runs], "single + TTA flips": [(r, [], "flips") for r in runs]}
        if len(runs) > 1:
            variants["ensemble"] = [(runs[0], runs[1:], "none")]
            variants["ensemble + TTA flips"] = [(runs[0], runs[1:], "flips")]
        if name in only:
            variants = {v: jobs for v, jobs in variants.items() if v in only[name]}
        trainings[name] = training_of(runs)
        rd = RunDir(runs[0])
        manifest = rd.manifest()
        entries = manifest.subset("test")
        bundle0 = None  # the recipe's first bundle: its spec gives the test images
        for variant, jobs in variants.items():
            rows = []
            for run, members, tta in jobs:
                tag = f"{name}-{run.name}" + (f"-x{len(members) + 1}" if members else "") + f"-{tta}"
                out = args.work / tag
                convert(run, members, tta, out, args.um_per_px)
                if bundle0 is None:
                    from leukoedge.bundle import load_bundle

                    spec = load_bundle(out, allow_invalid=True).spec
                    images = calibration.load_images(manifest, entries, spec, None, "test")
                    gray = np.stack([np.asarray(Image.fromarray(i).convert("L").convert("RGB")) for i in images])
                    y = np.array([manifest.label_index(e.label) for e in entries])
                    bundle0, n_test = out, len(entries)
                if baseline is None and variant == "single":
                    baseline = out
                rows.append({"bundle": tag, **measure(out, images, gray, y, list(manifest.classes),
                                                      baseline or out)})
                print(f"{tag}: {rows[-1]}")
            summaries.append(summarise(name, variant, rows))
    write_results(args.name, {"rows": summaries, "trainings": trainings}, markdown(summaries, n_test, trainings),
                  "Accuracy levers through the device: TTA, ensembles, schedule length, distillation (also from a "
                  "larger teacher), weight averaging, label smoothing, mixup / CutMix, input size",
                  out_dir=args.out_dir)
    return 0


if __name__ == "__main__":
    main_guard(main)
