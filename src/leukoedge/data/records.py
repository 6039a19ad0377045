"""The record and split-manifest types every stage shares.

A :class:`Record` is one image of a dataset: where it is, its class, the group
that must never straddle splits (a patient, when the dataset has patient ids)
and its capture-order number (when file names carry one). A :class:`Manifest`
assigns every record to train / val / test once; training, evaluation,
calibration and the parity gate all read the same manifest, so no stage can
quietly re-split the data.

Several roots (issue 16: the original dataset plus a device's reviewed-images
export): ``Manifest.roots`` lists the dataset roots and every entry's ``root``
is an index into it, so a path stays relative to the folder it came from and
the same relative path may exist under two roots. ``Manifest.root`` is
``roots[0]`` (the primary dataset, which defines the classes). Every stage
opens an image through :meth:`Manifest.resolve`, never by joining ``root``
itself. Files: a one-root manifest is written exactly as before (version 1, no
``roots`` or per-entry ``root``), so older readers and older run folders stay
valid; a manifest of several roots is version 2. Both are read.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Iterable, Sequence, Union

from ..errors import ManifestError
from ..files import write_json

SPLITS = ("train", "val", "test")
#: A root override: None (as recorded), one path, or one path per root.
RootsOverride = Union[str, Path, Sequence[Union[str, Path]], None]
#: group: by patient; block: contiguous capture-order blocks per class;
#: random: image-level random split (leaky wherever neighbours are related).
#: mixed: several roots, each split by its own kind (``params["per_root"]``): grouped roots by
#: group, the others by capture-order block (see :mod:`leukoedge.data.split`).
SPLIT_KINDS = ("group", "block", "random", "mixed")
#: Version written for a manifest of several roots; one root is still written as version 1.
MANIFEST_VERSION = 2
READABLE_VERSIONS = (1, 2)


@dataclass(frozen=True)
class Record:
    """One image.

    Attributes:
        path: POSIX path relative to the dataset root.
        label: canonical class name (e.g. ``"Pre-B"``).
        group: id of the unit that must stay within one split (patient id), or None.
        order: capture-order number parsed from the file name, or None.
        root: index of the dataset root the path is relative to (0 for one root).
    """

    path: str
    label: str
    group: str | None = None
    order: int | None = None
    root: int = 0


@dataclass(frozen=True)
class ManifestEntry(Record):
    """A record with its split."""

    split: str = "train"


@dataclass(frozen=True)
class Manifest:
    """A deterministic split of a dataset; see module docstring.

    Attributes:
        root: absolute dataset root when the manifest was made (the first of ``roots``).
        layout: the reader that produced the records (e.g. ``"taleqani"``; of the first root
            when there are several: ``params["per_root"]`` has each root's).
        classes: class names in label-index order.
        split_kind: one of :data:`SPLIT_KINDS`.
        seed: the seed used.
        entries: one per image.
        params: how it was made (fractions, duplicate handling, ...).
        roots: every dataset root, entries' ``root`` indexing it; empty means ``(root,)``.
    """

    root: str
    layout: str
    classes: tuple[str, ...]
    split_kind: str
    seed: int
    entries: tuple[ManifestEntry, ...]
    params: dict = field(default_factory=dict)
    roots: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        roots = tuple(str(r) for r in self.roots) or (str(self.root),)
        if roots[0] != str(self.root):
            raise ManifestError(f"manifest root {self.root!r} is not the first of its roots {list(roots)}")
        object.__setattr__(self, "roots", roots)

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

    def resolve(self, entry: Record, root: RootsOverride = None) -> Path:
        """Absolute path of an entry, under ``root`` if the data has moved (see :meth:`roots_for`)."""
        return Path(self.roots_for(root)[entry.root]) / entry.path

    def roots_for(self, override: RootsOverride = None) -> tuple[str, ...]:
        """The roots to open images under: the manifest's own, or ``override`` where the data moved.

        ``override`` is None (the recorded roots), one path or a sequence of one
        path per root, in the manifest's order. One path is only unambiguous for
        a one-root manifest; for several roots it is accepted when it names the
        recorded first root (what a run's ``config.json["data_root"]`` holds),
        and refused otherwise rather than guessing which root moved.
        """
        if override is None or override == "":
            return self.roots
        if isinstance(override, (str, Path)):
            if len(self.roots) == 1:
                return (str(override),)
            if Path(override) == Path(self.roots[0]):
                return self.roots
            raise ManifestError(f"one data root ({override}) given for a manifest of {len(self.roots)} roots "
                                f"({', '.join(self.roots)})",
                                hint="give every root, in the manifest's order (repeat --data / --data-root)")
        given = tuple(str(r) for r in override)
        if len(given) != len(self.roots):
            raise ManifestError(f"{len(given)} data root(s) given for a manifest of {len(self.roots)} "
                                f"({', '.join(self.roots)})",
                                hint="give every root, in the manifest's order (repeat --data / --data-root)")
        return given

    def with_root(self, root: RootsOverride) -> "Manifest":
        """The same manifest with its roots moved (``root``: as for :meth:`roots_for`)."""
        roots = tuple(str(Path(r).resolve()) for r in self.roots_for(root))
        return replace(self, root=roots[0], roots=roots)

    def key(self, entry: Record) -> tuple[int, str]:
        """What identifies an image across roots: (root index, relative path)."""
        return entry.root, entry.path

    def to_dict(self) -> dict:
        single = len(self.roots) == 1
        out = {
            "version": 1 if single else MANIFEST_VERSION,
            "root": self.root,
            "layout": self.layout,
            "classes": list(self.classes),
            "split_kind": self.split_kind,
            "leaky": self.leaky,
            "seed": self.seed,
            "params": self.params,
            "counts": self.counts(),
            "entries": [_entry_dict(e, single) for e in self.entries],
        }
        if not single:
            out["roots"] = list(self.roots)
        return out

    def save(self, path: str | Path) -> Path:
        """Write the manifest as JSON, atomically (a crash never leaves half a manifest)."""
        return write_json(path, self.to_dict())

    @classmethod
    def from_dict(cls, data: dict) -> "Manifest":
        try:
            if data.get("version") not in READABLE_VERSIONS:
                raise ManifestError(f"manifest version {data.get('version')!r} is not one of "
                                    f"{', '.join(map(str, READABLE_VERSIONS))}",
                                    hint="it was written by a newer leukoedge; upgrade, or split again")
            entries = tuple(ManifestEntry(**e) for e in data["entries"])
            manifest = cls(
                root=data["root"],
                layout=data["layout"],
                classes=tuple(data["classes"]),
                split_kind=data["split_kind"],
                seed=int(data["seed"]),
                entries=entries,
                params=dict(data.get("params", {})),
                roots=tuple(data.get("roots") or (data["root"],)),
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
        seen: set[tuple[int, str]] = set()
        group_split: dict[str, str] = {}
        for e in self.entries:
            if e.split not in SPLITS:
                raise ManifestError(f"{e.path}: unknown split {e.split!r}")
            if e.label not in classes:
                raise ManifestError(f"{e.path}: label {e.label!r} is not one of {sorted(classes)}")
            if not isinstance(e.root, int) or not 0 <= e.root < len(self.roots):
                raise ManifestError(f"{e.path}: root index {e.root!r} is not one of the {len(self.roots)} root(s)")
            if self.key(e) in seen:
                raise ManifestError(f"{e.path}: listed twice" + (f" under root {e.root}" if len(self.roots) > 1 else ""))
            seen.add(self.key(e))
            if e.group is not None and self.split_kind in ("group", "mixed"):
                if group_split.setdefault(e.group, e.split) != e.split:
                    raise ManifestError(f"group {e.group!r} straddles splits")


def _entry_dict(entry: ManifestEntry, single: bool) -> dict:
    """An entry as JSON; one-root manifests leave out ``root`` (version 1 has no such key)."""
    d = asdict(entry)
    if single:
        d.pop("root")
    return d


def class_names(records: Iterable[Record]) -> tuple[str, ...]:
    """Sorted distinct labels: the label-index order used everywhere."""
    return tuple(sorted({r.label for r in records}))
