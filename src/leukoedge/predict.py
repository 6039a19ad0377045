"""``leukoedge predict BUNDLE PATH...``: classify files and folders with a bundle, no TensorFlow.

The same :meth:`~leukoedge.runtime.classifier.Classifier.classify` the app
calls, so a folder classified on the workstation gives the rows the device
would store: capture scale, tiles, quality gate and abstention included. It is
for labs that want to run a bundle over an archive of fields, or check a copied
bundle on the Pi before serving it.

Every image becomes one row, even a broken one (its ``error`` says why and the
run goes on), so a folder of 2,000 fields with three damaged files never
stops at the first of them. Rows are printed as a table, or written as JSON
(``--json``, one document on stdout) or CSV (``--csv FILE``, written atomically
so an interrupted run never leaves half a file).
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from . import RESEARCH_NOTICE
from .errors import LeukoEdgeError, UsageError
from .files import IMAGE_SUFFIXES, atomic_write_text, image_files

#: Columns every row has, in CSV order (one ``p_<label>`` column per class follows).
ROW_FIELDS = ("path", "label", "predicted", "confidence", "abstained", "retake", "quality", "um_per_px",
              "scale_source", "tiles", "tiles_used", "error")


@dataclass(frozen=True)
class Inputs:
    """The image files named on the command line: files as given, folders expanded recursively."""

    files: tuple[Path, ...]
    missing: tuple[Path, ...]


def collect_inputs(paths: Iterable[str | Path]) -> Inputs:
    """Expand folders to their image files (by suffix); keep named files whatever their suffix.

    A file named explicitly is tried even without an image suffix (it gets a row
    with the decoder's error if it is not an image); inside folders only image
    suffixes count, so a ``notes.txt`` beside the fields is not an error row.
    """
    files: list[Path] = []
    missing: list[Path] = []
    seen: set[Path] = set()
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found = image_files(path, recursive=True, skip_hidden=True)
        elif path.is_file():
            found = [path]
        else:
            missing.append(path)
            continue
        for item in found:
            key = item.resolve()
            if key not in seen:
                seen.add(key)
                files.append(item)
    return Inputs(tuple(files), tuple(missing))


def predict_rows(classifier, files: Iterable[Path], *, um_per_px: float | None = None,
                 progress: bool = False) -> Iterator[dict]:
    """One row per file, in order: the classification, or the error that stopped it.

    Only :class:`~leukoedge.errors.LeukoEdgeError` (bad image, unmeasurable
    scale, ...) becomes an error row; anything else is a bug and propagates.
    """
    from tqdm import tqdm

    files = list(files)
    labels = list(classifier.bundle.labels)
    for path in tqdm(files, desc="classifying", unit="img", disable=not progress, leave=False, mininterval=0.5):
        try:
            prediction = classifier.classify(path, um_per_px=um_per_px, heatmap=False)
        except LeukoEdgeError as err:
            yield error_row(path, labels, err.message)
            continue
        yield prediction_row(path, prediction.to_dict())


def prediction_row(path: Path, result: dict) -> dict:
    """A row from :meth:`Prediction.to_dict`: the fields ROW_FIELDS names, probabilities kept as a dict."""
    tiles = result.get("tiles") or []
    quality = result.get("quality")
    return {
        "path": str(path),
        "label": result.get("label"),
        "predicted": result.get("predicted"),
        "confidence": result.get("confidence"),
        "probabilities": dict(result.get("probabilities") or {}),
        "abstained": bool(result.get("abstained")),
        "retake": bool(result.get("retake", False)),
        "quality": quality,
        "um_per_px": result.get("um_per_px"),
        "scale_source": result.get("scale_source"),
        "scale_message": result.get("scale_message"),
        "tiles": len(tiles),
        "tiles_used": sum(1 for t in tiles if t.get("used")),
        "aggregation": result.get("aggregation"),
        "latency_ms": result.get("latency_ms"),
        "error": None,
    }


def error_row(path: Path, labels: list[str], message: str) -> dict:
    """A row for a file that could not be classified: every result field empty, ``error`` set."""
    return {
        "path": str(path), "label": None, "predicted": None, "confidence": None,
        "probabilities": {name: None for name in labels}, "abstained": False, "retake": False,
        "quality": None, "um_per_px": None, "scale_source": None, "scale_message": None, "tiles": 0,
        "tiles_used": 0, "aggregation": None, "latency_ms": None, "error": message,
    }


def summarise(rows: list[dict], labels: list[str]) -> dict:
    """Counts per label plus abstained, retake and failed rows."""
    counts = {name: 0 for name in labels}
    abstained = retake = failed = 0
    for row in rows:
        if row["error"]:
            failed += 1
        elif row["retake"]:
            retake += 1
        elif row["abstained"]:
            abstained += 1
        elif row["label"] in counts:
            counts[row["label"]] += 1
    return {"images": len(rows), "counts": counts, "abstained": abstained, "retake": retake, "failed": failed}


def _quality_text(quality: dict | None) -> str:
    if not quality:
        return ""
    if quality.get("ok", True):
        return "ok"
    return ";".join(quality.get("reasons") or ()) or "failed"


def rows_to_csv(rows: list[dict], labels: list[str]) -> str:
    """CSV text: ROW_FIELDS, then ``p_<label>`` per class (empty for error rows)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow([*ROW_FIELDS, *(f"p_{name}" for name in labels)])
    for row in rows:
        values = [row[key] for key in ROW_FIELDS]
        values[ROW_FIELDS.index("quality")] = _quality_text(row["quality"])
        probs = row["probabilities"]
        writer.writerow([_cell(v) for v in values] + [_cell(probs.get(name)) for name in labels])
    return buf.getvalue()


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def rows_to_table(rows: list[dict]) -> str:
    """Human output: one line per image (label or why there is none), aligned."""
    lines = []
    width = min(max((len(r["path"]) for r in rows), default=4), 60)
    for row in rows:
        path = row["path"] if len(row["path"]) <= width else "..." + row["path"][-(width - 3):]
        if row["error"]:
            what = f"error: {row['error']}"
        elif row["retake"]:
            what = (row["quality"] or {}).get("message") or "retake"
        elif row["abstained"]:
            what = f"abstained (closest: {row['predicted']} {row['confidence']:.2f})"
        else:
            what = f"{row['label']} {row['confidence']:.2f}"
        scale = f"{row['um_per_px']:.3g} um/px ({row['scale_source']})" if row["um_per_px"] else (row["scale_source"] or "")
        tiles = f"{row['tiles_used']}/{row['tiles']} tiles" if row["tiles"] else ""
        lines.append(f"{path:<{width}}  {what:<40}  {scale:<28}  {tiles}".rstrip())
    return "\n".join(lines)


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "predict", help="classify image files and folders with a bundle (no TensorFlow needed)",
        description="Classify files and folders with a bundle through the device runtime: one row per image "
                    "(label, probabilities, abstention, capture quality, scale, tiles); broken files become rows "
                    "with an error. " + RESEARCH_NOTICE)
    parser.add_argument("bundle", metavar="BUNDLE", help="bundle folder or archive (from `leukoedge convert`)")
    parser.add_argument("paths", nargs="+", metavar="PATH", help="image files and/or folders (searched recursively)")
    parser.add_argument("--um-per-px", type=float, metavar="X",
                        help="micrometres per pixel of these images (default: estimated per image from its red "
                             "cells when the bundle records its training scale)")
    out = parser.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="print one JSON document with every row")
    out.add_argument("--csv", metavar="FILE", help="write the rows as CSV to FILE (atomically)")
    parser.add_argument("--threads", type=int, default=None, help="interpreter CPU threads (default: the runtime's)")
    parser.add_argument("--edgetpu", choices=("auto", "off", "on"), default="auto",
                        help="use a Coral Edge TPU when the bundle has a compiled model (default auto)")
    parser.add_argument("--allow-invalid", action="store_true",
                        help="use a bundle whose parity gate failed (for debugging only)")
    parser.set_defaults(func=_predict)


def _predict(args: argparse.Namespace) -> int:
    from .bundle import load_bundle
    from .runtime.classifier import Classifier

    if args.um_per_px is not None and not (0 < args.um_per_px < 1e4):
        raise UsageError(f"--um-per-px must be a positive number of micrometres per pixel, got {args.um_per_px}")
    inputs = collect_inputs(args.paths)
    if inputs.missing:
        raise UsageError("no such file or folder: " + ", ".join(str(p) for p in inputs.missing))
    if not inputs.files:
        raise UsageError(f"no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) under {', '.join(args.paths)}")
    classifier = Classifier(load_bundle(args.bundle, allow_invalid=args.allow_invalid),
                            num_threads=args.threads, edgetpu=args.edgetpu)
    labels = list(classifier.bundle.labels)
    rows = list(predict_rows(classifier, inputs.files, um_per_px=args.um_per_px, progress=sys.stderr.isatty()))
    summary = summarise(rows, labels)
    info = classifier.info()
    if args.json:
        doc = {"notice": RESEARCH_NOTICE, "bundle": Path(str(info["bundle"])).name, "model": info["model"],
               "version": info["version"], "bundle_sha256": info["bundle_sha256"], "labels": labels,
               "um_per_px_given": args.um_per_px, "summary": summary, "rows": rows}
        sys.stdout.write(json.dumps(doc, indent=2, allow_nan=False) + "\n")
    else:
        if args.csv:
            atomic_write_text(Path(args.csv), rows_to_csv(rows, labels))
        else:
            print(rows_to_table(rows))
        counts = ", ".join(f"{name} {n}" for name, n in summary["counts"].items())
        print(f"{summary['images']} images: {counts}; abstained {summary['abstained']}, retake {summary['retake']}, "
              f"failed {summary['failed']}" + (f"; rows written to {args.csv}" if args.csv else ""), file=sys.stderr)
        print(RESEARCH_NOTICE, file=sys.stderr)
    # Exit 3 (an image error) only when nothing could be classified: a batch with a few bad files succeeded.
    return 3 if summary["failed"] == len(rows) else 0
