"""Dataset readers: one function per published layout, auto-detected.

Each reader turns a folder into :class:`~leukoedge.data.records.Record` s with
the canonical label, the group that must never straddle splits (patient id
where the dataset has one) and the capture-order number where file names carry
one. Layouts are registered by name (timm-style), so ``--layout NAME`` can force
one and an unknown name lists the valid ones.

Detection tries the specific layouts first (a device's reviewed-images export,
recognised by its ``reviewed.json``, before all: its class folders may carry
the Taleqani names) and the generic class-per-folder last; when nothing matches, the error lists what was found at the top of the
folder so the user can see why.
"""
from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..errors import DatasetError, UsageError
from ..files import IMAGE_SUFFIXES, image_files
from . import reviewed
from .records import Record


@dataclass(frozen=True)
class Layout:
    """A dataset layout: how to recognise it and how to read it."""

    name: str
    description: str
    detect: Callable[[Path], bool]
    read: Callable[[Path], list[Record]]


_LAYOUTS: dict[str, Layout] = {}


def register_layout(name: str, description: str, detect: Callable[[Path], bool]):
    def wrap(read: Callable[[Path], list[Record]]):
        _LAYOUTS[name] = Layout(name, description, detect, read)
        return read

    return wrap


def list_layouts() -> list[Layout]:
    return list(_LAYOUTS.values())


def _images(folder: Path) -> list[Path]:
    """Image files below ``folder`` (recursively), sorted, hidden files skipped (judged below ``folder`` only)."""
    return image_files(folder, skip_hidden=True)


def _all_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))


def _rel(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()


def _number(name: str) -> int | None:
    found = re.findall(r"\d+", Path(name).stem)
    return int(found[-1]) if found else None


def _subdirs(path: Path) -> dict[str, Path]:
    return {p.name: p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")} if path.is_dir() else {}


# --- a device's reviewed-images export (first: its folders may look like any layout) ---


@register_layout("reviewed", "a device's reviewed-images export: reviewed.json + one folder per reviewer label "
                 "(groups = samples)", lambda root: (root / reviewed.MANIFEST_NAME).is_file())
def read_reviewed(root: Path) -> list[Record]:
    """Class folders (names decoded by :func:`.reviewed.folder_label`) with groups from ``reviewed.json``.

    An image the manifest does not list (added by hand) is its own group and has
    no capture order; an image the manifest lists but the folder lacks (deleted
    by hand) is simply not read.
    """
    known = reviewed.provenance(root)
    records = []
    for name, folder in sorted(_subdirs(root).items()):
        label = reviewed.folder_label(name)
        for path in _images(folder):
            rel = _rel(path, root)
            group, order = known.get(rel, (f"file:{rel}", None))
            records.append(Record(rel, label, group, order))
    return records


# --- Taleqani ALL -----------------------------------------------------------

TALEQANI_LABELS = ("Benign", "Early Pre-B", "Pre-B", "Pro-B")
_TALEQANI_FOLDERS = {
    # published "Original/" and "Segmented/" naming
    "benign": "Benign", "early": "Early Pre-B", "pre": "Pre-B", "pro": "Pro-B",
    # the other public naming of the same set
    "[malignant] early pre-b": "Early Pre-B", "[malignant] pre-b": "Pre-B", "[malignant] pro-b": "Pro-B",
    "early pre-b": "Early Pre-B", "pre-b": "Pre-B", "pro-b": "Pro-B",
}


def _taleqani_class_dirs(root: Path) -> dict[str, Path] | None:
    """label -> folder when ``root`` holds the four Taleqani class folders."""
    found = {}
    for name, path in _subdirs(root).items():
        label = _TALEQANI_FOLDERS.get(name.lower())
        if label:
            found[label] = path
    return found if set(found) == set(TALEQANI_LABELS) else None


def _taleqani_base(root: Path, variant: str = "Original") -> Path | None:
    for candidate in (root / variant, root / variant.lower(), root):
        if candidate.is_dir() and _taleqani_class_dirs(candidate):
            return candidate
    return None


@register_layout("taleqani", "Taleqani ALL: Original/{Benign,Early,Pre,Pro} or Benign, [Malignant] early Pre-B, ...",
                 lambda root: _taleqani_base(root) is not None)
def read_taleqani(root: Path, variant: str = "Original") -> list[Record]:
    base = _taleqani_base(root, variant)
    if base is None:
        raise DatasetError(f"{root}: no Taleqani class folders (Benign, Early, Pre, Pro) under {variant}/")
    records = []
    for label, folder in sorted(_taleqani_class_dirs(base).items()):
        for path in _images(folder):
            records.append(Record(_rel(path, root), label, None, _number(path.name)))
    return records


def _segmented_only(root: Path) -> bool:
    """Only the Segmented/ variant is present (with both, auto picks Original)."""
    return _taleqani_base(root, "Original") is None and _taleqani_base(root, "Segmented") not in (None, root)


@register_layout("taleqani-segmented", "Taleqani ALL, the Segmented/{Benign,Early,Pre,Pro} variant (cells cut out)",
                 _segmented_only)
def read_taleqani_segmented(root: Path) -> list[Record]:
    return read_taleqani(root, "Segmented")


# --- C-NMC 2019 -------------------------------------------------------------

_CNMC_NAME = re.compile(r"^UID_(H?\d+)_(\d+)_(\d+)_(all|hem)\.bmp$", re.IGNORECASE)


def _cnmc_detect(root: Path) -> bool:
    training = root / "training_data"
    return training.is_dir() and any((training / f"fold_{i}").is_dir() for i in range(3))


@register_layout("cnmc", "C-NMC 2019: training_data/fold_{0,1,2}/{all,hem}/UID_<patient>_<image>_<cell>_{all,hem}.bmp",
                 _cnmc_detect)
def read_cnmc(root: Path) -> list[Record]:
    records = []
    for path in _images(root / "training_data"):
        m = _CNMC_NAME.match(path.name)
        if not m:
            continue
        patient, _image, _cell, kind = m.groups()
        records.append(Record(_rel(path, root), kind.upper(), f"patient-{patient.upper()}", None))
    records += _read_cnmc_validation(root)
    return records


def _read_cnmc_validation(root: Path) -> list[Record]:
    """The preliminary-test folder: images named 1.bmp... with labels in a CSV.

    The CSV has a header with the new name and the label (1 = ALL, 0 = HEM), and
    usually the original UID_ name, from which the patient id is taken.
    """
    out = []
    for csv_path in sorted(root.rglob("*.csv")):
        if "training_data" in csv_path.parts:
            continue
        with csv_path.open(newline="") as fh:
            rows = list(csv.DictReader(fh))
        if not rows:
            continue
        keys = {k.lower(): k for k in rows[0]}
        name_key = keys.get("new_names") or keys.get("new_name") or keys.get("image")
        label_key = keys.get("labels") or keys.get("label")
        if not (name_key and label_key):
            continue
        orig_key = keys.get("patient_id") or keys.get("original_name")
        # one directory walk per CSV, not one per row (the real CSV has ~1,900 rows)
        by_name: dict[str, Path] = {}
        for image in _images(csv_path.parent):
            if "training_data" not in image.relative_to(root).parts:
                by_name.setdefault(image.name, image)
        for row in rows:
            match = by_name.get(row[name_key].strip())
            if match is None:
                continue
            label = "ALL" if str(row[label_key]).strip() in ("1", "all", "ALL") else "HEM"
            group = None
            if orig_key and (m := _CNMC_NAME.match(row[orig_key].strip())):
                group = f"patient-{m.group(1).upper()}"
            out.append(Record(_rel(match, root), label, group or f"val-{row[name_key]}", None))
    return out


# --- ALL-IDB ----------------------------------------------------------------

_ALLIDB_NAME = re.compile(r"^Im(\d{3})_([01])\.(jpg|tif)$", re.IGNORECASE)


def _allidb_detect(root: Path) -> bool:
    files = _images(root)
    return bool(files) and sum(bool(_ALLIDB_NAME.match(p.name)) for p in files) >= 0.9 * len(files)


@register_layout("allidb", "ALL-IDB1/ALL-IDB2: ImNNN_Y.jpg|tif, Y = 1 blast (ALL), 0 normal", _allidb_detect)
def read_allidb(root: Path) -> list[Record]:
    records = []
    for path in _images(root):
        m = _ALLIDB_NAME.match(path.name)
        if m:
            records.append(Record(_rel(path, root), "ALL" if m.group(2) == "1" else "Normal", None, int(m.group(1))))
    return records


# --- four-type leukemia -----------------------------------------------------

FOUR_TYPES = ("ALL", "AML", "CLL", "CML")


def _four_type_dirs(root: Path) -> dict[str, Path] | None:
    dirs = {name.upper(): p for name, p in _subdirs(root).items() if name.upper() in FOUR_TYPES}
    return dirs if set(dirs) == set(FOUR_TYPES) else None


@register_layout("four-type", "four leukemia types: ALL/ AML/ CLL/ CML/ folders", lambda root: _four_type_dirs(root) is not None)
def read_four_type(root: Path) -> list[Record]:
    records = []
    for label, folder in sorted((_four_type_dirs(root) or {}).items()):
        records += [Record(_rel(p, root), label, None, _number(p.name)) for p in _images(folder)]
    return records


# --- generic class-per-folder (last) ---------------------------------------


def _class_folders(root: Path) -> dict[str, Path]:
    return {name: p for name, p in _subdirs(root).items() if _images(p)}


@register_layout("class-folders", "generic: one sub-folder of images per class",
                 lambda root: len(_class_folders(root)) >= 2)
def read_class_folders(root: Path) -> list[Record]:
    records = []
    for label, folder in sorted(_class_folders(root).items()):
        records += [Record(_rel(p, root), label, None, _number(p.name)) for p in _images(folder)]
    return records


# --- entry point ------------------------------------------------------------


def detect_layout(root: str | Path) -> str:
    root = Path(root)
    for layout in _LAYOUTS.values():
        if layout.detect(root):
            return layout.name
    found = sorted(p.name + ("/" if p.is_dir() else "") for p in root.iterdir())[:20]
    raise DatasetError(
        f"{root}: no known dataset layout. Found at the top: {', '.join(found) or 'nothing'}",
        hint="expected one of: " + "; ".join(f"{l.name} ({l.description})" for l in _LAYOUTS.values())
        + ". Force one with --layout NAME.",
    )


def read_dataset(root: str | Path, layout: str = "auto") -> tuple[str, list[Record]]:
    """(layout name, records sorted by label then order then path) for a dataset folder."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: no such folder")
    if layout == "auto":
        layout = detect_layout(root)
    elif layout not in _LAYOUTS:
        raise UsageError(f"unknown layout {layout!r}; valid: {', '.join(_LAYOUTS)}")
    records = _LAYOUTS[layout].read(root)
    if not records:
        raise DatasetError(f"{root}: no images found in the {layout} layout ({_LAYOUTS[layout].description})",
                           hint="check the folder, or let the layout be detected (--layout auto)")
    records.sort(key=lambda r: (r.label, r.order if r.order is not None else -1, r.path))
    return layout, records


def non_image_files(root: str | Path) -> list[Path]:
    """Files in the dataset that are not images by extension (reported by checks)."""
    root = Path(root)
    return [p for p in _all_files(root) if p.suffix.lower() not in IMAGE_SUFFIXES and p.suffix.lower() not in {".csv", ".txt", ".md", ".json"}]
