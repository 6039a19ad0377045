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

K folds (``leukoedge data split --folds K --out DIR``, :func:`make_folds`)
rotate the test set over the same kinds, so every image is tested exactly
once: on a few hundred images one held-out block is a noisy estimate, and a
block split's ``--seed`` cannot move it. ``DIR/fold-k.json`` are ordinary
manifests; ``DIR/folds.json`` indexes them.

Several roots (``data split ORIG REVIEWED``, ``train --data ORIG --data
REVIEWED``; issue 16) make ONE manifest (:mod:`.records`). The first root
defines the classes: every other root's class names must match one of them up
to case and whitespace (and take its spelling), otherwise the split is refused
naming both roots. Each root is split by its own kind, so ``auto`` picks
``group`` for a root whose every image has a group (a reviewed export: groups
= samples, one slide never straddles splits) and ``block`` for a root without
(capture order, as on its own). The grouped roots are split together (a group
in two of them stays whole); each block root is cut on its own, because two
datasets' capture orders say nothing about each other. Why not make every
ungrouped image its own group instead: that is an image-level random split of
the original data, which is leaky exactly where the block split is not, and it
would move the original data's test set whenever reviewed data is added; per
root, the original data keeps the split it has alone, so test figures stay
comparable from one retraining to the next. A manifest whose roots differ in
kind has ``split_kind = "mixed"`` and lists each root's kind in
``params["per_root"]``; no group straddles splits in it, whatever root holds it.

Whatever the kind, exact and near duplicates are clustered first and a
cluster always lands in one split (the earliest of its members' splits, so
test never keeps a copy of a training image). Unreadable images are left out
and listed in the manifest's ``params``.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence, Union

import numpy as np

from ..errors import DatasetError, ManifestError, UsageError
from ..files import write_json
from .check import duplicate_groups, scan
from .hashing import group_pairs
from .readers import read_dataset
from .records import SPLITS, Manifest, ManifestEntry, Record, class_names

log = logging.getLogger(__name__)

SPLIT_CHOICES = ("auto", "group", "block", "random")
#: One dataset root, or several (the first defines the classes).
Roots = Union[str, Path, Sequence[Union[str, Path]]]


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
    """Assign whole units (groups merged with duplicate clusters) to train / val / test."""
    return _assign_units(len(records), units, {"train": 1.0 - val - test, "val": val, "test": test}, seed)


def _assign_units(n: int, units: list[list[int]], target: dict[str, float], seed: int) -> list[str]:
    """Assign whole units to the bins of ``target`` (name -> share of the units' images).

    Units are shuffled with the seed and each goes to the bin furthest below
    its target share of images, so bin sizes track the shares. Records in no
    unit get ``""``. Shared by the train/val/test split and the K-fold split.
    """
    rng = np.random.default_rng(seed)
    filled = {s: 0 for s in target}
    splits = [""] * n
    total = sum(len(u) for u in units)
    for u in rng.permutation(len(units)):
        unit = units[u]
        choice = max((s for s in target if target[s] > 0), key=lambda s: target[s] * total - filled[s])
        filled[choice] += len(unit)
        for i in unit:
            splits[i] = choice
    return splits


def _clusters(n: int, links: list[list[int]]) -> list[list[int]]:
    pairs = [(g[0], j) for g in links for j in g[1:]]
    return group_pairs(n, pairs)


@dataclass(frozen=True)
class _Prepared:
    """The readable records of one or more roots with what every split kind needs (see :func:`_prepare`).

    ``parts`` are ``(kind, record indices)``: the grouped roots together as one
    ``group`` part, every other root its own part; a one-root dataset is one part.
    """

    roots: list[Path]
    layouts: list[str]
    records: list[Record]
    kind: str
    root_kinds: list[str]
    parts: list[tuple[str, list[int]]]
    dup_clusters: list[list[int]]
    unreadable: list[str]

    @property
    def root(self) -> Path:
        return self.roots[0]

    @property
    def layout(self) -> str:
        return self.layouts[0]

    @property
    def order_source(self) -> str:
        return "file number" if all(r.order is not None for r in self.records) else "file name"

    @property
    def keep_clusters(self) -> list[list[int]]:
        """Clusters that must share a split: duplicates, and in a mixed split also groups.

        A one-kind split keeps its own rules (a group split's units hold the
        groups already; a block split of a partly grouped root ignores groups,
        as it always has). In a mixed split a group could be in a grouped and an
        ungrouped root, so groups are kept together explicitly.
        """
        if self.kind != "mixed":
            return self.dup_clusters
        return _clusters(len(self.records), self.dup_clusters + _group_links(self.records))

    def params(self) -> dict:
        """What a manifest records about the roots (only for several: one-root manifests are as before)."""
        if len(self.roots) == 1:
            return {}
        counts = [sum(r.root == k for r in self.records) for k in range(len(self.roots))]
        return {"per_root": [{"root": str(root), "layout": layout, "kind": kind, "images": n}
                             for root, layout, kind, n in zip(self.roots, self.layouts, self.root_kinds, counts)]}


def _as_roots(roots: Roots) -> list[Path]:
    """Absolute roots, in order; the same folder twice is refused (every image would be listed twice)."""
    items = [roots] if isinstance(roots, (str, Path)) else list(roots)
    if not items:
        raise UsageError("no dataset root given", hint="pass a dataset folder (--data DIR)")
    out = [Path(r).resolve() for r in items]
    for k, root in enumerate(out):
        if root in out[:k]:
            raise UsageError(f"dataset root {root} is given twice", hint="give each --data root once")
    return out


def _class_key(label: str) -> str:
    """How class names are compared across roots: case and runs of whitespace do not count."""
    return " ".join(label.split()).casefold()


def _match_classes(roots: list[Path], records: list[Record]) -> list[Record]:
    """Records of roots 2.. relabelled with the first root's spelling of their class, or DatasetError.

    The first root (the original training data) defines the classes: a reviewed
    export names its folders after the bundle's labels, which come from that data.
    """
    primary = class_names(r for r in records if r.root == 0)
    by_key: dict[str, str] = {}
    for name in primary:
        if by_key.setdefault(_class_key(name), name) != name:
            raise DatasetError(f"{roots[0]}: classes {by_key[_class_key(name)]!r} and {name!r} differ only in case "
                               "or spacing, so the other roots' classes cannot be matched to them",
                               hint="merge or rename one of the two class folders")
    out = []
    for k in range(1, len(roots)):
        own = class_names(r for r in records if r.root == k)
        foreign = [c for c in own if _class_key(c) not in by_key]
        if foreign:
            raise DatasetError(f"{roots[k]} has class(es) {', '.join(map(repr, foreign))} that the first root "
                               f"{roots[0]} lacks (its classes: {', '.join(map(repr, primary))})",
                               hint="the first --data root defines the classes: rename those folders to one of "
                                    "its classes, leave them out, or put the dataset that has them first")
    for r in records:
        out.append(r if r.root == 0 else replace(r, label=by_key[_class_key(r.label)]))
    return out


def _root_kind(root: Path, records: list[Record], by: str) -> str:
    """The split kind of one root: ``by``, or for ``auto`` group when every image has a group, else block."""
    has_groups = all(r.group is not None for r in records)
    if by == "auto":
        return "group" if has_groups else "block"
    if by == "group" and not has_groups:
        raise UsageError(f"--by group needs a group (patient id) for every image; {root} ({len(records)} images) "
                         "has images without one",
                         hint="use --by block (capture order) or --by auto (group where groups exist, else block)")
    return by


def _prepare(roots: Roots, layout: str, by: str, progress: bool) -> _Prepared:
    """Read, scan (unreadable files out), cluster duplicates and resolve the split kind of each root.

    Shared by :func:`make_manifest` and :func:`make_folds`, so a K-fold split
    sees exactly the records, duplicate clusters and kinds a single split would.
    ``layout`` applies to every root (``auto``: each root's own is detected).
    """
    if by not in SPLIT_CHOICES:
        raise UsageError(f"--by must be one of {', '.join(SPLIT_CHOICES)}, got {by!r}")
    roots = _as_roots(roots)
    layouts, all_records = [], []
    for k, root in enumerate(roots):
        layout_name, records = read_dataset(root, layout)
        layouts.append(layout_name)
        all_records += [replace(r, root=k) for r in records]
    if len(roots) > 1:
        all_records = _match_classes(roots, all_records)
    facts = scan(roots, all_records, progress=progress)
    unreadable = [_shown(roots, f.record) for f in facts if f.error]
    keep = [i for i, f in enumerate(facts) if f.error is None]
    records = [all_records[i] for i in keep]
    facts = [facts[i] for i in keep]
    for label in class_names(records):
        if sum(r.label == label for r in records) < 3:
            raise DatasetError(f"class {label!r} has fewer than 3 readable images: cannot split it")
    exact, near = duplicate_groups(facts)
    dup_clusters = _clusters(len(records), exact + near)
    root_kinds = [_root_kind(root, [r for r in records if r.root == k], by) for k, root in enumerate(roots)]
    kind = root_kinds[0] if len(set(root_kinds)) == 1 else "mixed"
    grouped = [i for i, r in enumerate(records) if root_kinds[r.root] == "group"]
    parts = [("group", grouped)] if grouped else []
    parts += [(root_kinds[k], [i for i, r in enumerate(records) if r.root == k])
              for k in range(len(roots)) if root_kinds[k] != "group"]
    return _Prepared(roots, layouts, records, kind, root_kinds, parts, dup_clusters, unreadable)


def _shown(roots: list[Path], record: Record) -> str:
    """A record's path as reports show it: relative, prefixed by its root when there are several."""
    return record.path if len(roots) == 1 else f"{roots[record.root]}/{record.path}"


def _group_links(records: list[Record]) -> list[list[int]]:
    """Index lists of the records that share a group (groups of one image left out)."""
    members: dict[str, list[int]] = {}
    for i, r in enumerate(records):
        if r.group is not None:
            members.setdefault(r.group, []).append(i)
    return [m for m in members.values() if len(m) > 1]


def _local(clusters: list[list[int]], idx: list[int]) -> list[list[int]]:
    """``clusters`` restricted to the records ``idx`` (of a part), in the part's own indices."""
    pos = {g: j for j, g in enumerate(idx)}
    out = [[pos[i] for i in c if i in pos] for c in clusters]
    return [c for c in out if len(c) > 1]


def _units(records: list[Record], dup_clusters: list[list[int]]) -> list[list[int]]:
    """Groups (patients) merged with duplicate clusters: the units a group split never cuts."""
    group_of = {}
    links = []
    for i, r in enumerate(records):
        if r.group in group_of:
            links.append([group_of[r.group], i])
        else:
            group_of[r.group] = i
    merged = _clusters(len(records), links + dup_clusters)
    in_unit = {i for unit in merged for i in unit}
    return merged + [[i] for i in range(len(records)) if i not in in_unit]


def _keep_together(splits: list[str], dup_clusters: list[list[int]], order: tuple[str, ...]) -> int:
    """Move every duplicate cluster into its members' earliest bin (in ``order``); returns images moved.

    With ``order`` = train, val, test, test never keeps a copy of a training image.
    """
    moved = 0
    rank = {s: k for k, s in enumerate(order)}
    for cluster in dup_clusters:
        earliest = min((splits[i] for i in cluster), key=rank.__getitem__)
        for i in cluster:
            if splits[i] != earliest:
                splits[i] = earliest
                moved += 1
    return moved


def make_manifest(root: Roots, *, layout: str = "auto", by: str = "auto", val: float = 0.15,
                  test: float = 0.15, seed: int = 0, progress: bool = True) -> Manifest:
    if by not in SPLIT_CHOICES:
        raise UsageError(f"--by must be one of {', '.join(SPLIT_CHOICES)}, got {by!r}")
    if not (0 <= val < 1 and 0 < test < 1 and val + test < 0.9):
        raise UsageError(f"--val {val} and --test {test} must be fractions with val + test < 0.9 and test > 0")
    prep = _prepare(root, layout, by, progress)
    records = prep.records
    splits = [""] * len(records)
    for kind, idx in prep.parts:
        sub = [records[i] for i in idx]
        if kind == "group":
            got = _by_groups(sub, _units(sub, _local(prep.dup_clusters, idx)), val, test, seed)
        elif kind == "block":
            got = _by_blocks(sub, val, test)
        else:
            got = _random(sub, val, test, seed)
        for i, s in zip(idx, got):
            splits[i] = s

    moved = _keep_together(splits, prep.keep_clusters, SPLITS)
    entries = tuple(ManifestEntry(r.path, r.label, r.group, r.order, r.root, split=s) for r, s in zip(records, splits))
    manifest = Manifest(
        root=str(prep.root),
        layout=prep.layout,
        classes=class_names(records),
        split_kind=prep.kind,
        seed=seed,
        entries=entries,
        params={
            "requested": by,
            "val": val,
            "test": test,
            "order_source": prep.order_source,
            "duplicate_clusters": len(prep.dup_clusters),
            "moved_to_keep_duplicates_together": moved,
            "unreadable_excluded": prep.unreadable,
            **prep.params(),
        },
        roots=tuple(str(r) for r in prep.roots),
    )
    manifest.validate()
    for split in SPLITS:
        if not manifest.subset(split) and (split != "val" or val > 0):
            raise DatasetError(f"the {split} split is empty; the dataset is too small for these fractions")
    if manifest.leaky:
        log.warning("random split: images from the same slide or capture session can land in train and test; "
                    "reports from this manifest are marked LEAKY")
    return manifest


# --- K folds ------------------------------------------------------------------

#: The index that ``data split --folds K`` writes next to ``fold-1.json`` ... ``fold-K.json``.
FOLDS_INDEX = "folds.json"
FOLDS_VERSION = 1
MAX_FOLDS = 20


def fold_file(k: int) -> str:
    """File name of fold ``k`` (1-based, as printed and as the run's ``fold-k/``)."""
    return f"fold-{k}.json"


def check_folds(k: int) -> int:
    """``k`` as a fold count, or :class:`UsageError` (1 means no cross-validation)."""
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_FOLDS:
        raise UsageError(f"--folds must be 1 (one split) or a whole number of folds up to {MAX_FOLDS}, got {k!r}",
                         hint="5 folds suit a few hundred images")
    return k


def make_folds(root: Roots, *, folds: int, layout: str = "auto", by: str = "auto", val: float = 0.15,
               seed: int = 0, progress: bool = True) -> list[Manifest]:
    """K manifests whose test sets partition the dataset (each image is in exactly one).

    Why: on a few hundred images one held-out block is one draw of a very noisy
    estimate (a 260-image set scored 64-98 % over five blocks), and ``--seed``
    cannot move a block split's test block. Here fold ``k`` tests on:

    - ``block``: block ``k`` of each class's capture-order sequence cut into K
      contiguous blocks; val is the ``val`` share of the class's images just
      before that block in capture order (wrapping round for the first fold),
      so it also buffers train from test;
    - ``group``: the groups (patients, merged with duplicate clusters, as in a
      single split) assigned to fold ``k``: per majority class, so every fold
      gets its share of each class; val is a group-level slice of the rest;
    - ``random``: a per-class random K-th (leaky, for comparison only).

    Duplicate clusters land in one test fold (the earliest of their members')
    and, within a fold, in one of train/val. Val never overlaps test. With
    several roots, each root is cut by its own kind as in a single split (the
    grouped roots together, every other root alone; module docstring).
    """
    check_folds(folds)
    if folds < 2:
        raise UsageError("make_folds needs --folds >= 2; use make_manifest for one split")
    if not (0 < val < 1 and val + 1.0 / folds < 0.9):
        raise UsageError(f"--val {val} with --folds {folds} (test share 1/{folds}) must leave at least 10 % to "
                         "train, and val must be > 0 (each fold picks its checkpoint on val)",
                         hint="lower --val or use more folds")
    prep = _prepare(root, layout, by, progress)
    records, kind, dup_clusters = prep.records, prep.kind, prep.dup_clusters
    n = len(records)
    labels = class_names(records)
    for label in labels:
        count = sum(r.label == label for r in records)
        if count < 2 * folds:
            raise DatasetError(f"class {label!r} has {count} readable images: too few for {folds} folds "
                               "(each fold needs some in test and in train)", hint="use fewer --folds")
    names = tuple(str(j) for j in range(folds))
    keep = prep.keep_clusters
    fold_of = [""] * n
    for part_kind, idx in prep.parts:
        sub = [records[i] for i in idx]
        for i, f in zip(idx, _fold_of(sub, part_kind, _local(dup_clusters, idx), names, seed)):
            fold_of[i] = f
    moved_test = _keep_together(fold_of, keep, names)

    manifests = []
    for j in range(folds):
        splits = ["test" if fold_of[i] == names[j] else "" for i in range(n)]
        val_from = []
        for part_kind, idx in prep.parts:
            sub = [records[i] for i in idx]
            got, how = _fold_train_val(sub, part_kind, _local(dup_clusters, idx), [splits[i] for i in idx],
                                       folds, j, val, seed)
            val_from.append(how)
            for i, s in zip(idx, got):
                splits[i] = s
        moved = _keep_together(splits, keep, SPLITS)
        entries = tuple(ManifestEntry(r.path, r.label, r.group, r.order, r.root, split=s)
                        for r, s in zip(records, splits))
        manifest = Manifest(
            root=str(prep.root), layout=prep.layout, classes=labels, split_kind=kind, seed=seed, entries=entries,
            params={
                "requested": by,
                "folds": folds,
                "fold": j + 1,
                "val": val,
                "test": f"fold {j + 1} of {folds}",
                "val_from": "; ".join(dict.fromkeys(val_from)),
                "order_source": prep.order_source,
                "duplicate_clusters": len(dup_clusters),
                "moved_to_keep_duplicates_together": moved_test + moved,
                "unreadable_excluded": prep.unreadable,
                **prep.params(),
            },
            roots=tuple(str(r) for r in prep.roots),
        )
        manifest.validate()
        _check_fold(manifest, j + 1, folds)
        manifests.append(manifest)
    if kind == "random":
        log.warning("random folds: images from the same slide or capture session can land in train and test; "
                    "reports from these manifests are marked LEAKY")
    return manifests


def _fold_of(records: list[Record], kind: str, dup_clusters: list[list[int]], names: tuple[str, ...],
             seed: int) -> list[str]:
    """The test fold (one of ``names``) of every record of one part (see :func:`make_folds`)."""
    n, folds = len(records), len(names)
    fold_of = [""] * n
    if kind == "group":
        for label_units in _by_majority_label(records, _units(records, dup_clusters)).values():
            assigned = _assign_units(n, label_units, {f: 1.0 / folds for f in names}, seed)
            for unit in label_units:
                for i in unit:
                    fold_of[i] = assigned[i]
        return fold_of
    rng = np.random.default_rng(seed)
    for label in class_names(records):
        idx = _class_sequence(records, label)
        if kind == "random":
            idx = [idx[j] for j in rng.permutation(len(idx))]
        for j, block in enumerate(np.array_split(np.asarray(idx), folds)):
            for i in block:
                fold_of[int(i)] = names[j]
    return fold_of


def _fold_train_val(records: list[Record], kind: str, dup_clusters: list[list[int]], splits: list[str],
                    folds: int, j: int, val: float, seed: int) -> tuple[list[str], str]:
    """(splits, how val was chosen) of one part in fold ``j`` (0-based): train or val for all but test."""
    splits = list(splits)
    n = len(records)
    if kind == "group":
        rest = [u for u in _units(records, dup_clusters) if splits[u[0]] != "test"]
        share = val / (1.0 - 1.0 / folds)
        for label_units in _by_majority_label(records, rest).values():
            assigned = _assign_units(n, label_units, {"train": 1.0 - share, "val": share}, seed + 1 + j)
            for unit in label_units:
                for i in unit:
                    splits[i] = assigned[i]
        return splits, "a group-level slice of the non-test groups (per majority class)"
    rng = np.random.default_rng([seed, j])
    for label in class_names(records):
        seq = _class_sequence(records, label)
        n_val = max(1, int(round(val * len(seq))))
        if kind == "block":
            # cyclic order starting just after this fold's test block: the tail is just before it
            after = max((p for p, i in enumerate(seq) if splits[i] == "test"), default=-1) + 1
            seq = seq[after:] + seq[:after]
            rest = [i for i in seq if splits[i] != "test"]
            picked = set(rest[-n_val:])
        else:
            rest = [i for i in seq if splits[i] != "test"]
            picked = {rest[p] for p in rng.permutation(len(rest))[:n_val]}
        for i in rest:
            splits[i] = "val" if i in picked else "train"
    return splits, ("the images of each class just before its test block in capture order "
                    "(wrapping round for the first fold)") if kind == "block" else "a random share per class"


def _class_sequence(records: list[Record], label: str) -> list[int]:
    """Indices of one class in capture order (the order a block split uses)."""
    idx = [i for i, r in enumerate(records) if r.label == label]
    idx.sort(key=lambda i: (records[i].order if records[i].order is not None else -1, records[i].path))
    return idx


def _by_majority_label(records: list[Record], units: list[list[int]]) -> dict[str, list[list[int]]]:
    """Units keyed by their most frequent label (ties: the first in class order), so folds are stratified."""
    out: dict[str, list[list[int]]] = {}
    for unit in units:
        labels = sorted(records[i].label for i in unit)
        top = max(sorted(set(labels)), key=labels.count)
        out.setdefault(top, []).append(unit)
    return dict(sorted(out.items()))


def _check_fold(manifest: Manifest, k: int, folds: int) -> None:
    counts = manifest.counts()
    for split in SPLITS:
        if not sum(counts[split].values()):
            raise DatasetError(f"fold {k} of {folds} has an empty {split} split; the dataset is too small "
                               "(or has too few groups) for this many folds", hint="use fewer --folds")
    lacking = [c for c in manifest.classes if counts["train"][c] == 0]
    if lacking:
        raise DatasetError(f"fold {k} of {folds} has no training images of {', '.join(lacking)}",
                           hint="use fewer --folds (a class needs groups in more than one fold)")
    missing = [c for c in manifest.classes if counts["test"][c] == 0]
    if missing:
        log.warning("fold %d of %d has no test images of %s (too few groups of that class)", k, folds,
                    ", ".join(missing))


def save_folds(manifests: list[Manifest], out_dir: str | Path) -> Path:
    """Write ``fold-1.json`` ... ``fold-K.json`` and the index ``folds.json`` in ``out_dir``; returns the index.

    The index is written last (atomically, as every manifest), so a folder with
    an index always holds all of its folds.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"{out_dir} is a file; --folds writes a folder of manifests",
                         hint="pass --out DIR (a folder)")
    out_dir.mkdir(parents=True, exist_ok=True)
    files = []
    for k, manifest in enumerate(manifests, 1):
        manifest.save(out_dir / fold_file(k))
        files.append(fold_file(k))
    first = manifests[0]
    index = {
        "version": FOLDS_VERSION,
        "folds": len(manifests),
        "root": first.root,
        **({"roots": list(first.roots)} if len(first.roots) > 1 else {}),
        "layout": first.layout,
        "classes": list(first.classes),
        "split_kind": first.split_kind,
        "leaky": first.leaky,
        "seed": first.seed,
        "val": first.params.get("val"),
        "manifests": files,
        "test_counts": [sum(m.counts()["test"].values()) for m in manifests],
    }
    return write_json(out_dir / FOLDS_INDEX, index)


def is_folds_index(path: str | Path) -> bool:
    """True for a folds index (or a folder holding ``folds.json``), which ``train --manifest`` also accepts."""
    path = Path(path)
    if path.is_dir():
        return (path / FOLDS_INDEX).is_file()
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(data, dict) and "manifests" in data and "entries" not in data


def load_folds(path: str | Path) -> list[Manifest]:
    """The fold manifests of an index (or of the folder holding it), checked to partition one dataset."""
    path = Path(path)
    if path.is_dir():
        path = path / FOLDS_INDEX
    try:
        index = json.loads(path.read_text())
        if index.get("version") != FOLDS_VERSION:
            raise ManifestError(f"{path}: folds index version {index.get('version')!r} is not {FOLDS_VERSION}")
        files = list(index["manifests"])
    except FileNotFoundError:
        raise ManifestError(f"{path}: no such folds index",
                            hint="make one with `leukoedge data split PATH --folds K --out DIR`") from None
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ManifestError(f"{path}: malformed folds index ({err})") from None
    manifests = [Manifest.load(path.parent / name) for name in files]
    check_partition(manifests, str(path))
    return manifests


def check_partition(manifests: list[Manifest], where: str = "folds") -> None:
    """Refuse folds that do not cover one dataset with each image in exactly one test set."""
    if len(manifests) < 2:
        raise ManifestError(f"{where}: {len(manifests)} fold(s); cross-validation needs at least 2")
    first = manifests[0]
    paths = {first.key(e) for e in first.entries}
    tested: dict[tuple[int, str], int] = {}
    for k, m in enumerate(manifests, 1):
        if {m.key(e) for e in m.entries} != paths or m.classes != first.classes or len(m.roots) != len(first.roots):
            raise ManifestError(f"{where}: fold {k} lists other images, classes or roots than fold 1")
        for e in m.subset("test"):
            if m.key(e) in tested:
                raise ManifestError(f"{where}: {e.path} is in the test sets of folds {tested[m.key(e)]} and {k}")
            tested[m.key(e)] = k
    untested = sorted(paths - set(tested))
    if untested:
        raise ManifestError(f"{where}: {len(untested)} image(s) are in no fold's test set, e.g. {untested[0][1]}")


def format_folds(manifests: list[Manifest]) -> str:
    """Per fold: train / val / test counts, and the test images per class."""
    classes = manifests[0].classes
    lines = ["fold" + "".join(f"{s:>8}" for s in SPLITS) + "   test per class (" + ", ".join(classes) + ")"]
    for k, m in enumerate(manifests, 1):
        counts = m.counts()
        lines.append(f"{k:<4}" + "".join(f"{sum(counts[s].values()):>8}" for s in SPLITS) + "   "
                     + " / ".join(str(counts["test"][c]) for c in classes))
    first = manifests[0]
    leak = "  (LEAKY: image-level random folds)" if first.leaky else ""
    lines.append(f"split kind: {first.split_kind}{leak}; {len(manifests)} folds, each image in exactly one test set; "
                 f"duplicate clusters kept together: {first.params.get('duplicate_clusters', 0)}")
    return "\n".join(lines)


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
    return "\n".join(lines + _root_lines(manifest))


def _root_lines(manifest: Manifest) -> list[str]:
    """Per root of a manifest of several: layout, kind and train / val / test images."""
    if len(manifest.roots) == 1:
        return []
    info = manifest.params.get("per_root") or [{} for _ in manifest.roots]
    lines = []
    for k, (root, about) in enumerate(zip(manifest.roots, info)):
        n = {s: sum(e.root == k and e.split == s for e in manifest.entries) for s in SPLITS}
        lines.append(f"root {k + 1}: {root} ({about.get('layout', '?')}, split by {about.get('kind', '?')}): "
                     + " / ".join(f"{n[s]} {s}" for s in SPLITS))
    return lines
