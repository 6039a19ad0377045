"""Every image's answer, kept beside the metrics: ``predictions.csv`` and the error gallery.

Why: an accuracy says how many images a model gets wrong, never which. A lab
that wants to know whether its errors are ambiguous fields, mislabelled
images or one stain batch has to look at them, and comparing two models (or
seeds) image by image needs their answers on the same rows. So evaluation
writes one CSV row per image of the split (path as in the manifest, true
label, predicted label, confidence, every class probability) and a gallery of
the misclassified images, the most confidently wrong first.

The CSV opens in any spreadsheet; :func:`read_predictions` reads it back
without TensorFlow (``benchmarks/error_overlap.py`` does, over several runs).
"""
from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import RunError
from ..files import atomic_write_text

#: How many misclassified images the gallery shows (the most confident errors).
GALLERY_MAX = 24

_FIXED = ("path", "root", "label", "predicted", "confidence", "correct")


@dataclass(frozen=True)
class Prediction:
    """One image's answer, as read back from ``predictions.csv``."""

    path: str
    root: int
    label: str
    predicted: str
    confidence: float
    probabilities: dict[str, float]

    @property
    def correct(self) -> bool:
        return self.label == self.predicted

    @property
    def key(self) -> tuple[int, str]:
        """What identifies the image across runs made on the same manifest."""
        return self.root, self.path


def write_predictions(path: str | Path, entries: Sequence, y: np.ndarray, probs: np.ndarray,
                      classes: Sequence[str]) -> Path:
    """Write one row per image (manifest order) to ``path`` atomically; returns the path."""
    if len(entries) != len(y) or len(y) != len(probs):
        raise ValueError(f"{len(entries)} entries, {len(y)} labels and {len(probs)} probability rows differ")
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow([*_FIXED, *(f"p_{c}" for c in classes)])
    predicted = np.asarray(probs).argmax(1) if len(probs) else np.zeros(0, int)
    for entry, label, row, pred in zip(entries, y, probs, predicted):
        writer.writerow([entry.path, getattr(entry, "root", 0), classes[int(label)], classes[int(pred)],
                         f"{float(row[pred]):.6f}", int(int(label) == int(pred)),
                         *(f"{float(p):.6f}" for p in row)])
    return atomic_write_text(path, buf.getvalue())


def read_predictions(path: str | Path) -> list[Prediction]:
    """The rows of a ``predictions.csv``; :class:`RunError` when it is missing or not one."""
    path = Path(path)
    if not path.is_file():
        raise RunError(f"{path} not found", hint="run `leukoedge eval RUN_DIR` to write every image's answer")
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        if any(k not in header for k in _FIXED):
            raise RunError(f"{path} is not a leukoedge predictions file (columns {', '.join(header) or 'none'})")
        classes = [k[2:] for k in header if k.startswith("p_")]
        try:
            return [Prediction(path=r["path"], root=int(r["root"]), label=r["label"], predicted=r["predicted"],
                               confidence=float(r["confidence"]),
                               probabilities={c: float(r[f"p_{c}"]) for c in classes}) for r in reader]
        except (TypeError, ValueError) as err:
            raise RunError(f"{path}: a row cannot be read ({err})") from None


def errors_by_confidence(y: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """Indices of the misclassified images, the most confidently wrong first (ties: manifest order)."""
    probs = np.asarray(probs)
    if not len(probs):
        return np.zeros(0, dtype=int)
    predicted = probs.argmax(1)
    wrong = np.flatnonzero(predicted != np.asarray(y))
    confidence = probs[wrong, predicted[wrong]]
    return wrong[np.argsort(-confidence, kind="stable")]


def gallery_examples(x: np.ndarray, entries: Sequence, y: np.ndarray, probs: np.ndarray,
                     classes: Sequence[str], errors: np.ndarray, limit: int = GALLERY_MAX) -> list[dict]:
    """The gallery's tiles (``image``, ``title``, ``wrong``) for :func:`leukoedge.train.plots.audit_panel`.

    ``errors``: the misclassified indices in gallery order (:func:`errors_by_confidence`).
    """
    examples = []
    for i in errors[:limit]:
        pred = int(np.argmax(probs[i]))
        name = Path(entries[i].path).name
        examples.append({"image": x[i], "wrong": True,
                         "title": f"{classes[int(y[i])]} -> {classes[pred]} ({probs[i][pred]:.2f})\n{name[:28]}"})
    return examples


def pool_predictions(folds: Sequence[tuple[int, Path]], out: str | Path) -> int | None:
    """A cross-validation's ``predictions.csv``: every fold's test rows, with a ``fold`` column first.

    Each image is in exactly one fold's test set, so the pooled file answers
    "which of my images does the model get wrong" once per image, each by the
    fold model that never saw it. Returns the number of rows, or None (and no
    file: a stale one is removed) when a finished fold has no predictions file
    (evaluated before they were kept; ``leukoedge eval RUN/fold-k`` writes it).
    """
    out = Path(out)
    buf, header = io.StringIO(), None
    writer = csv.writer(buf, lineterminator="\n")
    rows = 0
    for k, path in folds:
        if not Path(path).is_file():
            out.unlink(missing_ok=True)
            return None
        with Path(path).open(newline="") as f:
            reader = csv.reader(f)
            head = next(reader, None)
            if head is None or any(c not in head for c in _FIXED):
                raise RunError(f"{path} is not a leukoedge predictions file")
            if header is None:
                header = head
                writer.writerow(["fold", *head])
            elif head != header:
                raise RunError(f"{path} has other columns than fold {folds[0][0]}'s predictions (other classes?)")
            for row in reader:
                writer.writerow([k, *row])
                rows += 1
    if header is None:
        return None
    atomic_write_text(out, buf.getvalue())
    return rows
