"""Images from a manifest into arrays and tf.data pipelines.

Decoding and resizing go ONLY through :func:`leukoedge.preprocess.load_image`
(the device's own path), once per image: :class:`ImageCache` keeps the
preprocessed uint8 arrays in memory for the whole process, so training,
validation and the final evaluation never decode an image twice and never
see pixels the device would not.

The training pipeline is a pure function of ``(seed, epoch)``: the order of
each epoch is a numpy permutation seeded by ``(seed, epoch)`` and each
image's augmentation seed is ``(seed, epoch * N + position)``. Resuming at
epoch ``e`` therefore replays exactly the batches an uninterrupted run would
have seen. A resumed run is still not bit-identical to an uninterrupted one
(random state such as dropout masks is not replayed), so its losses match
closely rather than exactly; an uninterrupted run with the same seed is.

What can fail: :class:`~leukoedge.errors.DatasetError` for an empty split or
an unreadable image (with the file named).
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..data.records import Manifest, ManifestEntry
from ..errors import DatasetError, InvalidImageError, UsageError
from ..preprocess import PreprocessSpec, load_image
from .augment import AugmentConfig, augment_image, cell_views
from .cells import white_cell_masks_of


class ImageCache:
    """Preprocessed uint8 images keyed by (absolute path, input size)."""

    def __init__(self) -> None:
        self._arrays: dict[tuple[str, int, int], np.ndarray] = {}

    def get(self, path: Path, spec: PreprocessSpec) -> np.ndarray:
        key = (str(path), spec.height, spec.width, spec.colour)
        arr = self._arrays.get(key)
        if arr is None:
            try:
                arr = load_image(path, spec)
            except InvalidImageError as err:
                raise DatasetError(f"cannot read a training image: {err.user_message()}") from None
            self._arrays[key] = arr
        return arr

    def __len__(self) -> int:
        return len(self._arrays)


def load_split(manifest: Manifest, split: str, spec: PreprocessSpec, cache: ImageCache,
               root: str | Path | None = None) -> tuple[np.ndarray, np.ndarray, list[ManifestEntry]]:
    """``(x uint8 [N,H,W,3], y int32 [N], entries)`` for one split of the manifest."""
    entries = manifest.subset(split)
    if not entries:
        raise DatasetError(f"the {split} split of the manifest is empty",
                           hint="make a manifest with train, val and test images (`leukoedge data split`)")
    x = np.empty((len(entries), spec.height, spec.width, 3), dtype=np.uint8)
    y = np.empty(len(entries), dtype=np.int32)
    for i, entry in enumerate(tqdm(entries, desc=f"load {split}", unit="img", leave=False, mininterval=1.0)):
        x[i] = cache.get(manifest.resolve(entry, root), spec)
        y[i] = manifest.label_index(entry.label)
    return x, y, entries


def white_cell_masks(manifest: Manifest, split: str, spec: PreprocessSpec, cache: ImageCache,
                     root: str | Path | None = None) -> np.ndarray:
    """uint8 ``[N, H, W]`` white-cell masks (0/1) of one split, for the ``cells`` augmentation.

    Computed on the as-captured images (the mask is a colour rule; a run with a
    grayscale colour step still finds its cells), at the run's input size, in
    manifest order (the order of :func:`load_split`).
    """
    x, _, _ = load_split(manifest, split, spec.geometry_only(), cache, root)
    return white_cell_masks_of(x, f"white-cell masks ({split})").astype(np.uint8)


def epoch_orders(n: int, seed: int, first_epoch: int, last_epoch: int) -> np.ndarray:
    """One permutation of ``range(n)`` per epoch in ``[first_epoch, last_epoch)``."""
    return np.stack([np.random.default_rng([seed, e]).permutation(n) for e in range(first_epoch, last_epoch)])


def train_dataset(x: np.ndarray, y: np.ndarray, *, batch_size: int, seed: int, first_epoch: int,
                  last_epoch: int, augment: AugmentConfig, paired: bool = False, drop_remainder: bool = False,
                  masks: np.ndarray | None = None, targets: np.ndarray | None = None,
                  sample_weights: np.ndarray | None = None, mixer=None):
    """Batches for epochs ``first_epoch..last_epoch-1``, shuffled and augmented per (seed, epoch).

    ``masks`` (uint8 ``[N, H, W]``, from :func:`white_cell_masks`) are required by
    recipes with background swap or cell crops; the background is borrowed
    from another training image drawn per (seed, epoch, position).

    ``paired``: each image appears twice, as adjacent elements ``[a, b]`` that
    share the geometric transform and differ in colour (view ``a`` is exactly
    the unpaired augmentation, view ``b`` uses
    :data:`~leukoedge.train.consistency.PAIR_VIEW`); batches then hold
    ``2 * batch_size`` images, for :class:`~leukoedge.train.consistency.PairedConsistencyLoss`.

    ``targets`` (float32 ``[N, T]``, e.g. :func:`~leukoedge.train.distill.target_rows`) replace the
    labels as each image's ``y``, and ``sample_weights`` (float32 ``[N]``) are yielded as its weight:
    ``(image, target, weight)`` per element (distillation; not with ``paired``).

    ``mixer`` (a :class:`~leukoedge.train.mixing.Mixer`, not with ``paired`` or
    ``targets``) blends each augmented batch with itself: batches become
    ``(images, target rows [B, 1 + C], weights [B])``, the weights carrying the
    class weights, keyed by (seed, epoch, batch).
    """
    import tensorflow as tf

    from .consistency import PAIR_VIEW, colour_only, geometry_only

    n = len(y)
    if augment.needs_cells and (masks is None or masks.shape != x.shape[:3]):
        raise UsageError("this augmentation recipe swaps backgrounds / crops around cells and needs one white-cell "
                         f"mask per training image (got {None if masks is None else masks.shape} for {x.shape[:3]})")
    cell_masks = tf.constant(masks) if augment.needs_cells else None
    orders = epoch_orders(n, seed, first_epoch, last_epoch)
    epochs = np.arange(first_epoch, last_epoch, dtype=np.int64)
    images = tf.constant(x)
    labels = tf.constant(y)
    if targets is not None:
        if paired or sample_weights is None or len(targets) != n or len(sample_weights) != n:
            raise UsageError("per-image targets need one weight per image and no paired views")
        rows, row_weights = tf.constant(targets, tf.float32), tf.constant(sample_weights, tf.float32)
    if mixer is not None and (paired or targets is not None):
        raise UsageError("mixing blends plain labels: not with paired views or per-image targets")

    def one_epoch(order, epoch):
        positions = tf.range(n, dtype=tf.int64)
        ds = tf.data.Dataset.from_tensor_slices((order, positions))

        def load(index, position):
            image = tf.cast(tf.gather(images, index), tf.float32)
            key = tf.stack([tf.constant(seed, tf.int64), epoch * n + position])
            if augment.needs_cells:
                cell_key = key + tf.constant([2_000_003, 0], tf.int64)
                other = tf.random.stateless_uniform([], cell_key, 0, n, dtype=tf.int64)
                image = cell_views(image, tf.gather(cell_masks, index), tf.cast(tf.gather(images, other), tf.float32),
                                   tf.gather(cell_masks, other), cell_key, augment)
            if not paired:
                if augment.enabled:
                    image = augment_image(image, key, augment)
                if targets is not None:
                    return image, tf.gather(rows, index), tf.gather(row_weights, index)
                return image, tf.gather(labels, index)
            shared = augment_image(image, key, geometry_only(augment))
            view_a = augment_image(shared, key, colour_only(augment))
            view_b = augment_image(shared, key + tf.constant([1_000_003, 0], tf.int64), PAIR_VIEW)
            label = tf.gather(labels, index)
            return tf.stack([view_a, view_b]), tf.stack([label, label])

        batches = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE).batch(batch_size, drop_remainder=drop_remainder)
        if mixer is not None:
            return batches.enumerate().map(lambda i, batch: mixer(
                *batch, tf.stack([tf.constant(seed, tf.int64) + 3_000_017, epoch * n + i])))
        return batches.map(_flatten_pairs) if paired else batches

    ds = tf.data.Dataset.from_tensor_slices((orders, epochs)).flat_map(one_epoch)
    return ds.prefetch(2)


def eval_dataset(x: np.ndarray, y: np.ndarray | None = None, *, batch_size: int = 64, paired: bool = False):
    """Un-augmented batches in manifest order (float32 0..255).

    ``paired`` (needs ``y``): every image twice in a row (two identical
    "views"), so a model compiled with the paired consistency loss reports
    plain cross-entropy as its validation loss (the divergence of identical
    views is 0).
    """
    import tensorflow as tf

    images = tf.data.Dataset.from_tensor_slices(x).map(lambda im: tf.cast(im, tf.float32))
    ds = images if y is None else tf.data.Dataset.zip((images, tf.data.Dataset.from_tensor_slices(y)))
    if not paired:
        return ds.batch(batch_size).prefetch(2)
    twice = ds.map(lambda im, lab: (tf.stack([im, im]), tf.stack([lab, lab])))
    return twice.batch(batch_size).map(_flatten_pairs).prefetch(2)


def _flatten_pairs(images, labels):
    """``[B, 2, H, W, 3]`` / ``[B, 2]`` pair batches -> ``[2B, H, W, 3]`` / ``[2B]``, pairs adjacent."""
    import tensorflow as tf

    return tf.reshape(images, tf.concat([[-1], tf.shape(images)[2:]], 0)), tf.reshape(labels, [-1])


def steps_per_epoch(n: int, batch_size: int) -> int:
    return math.ceil(n / batch_size)


def class_weights(y: np.ndarray, num_classes: int) -> dict[int, float]:
    """Inverse-frequency weights ``N / (K * n_c)`` (1.0 for the mean class).

    A class absent from training gets weight 0 (and the run is refused
    earlier by the trainer, since it could never be predicted).
    """
    counts = np.bincount(y, minlength=num_classes).astype(np.float64)
    total = counts.sum()
    return {c: (float(total / (num_classes * counts[c])) if counts[c] else 0.0) for c in range(num_classes)}
