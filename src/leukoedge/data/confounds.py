"""Capture confounds a net will read: image properties that tell the class by themselves.

Why: in a public ALL-IDB field set all 33 images of size 1712x1368 belong to
one class (another camera): a CNN that sees the stretched aspect ratio or the
sensor's noise can score well without looking at a cell, and nothing in a
plain accuracy figure says so (issue 14). The same holds for image mode
(RGB vs grayscale scans), file format (JPEG artefacts vs TIFF) and the way
files are named (two sources, two naming schemes).

The rule, per property: a value shared by at least :data:`MIN_IMAGES` images
of which at least :data:`PURITY` belong to one class is a confound when that
is very unlikely by chance -- the binomial probability of so many of that
class among so many images, at the class's overall share, is below
:data:`ALPHA`. So a balanced 2-class set with 33 same-size images all in one
class is flagged (0.5^33), while a property that simply follows the class
proportions is not.

File-name patterns: digits become ``#`` and the class name itself is removed
(``blast_017.tif`` -> ``_#.tif``), so a naming scheme that only spells the
label is not reported; layouts whose public naming encodes the class
(Taleqani, ALL-IDB, C-NMC) are skipped for names.

Also: :func:`looks_like_parent_of_datasets` -- pointed at the folder above
several datasets, the class-folder reader would take the datasets' names for
classes; this says so instead of training on it.
"""
from __future__ import annotations

import re
from collections import Counter, defaultdict
from pathlib import Path, PurePosixPath
from typing import Iterable

from ..stats import binomial_tail

#: A value must be shared by at least this many images to be reported.
MIN_IMAGES = 5
#: ... of which at least this share belongs to one class ...
PURITY = 0.95
#: ... and chance must explain it with probability below this.
ALPHA = 1e-3
#: Layouts whose file names spell the class by design (not a confound).
NAMED_BY_CLASS = frozenset({"taleqani", "taleqani-segmented", "allidb", "cnmc"})
_DIGITS = re.compile(r"\d+")


def name_pattern(path: str, label: str) -> str:
    """``blast_017.TIF`` in class ``blast`` -> ``_#.tif``: the naming scheme without numbers or the label."""
    name = PurePosixPath(path).name
    stem, dot, suffix = name.rpartition(".")
    stem = stem if dot else name
    stem = re.sub(re.escape(label), "", stem, flags=re.IGNORECASE)
    return _DIGITS.sub("#", stem) + (f".{suffix.lower()}" if dot else "")


def find_confounds(items: Iterable[tuple[str, dict[str, str]]]) -> list[dict]:
    """Confounded (property, value) pairs.

    Args:
        items: ``(label, {property name: value})`` per readable image.

    Returns: one dict per confound, most improbable first: ``property``, ``value``,
    ``label``, ``n`` (images with the value), ``n_label`` (of them in ``label``),
    ``label_share_overall``, ``p_chance`` and a plain ``message``.
    """
    items = list(items)
    total = len(items)
    class_counts = Counter(label for label, _ in items)
    if total == 0 or len(class_counts) < 2:
        return []
    by_property: dict[str, dict[str, Counter]] = defaultdict(lambda: defaultdict(Counter))
    for label, props in items:
        for prop, value in props.items():
            by_property[prop][value][label] += 1
    found = []
    for prop, values in by_property.items():
        if len(values) < 2:
            continue  # every image alike: nothing to tell the classes apart by
        for value, counts in values.items():
            n = sum(counts.values())
            label, n_label = counts.most_common(1)[0]
            share = class_counts[label] / total
            if n < MIN_IMAGES or n_label / n < PURITY or share > 0.9:
                continue
            p = binomial_tail(n_label, n, share)  # exact: n is the number of images sharing one value
            if p >= ALPHA:
                continue
            found.append({
                "property": prop, "value": value, "label": label, "n": n, "n_label": n_label,
                "label_share_overall": share, "p_chance": p,
                "message": (f"{prop} {value}: {n_label} of its {n} images are {label!r} (overall {share:.0%} are); "
                            f"a model can learn the class from the {prop} instead of the cells"),
            })
    return sorted(found, key=lambda c: (c["p_chance"], c["property"], c["value"]))


def image_properties(layout: str, label: str, path: str, width: int, height: int, mode: str, fmt: str) -> dict:
    """The properties :func:`find_confounds` compares, for one image."""
    props = {"image size": f"{width}x{height}", "mode": str(mode), "format": str(fmt)}
    if layout not in NAMED_BY_CLASS:
        props["file-name pattern"] = name_pattern(path, label)
    return props


def looks_like_parent_of_datasets(root: Path, layout: str, classes: Iterable[str]) -> list[str]:
    """Warnings when ``root`` seems to hold several datasets rather than one dataset's classes.

    Signs: a "class" folder that is itself a dataset (it holds two or more folders
    of images, or a recognised layout's files), or class names that are known
    dataset names.
    """
    if layout != "class-folders":
        return []
    from .readers import detect_layout
    from ..errors import DatasetError

    warnings = []
    for name in classes:
        folder = Path(root) / name
        try:
            inner = detect_layout(folder)
        except (DatasetError, OSError):
            continue
        warnings.append(f"the class folder {name!r} is itself a dataset ({inner} layout): {root} looks like the "
                        f"parent of one or more datasets; point the command at one of them (e.g. {folder})")
    return warnings
