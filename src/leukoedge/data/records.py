"""The record and split-manifest types every stage shares.

A :class:`Record` is one image of a dataset: where it is, its class, the group
that must never straddle splits (a patient, when the dataset has patient ids)
and its capture-order number (when file names carry one). A :class:`Manifest`
assigns every record to train / val / test once; training, evaluation,
calibration and the parity gate all read the same manifest, so no stage can
quietly re-split the data.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Iterable

from ..errors import ManifestError
from ..files import write_json

SPLITS = ("train", "val", "test")
#: group: by patient; block: contiguous capture-order blocks per class;
#: random: image-level random split (leaky wherever neighbours are related).
SPLIT_KINDS = ("group", "block", "random")
MANIFEST_VERSION = 1


@dataclass(frozen=True)
class Record:
    """One image.

    Attributes:
        path: POSIX path relative to the dataset root.
        label: canonical class name (e.g. ``"Pre-B"``).
        group: id of the unit that must stay within one split (patient id), or None.
        order: capture-order number parsed from the file name, or None.
    """

    path: str
    label: str
    group: str | None = None
    order: int | None = None


@dataclass(frozen=True)
class ManifestEntry(Record):
    """A record with its split."""

    split: str = "train"


@dataclass(frozen=True)
class Manifest:
    """A deterministic split of a dataset; see module docstring.

    Attributes:
        root: absolute dataset root when the manifest was made.
        layout: the reader that produced the records (e.g. ``"taleqani"``).
        classes: class names in label-index order.
        split_kind: one of :data:`SPLIT_KINDS`.
        seed: the seed used.
        entries: one per image.
        params: how it was made (fractions, duplicate handling, ...).
    """

    root: str
    layout: str
    classes: tuple[str, ...]
    split_kind: str
    seed: int
    entries: tuple[ManifestEntry, ...]
    params: dict = field(default_factory=dict)

    @property
    def leaky(self) -> bool:
        """A random image-level split overstates accuracy; reports must say so."""
        return self.split_kind == "random"

    def subset(self, split: str) -> list[ManifestEntry]:
        if split not in SPLITS:
            raise ManifestError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
        return [e for e in self.entries if e.split == split]

    def counts(self) -> dict[str, dict[str, int]]:
        """split -> class -> number of images."""
        out = {s: {c: 0 for c in self.classes} for s in SPLITS}
        for e in self.entries:
            out[e.split][e.label] += 1
        return out

    def label_index(self, label: str) -> int:
        return self.classes.index(label)

    def resolve(self, entry: Record, root: str | Path | None = None) -> Path:
        """Absolute path of an entry, under ``root`` if the data has moved."""
        return Path(root or self.root) / entry.path

    def with_root(self, root: str | Path) -> "Manifest":
        return replace(self, root=str(Path(root).resolve()))

    def to_dict(self) -> dict:
        return {
            "version": MANIFEST_VERSION,
            "root": self.root,
            "layout": self.layout,
            "classes": list(self.classes),
            "split_kind": self.split_kind,
            "leaky": self.leaky,
            "seed": self.seed,
            "params": self.params,
            "counts": self.counts(),
            "entries": [asdict(e) for e in self.entries],
        }

    def save(self, path: str | Path) -> Path:
        """Write the manifest as JSON, atomically (a crash never leaves half a manifest)."""
        return write_json(path, self.to_dict())

    @classmethod
    def from_dict(cls, data: dict) -> "Manifest":
        try:
            if data.get("version") != MANIFEST_VERSION:
                raise ManifestError(f"manifest version {data.get('version')!r} is not {MANIFEST_VERSION}")
            entries = tuple(ManifestEntry(**e) for e in data["entries"])
            manifest = cls(
                root=data["root"],
                layout=data["layout"],
                classes=tuple(data["classes"]),
                split_kind=data["split_kind"],
                seed=int(data["seed"]),
                entries=entries,
                params=dict(data.get("params", {})),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise ManifestError(f"malformed manifest: {err}") from None
        manifest.validate()
        return manifest

    @classmethod
    def load(cls, path: str | Path) -> "Manifest":
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise ManifestError(f"{path}: no such manifest", hint="make one with `leukoedge data split`") from None
        except json.JSONDecodeError as err:
            raise ManifestError(f"{path}: not valid JSON ({err})") from None
        return cls.from_dict(data)

    def validate(self) -> None:
        """Refuse manifests that break the invariants later stages rely on."""
        if self.split_kind not in SPLIT_KINDS:
            raise ManifestError(f"unknown split kind {self.split_kind!r}")
        classes = set(self.classes)
        seen: set[str] = set()
        group_split: dict[str, str] = {}
        for e in self.entries:
            if e.split not in SPLITS:
                raise ManifestError(f"{e.path}: unknown split {e.split!r}")
            if e.label not in classes:
                raise ManifestError(f"{e.path}: label {e.label!r} is not one of {sorted(classes)}")
            if e.path in seen:
                raise ManifestError(f"{e.path}: listed twice")
            seen.add(e.path)
            if e.group is not None and self.split_kind == "group":
                if group_split.setdefault(e.group, e.split) != e.split:
                    raise ManifestError(f"group {e.group!r} straddles splits")


def class_names(records: Iterable[Record]) -> tuple[str, ...]:
    """Sorted distinct labels: the label-index order used everywhere."""
    return tuple(sorted({r.label for r in records}))
