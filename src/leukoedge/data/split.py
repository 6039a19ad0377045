"""Leakage-aware split manifests (``leukoedge data split``).

Kinds:

- ``group``: whole groups (patients) go to one split. Used when every record
  has a group (C-NMC). The honest choice whenever patient ids exist.
- ``block``: per class, files sorted in capture order; the first block is
  train, the next val, the last test. Used when there are no patient ids but
  file numbers follow capture order (Taleqani): neighbouring fields share a
  slide and a background, so a random split would put near-copies of test
  images in train.
- ``random``: per class shuffle. Exists for comparison only; the manifest is
  marked leaky and every report says so.

Whatever the kind, exact and near duplicates are clustered first and a
cluster always lands in one split (the earliest of its members' splits, so
test never keeps a copy of a training image). Unreadable images are left out
and listed in the manifest's ``params``.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from ..errors import DatasetError, UsageError
from .check import duplicate_groups, scan
from .hashing import group_pairs
from .readers import read_dataset
from .records import SPLITS, Manifest, ManifestEntry, Record, class_names

log = logging.getLogger(__name__)

SPLIT_CHOICES = ("auto", "group", "block", "random")


def _cut(n: int, val: float, test: float) -> tuple[int, int]:
    """(n_val, n_test) for n items, each at least 1 when n >= 3."""
    n_test = int(round(n * test))
    n_val = int(round(n * val))
    if n >= 3:
        n_test, n_val = max(1, n_test) if test > 0 else 0, max(1, n_val) if val > 0 else 0
    return n_val, n_test


def _by_blocks(records: list[Record], val: float, test: float) -> list[str]:
    splits = [""] * len(records)
    for label in class_names(records):
        idx = [i for i, r in enumerate(records) if r.label == label]
        idx.sort(key=lambda i: (records[i].order if records[i].order is not None else -1, records[i].path))
        n_val, n_test = _cut(len(idx), val, test)
        n_train = len(idx) - n_val - n_test
        for rank, i in enumerate(idx):
            splits[i] = "train" if rank < n_train else "val" if rank < n_train + n_val else "test"
    return splits


def _random(records: list[Record], val: float, test: float, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    splits = [""] * len(records)
    for label in class_names(records):
        idx = [i for i, r in enumerate(records) if r.label == label]
        idx = [idx[j] for j in rng.permutation(len(idx))]
        n_val, n_test = _cut(len(idx), val, test)
        for rank, i in enumerate(idx):
            splits[i] = "test" if rank < n_test else "val" if rank < n_test + n_val else "train"
    return splits


def _by_groups(records: list[Record], units: list[list[int]], val: float, test: float, seed: int) -> list[str]:
    """Assign whole units (groups merged with duplicate clusters) to splits.

    Units are shuffled with the seed and each goes to the split furthest
    below its target share of images, so split sizes track the fractions.
    """
    rng = np.random.default_rng(seed)
    target = {"train": 1.0 - val - test, "val": val, "test": test}
    filled = {s: 0 for s in SPLITS}
    splits = [""] * len(records)
    total = len(records)
    for u in rng.permutation(len(units)):
        unit = units[u]
        choice = max((s for s in SPLITS if target[s] > 0), key=lambda s: target[s] * total - filled[s])
        filled[choice] += len(unit)
        for i in unit:
            splits[i] = choice
    return splits


def _clusters(n: int, links: list[list[int]]) -> list[list[int]]:
    pairs = [(g[0], j) for g in links for j in g[1:]]
    return group_pairs(n, pairs)


def make_manifest(root: str | Path, *, layout: str = "auto", by: str = "auto", val: float = 0.15,
                  test: float = 0.15, seed: int = 0, progress: bool = True) -> Manifest:
    if by not in SPLIT_CHOICES:
        raise UsageError(f"--by must be one of {', '.join(SPLIT_CHOICES)}, got {by!r}")
    if not (0 <= val < 1 and 0 < test < 1 and val + test < 0.9):
        raise UsageError(f"--val {val} and --test {test} must be fractions with val + test < 0.9 and test > 0")
    root = Path(root).resolve()
    layout_name, all_records = read_dataset(root, layout)
    facts = scan(root, all_records, progress=progress)
    unreadable = [f.record.path for f in facts if f.error]
    keep = [i for i, f in enumerate(facts) if f.error is None]
    records = [all_records[i] for i in keep]
    facts = [facts[i] for i in keep]
    for label in class_names(records):
        if sum(r.label == label for r in records) < 3:
            raise DatasetError(f"class {label!r} has fewer than 3 readable images: cannot split it")
    exact, near = duplicate_groups(facts)
    dup_clusters = _clusters(len(records), exact + near)

    has_groups = all(r.group is not None for r in records)
    kind = by if by != "auto" else ("group" if has_groups else "block")
    if kind == "group" and not has_groups:
        raise UsageError("--by group needs a group (patient id) for every image; this layout has none",
                         hint="use --by block (capture order) or --by auto")
    if kind == "group":
        group_of = {}
        links = []
        for i, r in enumerate(records):
            if r.group in group_of:
                links.append([group_of[r.group], i])
            else:
                group_of[r.group] = i
        merged = _clusters(len(records), links + dup_clusters)
        in_unit = {i for unit in merged for i in unit}
        units = merged + [[i] for i in range(len(records)) if i not in in_unit]
        splits = _by_groups(records, units, val, test, seed)
    elif kind == "block":
        splits = _by_blocks(records, val, test)
    else:
        splits = _random(records, val, test, seed)

    moved = 0
    rank = {s: k for k, s in enumerate(SPLITS)}
    for cluster in dup_clusters:
        earliest = min((splits[i] for i in cluster), key=rank.__getitem__)
        for i in cluster:
            if splits[i] != earliest:
                splits[i] = earliest
                moved += 1
    order_known = all(r.order is not None for r in records)
    entries = tuple(ManifestEntry(r.path, r.label, r.group, r.order, split=s) for r, s in zip(records, splits))
    manifest = Manifest(
        root=str(root),
        layout=layout_name,
        classes=class_names(records),
        split_kind=kind,
        seed=seed,
        entries=entries,
        params={
            "requested": by,
            "val": val,
            "test": test,
            "order_source": "file number" if order_known else "file name",
            "duplicate_clusters": len(dup_clusters),
            "moved_to_keep_duplicates_together": moved,
            "unreadable_excluded": unreadable,
        },
    )
    manifest.validate()
    for split in SPLITS:
        if not manifest.subset(split) and (split != "val" or val > 0):
            raise DatasetError(f"the {split} split is empty; the dataset is too small for these fractions")
    if manifest.leaky:
        log.warning("random split: images from the same slide or capture session can land in train and test; "
                    "reports from this manifest are marked LEAKY")
    return manifest


def format_counts(manifest: Manifest) -> str:
    counts = manifest.counts()
    width = max(len(c) for c in manifest.classes) + 2
    lines = [f"{'class':<{width}}" + "".join(f"{s:>8}" for s in SPLITS)]
    for c in manifest.classes:
        lines.append(f"{c:<{width}}" + "".join(f"{counts[s][c]:>8}" for s in SPLITS))
    lines.append(f"{'total':<{width}}" + "".join(f"{sum(counts[s].values()):>8}" for s in SPLITS))
    leak = "  (LEAKY: image-level random split)" if manifest.leaky else ""
    lines.append(f"split kind: {manifest.split_kind}{leak}; duplicate clusters kept together: "
                 f"{manifest.params.get('duplicate_clusters', 0)}")
    return "\n".join(lines)
