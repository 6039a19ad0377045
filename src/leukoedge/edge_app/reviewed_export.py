"""The reviewed images as a training set: corrections become training data (issue 16).

Every reviewed result's ORIGINAL capture goes into the folder of the
reviewer's label, ``<Label>/<result_id><ext>``, with ONE manifest,
``reviewed.json``, at the root (format: :mod:`leukoedge.data.reviewed`, which
the data layer reads back: ``leukoedge data check`` sees a class-folder
dataset, ``leukoedge train --data ORIG --data EXPORT`` groups its images by
sample). What is left out, and why:

- ``unusable`` reviews: the reviewer said no class fits the field; such an
  image would teach the model a class it does not have. Counted in the
  manifest's ``left_out``.
- results deleted after review: their row is gone, so they are not listed.
- a result whose original file is missing (a damaged card, or deleted while
  the export was being written): left out and counted, never half-listed.
- Retakes (refused by the quality gate) that a reviewer still gave a class to
  ARE exported: the reviewer's label is the truth about the field, and captures
  the device finds hard are what a model most needs to see; ``retake`` and the
  quality reasons are in the manifest, so a training set can drop them.

Memory: the rows are read from SQLite in batches and kept as small metadata
(one dict per image, for the manifest); images are copied from disk into the
zip in :data:`CHUNK` pieces and each piece is handed to the caller before the
next is read, so a thousand 12 MP captures never sit in memory. The zip is
STORED (JPEG and PNG do not compress further; a Pi's CPU is better spent
elsewhere) and ``reviewed.json`` is written LAST, so it lists exactly the
images the zip holds even if a file vanishes mid-export.

Folder names come from the labels, which come from the bundle and, through a
review, from a client: they are never trusted as paths (encoded by
:func:`leukoedge.data.reviewed.label_folder`), and two labels that would share
a folder on a case-insensitive file system (macOS, Windows) are refused.

Imports neither Flask nor TensorFlow: the CLI (``leukoedge data reviewed``)
uses it on a data folder copied off the device.
"""
from __future__ import annotations

import io
import json
import shutil
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Iterator

from .. import RESEARCH_NOTICE
from ..data import reviewed as fmt
from ..errors import DatasetError, UsageError
from ..files import atomic_path, write_json
from .storage import REVIEW_UNUSABLE, ResultStore, SampleNotFoundError, StoredResult, iso_time

#: Bytes copied from an image file into the zip before the zip's output is handed on.
CHUNK = 256 * 1024


class NothingToExportError(DatasetError):
    """No reviewed result can be exported (none reviewed yet, or all unusable or missing)."""

    http_status = 404


@dataclass(frozen=True)
class _Item:
    """One image to export: where it is now, where it goes, and its manifest entry."""

    source: Path
    arcname: str
    captured_at: float
    entry: dict


@dataclass
class ExportPlan:
    """What an export will hold, decided from the database before any image is copied.

    Planning first means an empty export fails with a clear error before a
    download starts (an HTTP response cannot turn into an error half-way).
    """

    items: list[_Item]
    left_out: dict[str, int] = field(default_factory=dict)
    exported_at: float = field(default_factory=time.time)

    def manifest(self, written: list[_Item]) -> dict:
        """``reviewed.json`` for the images actually written."""
        by_label: dict[str, int] = {}
        for item in written:
            by_label[item.entry["reviewer_label"]] = by_label.get(item.entry["reviewer_label"], 0) + 1
        left_out = dict(self.left_out)
        vanished = len(self.items) - len(written)
        if vanished:
            left_out["missing_file"] = left_out.get("missing_file", 0) + vanished
        return {
            "format": fmt.FORMAT,
            "version": fmt.VERSION,
            "research_notice": RESEARCH_NOTICE,
            "exported_at": self.exported_at,
            "exported": iso_time(self.exported_at),
            "layout": "one folder per reviewer label (name percent-encoded where a label is not a safe folder "
                      "name); each image is the original capture",
            "counts": {"images": len(written), "by_label": dict(sorted(by_label.items())), "left_out": left_out},
            "images": [item.entry for item in written],
        }


def plan_export(store: ResultStore) -> ExportPlan:
    """The images of every exportable reviewed result, oldest first (see the module docstring).

    Raises:
        NothingToExportError: no reviewed result can be exported.
        DatasetError: two review labels that would share a folder on a case-insensitive file system.
    """
    items: list[_Item] = []
    left_out = {"unusable": 0, "missing_file": 0}
    samples: dict[str, str | None] = {}
    folders: dict[str, str] = {}  # casefolded folder -> label
    for result in store.iter_reviewed():
        if result.review_label == REVIEW_UNUSABLE:
            left_out["unusable"] += 1
            continue
        source = store.file_path(result.id, "original", result.original_ext)
        if not source.is_file():
            left_out["missing_file"] += 1
            continue
        folder = fmt.label_folder(result.review_label)
        other = folders.setdefault(folder.casefold(), result.review_label)
        if other != result.review_label:
            raise DatasetError(f"review labels {other!r} and {result.review_label!r} would share one folder on a "
                               "case-insensitive file system", hint="re-review one of them with the bundle's "
                               "spelling of the class")
        arcname = f"{folder}/{result.id}{result.original_ext}"
        items.append(_Item(source, arcname, result.created_at, _entry(result, arcname, _sample_name(store, result,
                                                                                                     samples))))
    if not items:
        raise NothingToExportError(
            "no reviewed images to export" + (f" ({left_out['unusable']} unusable, {left_out['missing_file']} "
                                              "without their image file)" if any(left_out.values()) else ""),
            hint="review results on the Review page first (a label other than 'unusable')")
    return ExportPlan(items, left_out)


def _sample_name(store: ResultStore, result: StoredResult, cache: dict[str, str | None]) -> str | None:
    """The name of the result's sample, looked up once per sample (None: in no sample, or deleted meanwhile)."""
    if not result.sample_id:
        return None
    if result.sample_id not in cache:
        try:
            cache[result.sample_id] = store.get_sample(result.sample_id).name
        except SampleNotFoundError:
            cache[result.sample_id] = None
    return cache[result.sample_id]


def _entry(result: StoredResult, path: str, sample_name: str | None) -> dict:
    """One image's provenance in ``reviewed.json``."""
    quality = result.quality or {}
    return {
        "path": path,
        "result_id": result.id,
        "captured_at": result.created_at,
        "captured": iso_time(result.created_at),
        "source": result.source,
        "sample_id": result.sample_id,
        "sample_name": sample_name,
        "model_name": result.model_name,
        "model_version": result.model_version,
        # the bundle that classified the capture (None: stored before results recorded it)
        "bundle_sha256": result.bundle_sha256,
        "predicted_label": result.label,
        "abstained": result.abstained,
        "retake": result.retake,
        "quality_reasons": list(quality.get("reasons") or ()),
        "confidence": result.confidence,
        "probabilities": result.probabilities,
        "ood_score": result.ood_score,
        "reviewer_label": result.review_label,
        "review_note": result.review_note or "",
        "reviewed_at": result.reviewed_at,
        "um_per_px": result.um_per_px,
        "scale_source": result.scale_source,
        "width": result.width,
        "height": result.height,
    }


# --- writers ------------------------------------------------------------------------------------------------


class _Sink(io.RawIOBase):
    """An unseekable file object that keeps what ``zipfile`` writes until :meth:`drain` hands it on."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        self._parts.append(bytes(data))
        return len(data)

    def drain(self) -> bytes:
        out = b"".join(self._parts)
        self._parts.clear()
        return out


def iter_zip(plan: ExportPlan) -> Iterator[bytes]:
    """The export as zip bytes, a piece at a time (at most about :data:`CHUNK` per piece, plus headers)."""
    sink = _Sink()
    written: list[_Item] = []
    with zipfile.ZipFile(sink, "w", compression=zipfile.ZIP_STORED) as zf:
        for item in plan.items:
            try:
                src = item.source.open("rb")
            except FileNotFoundError:  # deleted since planning: left out, and so not in the manifest
                continue
            with src, zf.open(_zip_info(item.arcname, item.captured_at), "w") as dst:
                while chunk := src.read(CHUNK):
                    dst.write(chunk)
                    yield sink.drain()
            written.append(item)
            yield sink.drain()
        manifest = json.dumps(plan.manifest(written), indent=1).encode("utf-8")
        zf.writestr(_zip_info(fmt.MANIFEST_NAME, plan.exported_at), manifest)
    yield sink.drain()


def _zip_info(name: str, stamp: float) -> zipfile.ZipInfo:
    """A zip entry stamped with the capture time (zip dates start in 1980)."""
    info = zipfile.ZipInfo(name, date_time=time.localtime(max(stamp, 315532800.0))[:6])
    info.compress_type = zipfile.ZIP_STORED
    info.external_attr = 0o644 << 16
    return info


def write_zip(plan: ExportPlan, out: BinaryIO) -> int:
    """Stream the export into an open binary file; returns the bytes written."""
    total = 0
    for piece in iter_zip(plan):
        out.write(piece)
        total += len(piece)
    return total


def write_folder(plan: ExportPlan, out: Path) -> dict:
    """Write the export as a folder (each image copied atomically, ``reviewed.json`` last); returns the manifest.

    Raises:
        UsageError: ``out`` is a file, or a folder that is not empty (an export never mixes with other files).
    """
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"{out} exists and is not an empty folder", hint="export into a new folder")
    written = []
    for item in plan.items:
        try:
            src = item.source.open("rb")
        except FileNotFoundError:  # deleted since planning: left out, and so not in the manifest
            continue
        with src, atomic_path(out / item.arcname) as tmp, tmp.open("wb") as dst:
            shutil.copyfileobj(src, dst, CHUNK)
        written.append(item)
    manifest = plan.manifest(written)
    write_json(out / fmt.MANIFEST_NAME, manifest)
    return manifest


def export(store: ResultStore, out: Path) -> dict:
    """Export the store to ``out``: a zip file when it ends in ``.zip`` (written atomically), else a folder.

    Returns the manifest written. Raises :class:`NothingToExportError` when there is nothing to export.
    """
    out = Path(out)
    plan = plan_export(store)
    if out.suffix.lower() != ".zip":
        return write_folder(plan, out)
    if out.is_dir():
        raise UsageError(f"{out} is a folder", hint="name a new .zip file, or a folder without .zip")
    with atomic_path(out) as tmp, tmp.open("wb") as fh:
        write_zip(plan, fh)
    with zipfile.ZipFile(out) as zf:
        return json.loads(zf.read(fmt.MANIFEST_NAME))
