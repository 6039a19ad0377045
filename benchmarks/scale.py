"""Capture scale: accuracy at other magnifications and wider fields, stretched (before) vs tiled at the training scale.

Reproduces issue 15's table on the capture-block split's test fields, through
the device runtime (int8 bundles), for each bundle given:

- ``same``: the field as stored;
- ``resized xF``: the whole field resized by F (cells F x larger or smaller,
  nothing lost): the capture's um/px is the training scale / F;
- ``centre crop xM``: the central 1/M of the field resized back to the stored
  size (M x magnification; part of the field is lost, so part of the drop is
  lost evidence);
- ``wider KxK``: K x K neighbouring test fields of one class (capture order)
  as one capture at the same scale.

Modes: ``stretch`` = the whole capture stretched to the model input (what the
device did before issue 15, and still does for bundles without a training
scale); ``given`` = the capture's um/px given (a calibrated microscope);
``estimated`` = estimated per capture from its red cells. Accuracy counts the
top class (``predicted``) of every image, abstained or not, with a Wilson 95 %
interval; abstained and retake rates are reported beside it.

Also: 12 MP frame latency (decode + scale + tiles + aggregation) at one thread
against the stretched baseline in the same run, with the number of tiles.
"""
from __future__ import annotations

import argparse
import dataclasses
import io
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from _common import machine_info, write_results

from leukoedge.bundle import load_bundle
from leukoedge.errors import LeukoEdgeError
from leukoedge.runtime import Classifier
from leukoedge.stats.intervals import wilson

RESAMPLE = Image.Resampling.BICUBIC


# -- capture transforms (numpy RGB in, numpy RGB out, + the factor cells grew by) --------------
def resized(rgb: np.ndarray, f: float) -> np.ndarray:
    h, w = rgb.shape[:2]
    return np.asarray(Image.fromarray(rgb).resize((max(8, round(w * f)), max(8, round(h * f))), RESAMPLE))


def centre_crop(rgb: np.ndarray, m: float) -> np.ndarray:
    h, w = rgb.shape[:2]
    ch, cw = round(h / m), round(w / m)
    y, x = (h - ch) // 2, (w - cw) // 2
    return np.asarray(Image.fromarray(rgb[y:y + ch, x:x + cw]).resize((w, h), RESAMPLE))


def mosaic(fields: list[np.ndarray], k: int) -> np.ndarray:
    h, w = fields[0].shape[:2]
    rows = [np.concatenate([np.asarray(Image.fromarray(f).resize((w, h), RESAMPLE)) for f in fields[r * k:(r + 1) * k]],
                           axis=1) for r in range(k)]
    return np.concatenate(rows, axis=0)


def conditions(resize_factors, crop_factors, wider) -> list[tuple[str, str, float]]:
    """(name, kind, factor): factor = how much larger the cells are than in the stored field."""
    out = [("same", "same", 1.0)]
    out += [(f"resized x{f:g}", "resized", f) for f in resize_factors]
    out += [(f"centre crop x{m:g}", "crop", m) for m in crop_factors]
    out += [(f"wider {k}x{k}", f"wider{k}", 1.0) for k in wider]
    return out


def test_items(manifest_path: Path, data_root: Path | None, limit: int | None):
    manifest = json.loads(manifest_path.read_text())
    root = Path(data_root or manifest["root"])
    entries = [e for e in manifest["entries"] if e["split"] == "test"]
    by_class: dict[str, list[dict]] = {}
    for e in sorted(entries, key=lambda e: (e["label"], e.get("order") or 0, e["path"])):
        by_class.setdefault(e["label"], []).append(e)
    if limit:
        # Evenly over each class's capture order, so a limited run still spans the whole test block.
        for label, items in by_class.items():
            step = max(1, len(items) * len(by_class) // limit)
            by_class[label] = items[::step]
    return root, by_class


def load_rgb(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


@dataclasses.dataclass
class Tally:
    n: int = 0
    correct: int = 0
    abstained: int = 0
    retake: int = 0
    tiles: int = 0
    errors: int = 0
    scale_ratio: list = dataclasses.field(default_factory=list)

    def row(self) -> dict:
        lo, hi = wilson(self.correct, self.n) if self.n else (float("nan"), float("nan"))
        return {"n": self.n, "accuracy": self.correct / self.n if self.n else None, "ci": [lo, hi],
                "abstained": self.abstained / self.n if self.n else None,
                "retake": self.retake / self.n if self.n else None,
                "mean_tiles": self.tiles / max(1, self.n - self.errors), "errors": self.errors,
                "scale_error_median": statistics.median(self.scale_ratio) if self.scale_ratio else None}


def classify_capture(clf: Classifier, stretch: Classifier, rgb: np.ndarray, mode: str, um: float | None):
    if mode == "stretch":
        return stretch.classify(rgb, heatmap=False)
    return clf.classify(rgb, um_per_px=um if mode == "given" else None, heatmap=False)


def stretched_copy(bundle):
    """The same bundle with no training scale: the device's behaviour before issue 15 (whole frame stretched)."""
    return dataclasses.replace(bundle, spec=bundle.spec.with_scale(None))


def run_accuracy(name: str, bundle_path: Path, root: Path, by_class: dict, conds, modes, progress: bool,
                 estimate_every: int = 1) -> dict:
    from tqdm import tqdm

    bundle = load_bundle(bundle_path, allow_invalid=True)
    if bundle.spec.um_per_px is None:
        raise SystemExit(f"{bundle_path}: the bundle records no training scale (convert with --um-per-px)")
    clf = Classifier(bundle, num_threads=2)
    stretch = Classifier(stretched_copy(bundle), num_threads=2)
    u0 = bundle.spec.um_per_px
    tallies = {(c[0], m): Tally() for c in conds for m in modes}
    total = sum(len(v) for v in by_class.values())
    bar = tqdm(total=total, desc=name, unit="field", disable=not progress)
    for label, items in by_class.items():
        fields = [load_rgb(root / e["path"]) for e in items]
        for i, field in enumerate(fields):
            for cname, kind, factor in conds:
                if kind.startswith("wider"):
                    k = int(kind[5:])
                    group = [fields[(i + j) % len(fields)] for j in range(k * k)]
                    capture = mosaic(group, k)
                elif kind == "resized":
                    capture = resized(field, factor)
                elif kind == "crop":
                    capture = centre_crop(field, factor)
                else:
                    capture = field
                um = u0 / factor
                for mode in modes:
                    if mode == "estimated" and i % estimate_every:
                        continue  # the estimate costs ~10x a given scale: every k-th field of each class
                    t = tallies[(cname, mode)]
                    t.n += 1
                    try:
                        pred = classify_capture(clf, stretch, capture, mode, um)
                    except LeukoEdgeError:
                        t.errors += 1
                        continue
                    t.correct += pred.label == label
                    t.abstained += bool(pred.abstained)
                    t.retake += bool(getattr(pred, "retake", False))
                    t.tiles += len(getattr(pred, "tiles", None) or [1])
                    used = getattr(pred, "um_per_px", None)
                    if mode == "estimated" and used and getattr(pred, "scale_source", "") == "estimated":
                        t.scale_ratio.append(abs(used / um - 1))
            bar.update(1)
    bar.close()
    return {"bundle": str(bundle_path), "model": bundle.name, "um_per_px": u0, "training": training_of(bundle_path),
            "input_um_per_px": list(bundle.spec.input_um_per_px),
            "rows": [{"condition": c[0], "mode": m, **tallies[(c[0], m)].row()} for c in conds for m in modes]}


def training_of(bundle_path: Path) -> dict:
    """Recipe, scale jitter and seed of the run behind a bundle (its model card), for the spread over seeds."""
    try:
        card = json.loads((bundle_path / "model_card.json").read_text())
    except (OSError, ValueError):
        return {}
    training = card.get("training") or {}
    aug = training.get("augmentation") or {}
    return {"recipe": aug.get("recipe"), "scale_jitter": aug.get("scale_jitter") or 0.0, "seed": training.get("seed")}


def seed_groups(results: list[dict]) -> dict[tuple, list[dict]]:
    """Bundles of one model, recipe and scale jitter trained with different seeds (groups of 2 or more)."""
    groups: dict[tuple, list[dict]] = {}
    for res in results:
        t = res.get("training") or {}
        if t.get("seed") is None:
            continue
        groups.setdefault((res["model"], t.get("recipe"), t.get("scale_jitter")), []).append(res)
    return {k: v for k, v in groups.items() if len({r["training"]["seed"] for r in v}) > 1}


def seed_spread_lines(results: list[dict]) -> list[str]:
    """Per recipe: each condition's accuracy over seeds, and its gap to the same-scale accuracy of the same seed."""
    lines = []
    for (model, recipe, jitter), group in seed_groups(results).items():
        seeds = sorted(r["training"]["seed"] for r in group)
        jit = f", scale jitter +-{100 * jitter:.0f} %" if jitter else ", no scale jitter"
        lines += [f"### Spread over training seeds: {model}, recipe `{recipe}`{jit} (seeds {', '.join(map(str, seeds))})", "",
                  "Accuracy mean and range over the seeds; gap = accuracy minus the same seed's same-scale accuracy "
                  "in the same mode (the goal: within -2 points with the scale given, -3 estimated).", "",
                  "| capture | mode | accuracy mean [min, max] | gap mean [worst, best] (points) |", "|---|---|---|---|"]
        rows = {}
        for res in group:
            for r in res["rows"]:
                rows.setdefault((r["condition"], r["mode"]), []).append((res, r))
        for (cond, mode), entries in rows.items():
            accs = [r["accuracy"] for _, r in entries if r["accuracy"] is not None]
            if not accs:
                continue
            gaps = []
            for res, r in entries:
                same = next((x for x in res["rows"] if x["condition"] == "same" and x["mode"] == mode), None)
                if same and same["accuracy"] is not None and r["accuracy"] is not None:
                    gaps.append(100 * (r["accuracy"] - same["accuracy"]))
            gap = f"{statistics.mean(gaps):+.1f} [{min(gaps):+.1f}, {max(gaps):+.1f}]" if gaps and cond != "same" else ""
            lines.append(f"| {cond} | {mode} | {100 * statistics.mean(accs):.1f} % [{100 * min(accs):.1f}, "
                         f"{100 * max(accs):.1f}] | {gap} |")
        lines.append("")
    return lines


def smear_frame(root: Path, by_class: dict, u0: float, target_um: float, size=(4056, 3040)) -> tuple[bytes, float]:
    """A 12 MP JPEG at ``target_um`` um/px: test fields of one class upscaled to that scale and tiled."""
    f = u0 / target_um
    items = next(iter(by_class.values()))
    w, h = size
    side = round(224 * f)
    cols, rows = -(-w // side), -(-h // side)
    fields = [load_rgb(root / items[i % len(items)]["path"]) for i in range(cols * rows)]
    canvas = Image.new("RGB", (cols * side, rows * side))
    for r in range(rows):
        for c in range(cols):
            canvas.paste(Image.fromarray(fields[r * cols + c]).resize((side, side), RESAMPLE), (c * side, r * side))
    buf = io.BytesIO()
    canvas.crop((0, 0, w, h)).save(buf, format="JPEG", quality=92)
    return buf.getvalue(), u0 / f


def run_latency(bundle_path: Path, root: Path, by_class: dict, runs: int) -> dict:
    bundle = load_bundle(bundle_path, allow_invalid=True)
    clf = Classifier(bundle, num_threads=1)
    stretch = Classifier(stretched_copy(bundle), num_threads=1)
    frame, um = smear_frame(root, by_class, bundle.spec.um_per_px, 0.08)
    cases = {"stretch (before)": lambda: stretch.classify(frame, heatmap=False),
             "tiled, scale given": lambda: clf.classify(frame, um_per_px=um, heatmap=False),
             "tiled, scale estimated": lambda: clf.classify(frame, heatmap=False)}
    times = {k: [] for k in cases}
    info = {}
    for _ in range(3):
        for k, fn in cases.items():
            info[k] = fn()
    for _ in range(runs):  # interleaved, so load changes hit every case alike
        for k, fn in cases.items():
            t0 = time.perf_counter()
            fn()
            times[k].append((time.perf_counter() - t0) * 1000)
    base = statistics.median(times["stretch (before)"])
    out = []
    for k in cases:
        p50 = statistics.median(times[k])
        pred = info[k]
        tiles = getattr(pred, "tiles", None) or []
        out.append({"case": k, "p50_ms": p50, "ratio": p50 / base, "tiles": len(tiles),
                    "tiles_used": sum(1 for t in tiles if getattr(t, "used", False)),
                    "um_per_px": getattr(pred, "um_per_px", None), "scale_source": getattr(pred, "scale_source", None),
                    "timings": dict(pred.timings)})
    return {"frame": {"width": 4056, "height": 3040, "bytes": len(frame), "quality": 92, "um_per_px": um},
            "runs": runs, "rows": out}


def markdown(result: dict) -> str:
    if not result["accuracy"]:
        lines = ["Latency only (`--no-accuracy`); the accuracy tables are in [scale.md](scale.md).", ""]
        return "\n".join(lines + latency_lines(result.get("latency")))
    lines = ["Test fields of the capture-block split (per class by file number: first 70 % train, next 15 % val, "
             "last 15 % test), int8 bundles through the device runtime. Accuracy = top class of every image "
             "(abstained or not), Wilson 95 % interval. `stretch` = whole capture stretched to the model input "
             "(before); `given` = capture um/px given; `estimated` = estimated from its red cells"
             + (f" (every {result['estimate_every']}th field of each class)" if result.get("estimate_every", 1) > 1 else "")
             + ". `resized xF` keeps the whole field, so stretching it back is lossless: those rows test the "
             "scale path (rescale + tiles), not a weakness of stretching; `wider KxK` (KxK neighbouring test "
             "fields of one class in capture order, one capture) and `centre crop xM` (the central 1/M, M x larger "
             "cells; part of the field is lost) are where stretching fails. A wider field's result averages "
             "K x K fields of one class, so it can exceed the single-field accuracy.", ""]
    for res in result["accuracy"]:
        t = res.get("training") or {}
        run = (f"recipe `{t.get('recipe')}`, scale jitter +-{100 * (t.get('scale_jitter') or 0):.0f} %, seed {t.get('seed')}; "
               if t else "")
        lines += [f"### {res['model']} ({res['bundle']}; {run}training scale {res['um_per_px']:.3f} um/px, "
                  f"{res['input_um_per_px'][1]:.3f} um per input px)", "",
                  "| capture | mode | n | accuracy [95 % CI] | abstained | retake | tiles | scale error (median) |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in res["rows"]:
            acc = "n/a" if r["accuracy"] is None else f"{100 * r['accuracy']:.1f} % [{100 * r['ci'][0]:.1f}, {100 * r['ci'][1]:.1f}]"
            err = "" if r["scale_error_median"] is None else f"{100 * r['scale_error_median']:.1f} %"
            lines.append(f"| {r['condition']} | {r['mode']} | {r['n']} | {acc} | {100 * (r['abstained'] or 0):.1f} % | "
                         f"{100 * (r['retake'] or 0):.1f} % | {r['mean_tiles']:.1f} | {err} |")
        lines.append("")
    lines += seed_spread_lines(result["accuracy"])
    return "\n".join(lines + latency_lines(result.get("latency")))


def latency_lines(lat: dict | None) -> list[str]:
    lines: list[str] = []
    if not lat:
        lines.append("12 MP frame latency: [scale_latency.md](scale_latency.md) (measured apart, on a quiet machine).")
    if lat:
        fr = lat["frame"]
        lines += [f"### 12 MP frame latency ({fr['width']}x{fr['height']} JPEG q{fr['quality']}, {fr['bytes']:,} bytes, "
                  f"{fr['um_per_px']:.3f} um/px), 1 thread, p50 of {lat['runs']}, interleaved", "",
                  "| case | p50 ms | ratio to stretch | tiles (used) | um/px used | timings (ms) |", "|---|---|---|---|---|---|"]
        for r in lat["rows"]:
            tim = ", ".join(f"{k.replace('_ms', '')} {v:.1f}" for k, v in r["timings"].items())
            um = "" if r["um_per_px"] is None else f"{r['um_per_px']:.3f} ({r['scale_source']})"
            lines.append(f"| {r['case']} | {r['p50_ms']:.1f} | {r['ratio']:.2f} | {r['tiles']} ({r['tiles_used']}) | {um} | {tim} |")
    return lines


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", action="append", required=True, metavar="BUNDLE", help="int8 bundle with a training scale")
    p.add_argument("--manifest", required=True, type=Path, help="the block-split manifest the bundles were trained on")
    p.add_argument("--data", type=Path, help="dataset root (default: the manifest's)")
    p.add_argument("--limit", type=int, help="at most about this many test fields (spread over capture order)")
    p.add_argument("--modes", default="stretch,given,estimated")
    p.add_argument("--resize", default="0.5,0.75,1.25,1.5,2")
    p.add_argument("--crop", default="1.25,1.5,2")
    p.add_argument("--wider", default="2,3")
    p.add_argument("--latency-runs", type=int, default=20)
    p.add_argument("--estimate-every", type=int, default=1, metavar="K",
                   help="estimated mode on every K-th test field of each class only (it costs ~10x)")
    p.add_argument("--no-accuracy", action="store_true",
                   help="latency only (e.g. --name scale_latency on a quiet machine, after the accuracy run)")
    p.add_argument("--name", default="scale")
    args = p.parse_args()
    floats = lambda s: [float(x) for x in s.split(",") if x]  # noqa: E731
    conds = conditions(floats(args.resize), floats(args.crop), [int(x) for x in args.wider.split(",") if x])
    modes = [m for m in args.modes.split(",") if m]
    root, by_class = test_items(args.manifest, args.data, args.limit)
    result = {"machine": machine_info(), "split": "block (capture order), test block",
              "estimate_every": args.estimate_every,
              "accuracy": [] if args.no_accuracy else
              [run_accuracy(Path(b).name, Path(b), root, by_class, conds, modes, sys.stderr.isatty(),
                            args.estimate_every) for b in args.bundle]}
    if args.latency_runs:
        result["latency"] = run_latency(Path(args.bundle[0]), root, by_class, args.latency_runs)
    write_results(args.name, result, markdown(result), "Capture scale: magnification, wider fields, tiling")
    return 0


if __name__ == "__main__":
    sys.exit(main())
