"""``leukoedge data check``: what is wrong with a dataset before anyone trains on it.

Every image is decoded through :func:`leukoedge.preprocess.open_image`, so
"readable" here means readable by the one preprocessing path that training
and the device use. Reported: class counts, image sizes and modes,
unreadable / truncated / zero-byte / non-image files, exact duplicates
(SHA-256), near duplicates (perceptual hash) and duplicates that span classes
(a label error or a leak waiting to happen). Warned about: image size, mode,
format or file-name pattern confounded with the class, and a root that looks
like the parent of several datasets (:mod:`leukoedge.data.confounds`).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import InvalidImageError
from ..files import IMAGE_SUFFIXES, sha256_file
from ..preprocess import open_image, to_rgb
from .confounds import find_confounds, image_properties, looks_like_parent_of_datasets
from .hashing import fingerprint, group_pairs, near_duplicate_pairs
from .readers import read_dataset
from .records import Record


@dataclass(frozen=True)
class ImageFacts:
    """What one readable image looks like (``error`` set when it is not readable)."""

    record: Record
    sha256: str | None = None
    phash: int | None = None
    width: int | None = None
    height: int | None = None
    mode: str | None = None
    format: str | None = None
    error: str | None = None
    thumb: np.ndarray | None = field(default=None, repr=False, compare=False)


def scan(root: Path | Sequence[Path], records: list[Record], *, progress: bool = True) -> list[ImageFacts]:
    """Hash and decode every record (one pass; shared by check and split).

    ``root``: the dataset root, or the roots that the records' ``root`` index (a split of several roots).
    """
    roots = [Path(root)] if isinstance(root, (str, Path)) else [Path(r) for r in root]
    iterator = records
    if progress:
        from tqdm import tqdm

        iterator = tqdm(records, desc="scanning images", unit="img", leave=False)
    out = []
    for rec in iterator:
        path = roots[rec.root] / rec.path
        try:
            digest = sha256_file(path)
            img = open_image(path)
            hash64, thumb = fingerprint(to_rgb(img))
            fmt = img.format or path.suffix.lstrip(".").upper()  # EXIF-rotated copies lose .format
            facts = ImageFacts(rec, digest, hash64, img.width, img.height, img.mode, fmt, thumb=thumb)
        except InvalidImageError as err:
            out.append(ImageFacts(rec, error=err.message.split(": ", 1)[-1]))
            continue
        except OSError as err:
            out.append(ImageFacts(rec, error=f"cannot read ({err})"))
            continue
        out.append(facts)
    return out


def duplicate_groups(facts: list[ImageFacts]) -> tuple[list[list[int]], list[list[int]]]:
    """(exact groups, near groups) as lists of indices into ``facts``.

    Near groups are reported only when they are not already one exact group.
    """
    ok = [i for i, f in enumerate(facts) if f.error is None]
    by_hash: dict[str, list[int]] = {}
    for i in ok:
        by_hash.setdefault(facts[i].sha256, []).append(i)
    exact = sorted((g for g in by_hash.values() if len(g) > 1), key=lambda g: g[0])
    pairs = near_duplicate_pairs([facts[i].phash for i in ok], thumbs=[facts[i].thumb for i in ok])
    near = []
    for group in group_pairs(len(ok), pairs):
        members = [ok[j] for j in group]
        if len({facts[i].sha256 for i in members}) > 1:
            near.append(members)
    return exact, near


@dataclass
class CheckReport:
    root: str
    layout: str
    classes: dict[str, int]
    sizes: dict[str, int]
    modes: dict[str, int]
    formats: dict[str, int]
    errors: list[dict] = field(default_factory=list)
    duplicates: list[list[str]] = field(default_factory=list)
    near_duplicates: list[list[str]] = field(default_factory=list)
    cross_class_duplicates: list[list[str]] = field(default_factory=list)
    duplicates_by_class: dict[str, int] = field(default_factory=dict)
    confounds: list[dict] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors

    def to_dict(self) -> dict:
        return {
            "root": self.root,
            "layout": self.layout,
            "images": sum(self.classes.values()),
            "classes": self.classes,
            "sizes": self.sizes,
            "modes": self.modes,
            "formats": self.formats,
            "errors": self.errors,
            "duplicates": self.duplicates,
            "duplicates_by_class": self.duplicates_by_class,
            "near_duplicates": self.near_duplicates,
            "cross_class_duplicates": self.cross_class_duplicates,
            "confounds": self.confounds,
            "warnings": self.warnings,
        }

    def to_text(self) -> str:
        total = sum(self.classes.values())
        lines = [f"dataset {self.root}  (layout: {self.layout}, {total} image files)", "", "class            images   share"]
        for name, count in self.classes.items():
            lines.append(f"  {name:<15} {count:>6}   {count / max(total, 1):6.1%}")
        if self.classes:
            lo, hi = min(self.classes.values()), max(self.classes.values())
            lines.append(f"  imbalance (largest / smallest class): {hi / max(lo, 1):.2f}")
        lines.append("")
        lines.append("sizes: " + ", ".join(f"{k} x{v}" for k, v in list(self.sizes.items())[:6]))
        lines.append("modes: " + ", ".join(f"{k} x{v}" for k, v in self.modes.items()))
        lines.append("")
        lines.append(f"unreadable or non-image files: {len(self.errors)}")
        for err in self.errors[:20]:
            lines.append(f"  {err['path']}: {err['reason']}")
        if len(self.errors) > 20:
            lines.append(f"  ... and {len(self.errors) - 20} more (--json lists all)")
        lines.append(f"exact duplicate groups: {len(self.duplicates)}"
                     + (f"  (by class: {self.duplicates_by_class})" if self.duplicates else ""))
        for group in self.duplicates[:5]:
            lines.append("  " + " == ".join(group))
        if len(self.duplicates) > 5:
            lines.append(f"  ... and {len(self.duplicates) - 5} more")
        lines.append(f"near-duplicate groups: {len(self.near_duplicates)}")
        for group in self.near_duplicates[:5]:
            lines.append("  " + " ~ ".join(group))
        lines.append(f"duplicates across classes: {len(self.cross_class_duplicates)}")
        for group in self.cross_class_duplicates[:10]:
            lines.append("  " + " / ".join(group))
        lines.append(f"properties confounded with the class: {len(self.confounds)}")
        for conf in self.confounds[:10]:
            lines.append(f"  WARNING {conf['message']}")
        for warning in self.warnings:
            lines.append(f"WARNING {warning}")
        lines.append("")
        lines.append("OK" if self.ok else "PROBLEMS FOUND: fix or remove the files listed above")
        if self.confounds:
            lines.append("confounds are not errors, but split, audit and interpret with them in mind "
                         "(e.g. resize or re-encode every class alike, or hold one source out as test)")
        return "\n".join(lines)


def check_dataset(root: str | Path, layout: str = "auto", *, progress: bool = True) -> CheckReport:
    root = Path(root)
    layout, records = read_dataset(root, layout)
    facts = scan(root, records, progress=progress)
    classes = Counter(r.label for r in records)
    good = [f for f in facts if f.error is None]
    errors = [{"path": f.record.path, "reason": f.error} for f in facts if f.error]
    errors += _stray_files(root, records)
    exact, near = duplicate_groups(facts)
    paths = lambda group: [facts[i].record.path for i in group]  # noqa: E731
    cross = [paths(g) for g in exact + near if len({facts[i].record.label for i in g}) > 1]
    dup_by_class = Counter(facts[g[0]].record.label for g in exact if len({facts[i].record.label for i in g}) == 1)
    confounds = find_confounds(
        (f.record.label, image_properties(layout, f.record.label, f.record.path, f.width, f.height, f.mode, f.format))
        for f in good)
    return CheckReport(
        root=str(root),
        layout=layout,
        classes=dict(sorted(classes.items())),
        sizes=dict(Counter(f"{f.width}x{f.height}" for f in good).most_common()),
        modes=dict(Counter(f.mode for f in good).most_common()),
        formats=dict(Counter(f.format for f in good).most_common()),
        errors=sorted(errors, key=lambda e: e["path"]),
        duplicates=[paths(g) for g in exact],
        near_duplicates=[paths(g) for g in near],
        cross_class_duplicates=cross,
        duplicates_by_class=dict(sorted(dup_by_class.items())),
        confounds=confounds,
        warnings=looks_like_parent_of_datasets(root, layout, classes),
    )


def _stray_files(root: Path, records: list[Record]) -> list[dict]:
    """Files next to the images that are not images at all (e.g. notes.txt in a class folder)."""
    folders = {(root / r.path).parent for r in records}
    listed = {(root / r.path) for r in records}
    out = []
    for folder in folders:
        for p in folder.iterdir():
            if p.is_file() and p not in listed and not p.name.startswith(".") and p.suffix.lower() not in IMAGE_SUFFIXES:
                out.append({"path": p.relative_to(root).as_posix(), "reason": f"not an image file ({p.suffix or 'no extension'})"})
    return out
