"""Representative data for full-integer quantisation, from the TRAIN split only.

Activation ranges are measured on these images, so they must look like what
the device will see: they go through :func:`leukoedge.preprocess.load_image`
exactly as on the device, and they come from the training split (never test:
the parity gate would then grade the model on its own calibration data).
Stratified by class in the split's proportions, at least one per class, with
the run's seed, so a conversion is reproducible.

A lab's first dataset is small (a 260-image set has ~180 training images):
when the train split holds fewer images than asked for (default 300), all of
them are used and a warning says so; only fewer than ``MIN_CALIBRATION`` is an
error.

What can fail: :class:`ConversionError` when the split has too few images, or
an image is missing (with a hint about ``--data-root``).
"""
from __future__ import annotations

import logging

import numpy as np
from tqdm import tqdm

from ..data.records import Manifest, ManifestEntry, RootsOverride
from ..errors import ConversionError, InvalidImageError
from ..preprocess import PreprocessSpec, load_image
from .modes import MIN_CALIBRATION

log = logging.getLogger(__name__)


def select_calibration(manifest: Manifest, n: int, seed: int, *, purpose: str = "calibration",
                       minimum: int = MIN_CALIBRATION) -> list[ManifestEntry]:
    """``n`` train-split entries, stratified by class; all of them when the split has fewer (said in the log).

    Fewer than ``minimum`` training images is an error (int8 activation ranges
    measured on fewer are unreliable).
    """
    train = manifest.subset("train")
    if len(train) < minimum:
        raise ConversionError(
            f"{purpose} needs at least {minimum} images from the train split, which has only {len(train)}",
            hint="train on more images; int8 activation ranges measured on fewer are unreliable",
        )
    if len(train) < n:
        log.warning("%s: the train split has %d images, fewer than the %d asked for; using all %d",
                    purpose, len(train), n, len(train))
        n = len(train)
    by_class: dict[str, list[ManifestEntry]] = {}
    for entry in sorted(train, key=lambda e: e.path):
        by_class.setdefault(entry.label, []).append(entry)
    if len(by_class) < len(manifest.classes):
        missing = sorted(set(manifest.classes) - set(by_class))
        raise ConversionError(f"the train split has no images of class(es) {missing}; cannot calibrate on every class")
    quota = _allocate(n, {c: len(v) for c, v in by_class.items()})
    rng = np.random.default_rng(seed)
    chosen: list[ManifestEntry] = []
    for cls in sorted(by_class):
        pool = by_class[cls]
        idx = rng.choice(len(pool), size=quota[cls], replace=False)
        chosen.extend(pool[i] for i in sorted(idx))
    order = rng.permutation(len(chosen))
    return [chosen[i] for i in order]


def _allocate(n: int, sizes: dict[str, int]) -> dict[str, int]:
    """Split ``n`` over classes in proportion to ``sizes`` (largest remainder, >= 1 each)."""
    total = sum(sizes.values())
    exact = {c: n * s / total for c, s in sizes.items()}
    quota = {c: max(1, min(sizes[c], int(v))) for c, v in exact.items()}
    remainder = sorted(sizes, key=lambda c: (exact[c] - int(exact[c]), c), reverse=True)
    while sum(quota.values()) < n:
        progressed = False
        for c in remainder:
            if sum(quota.values()) >= n:
                break
            if quota[c] < sizes[c]:
                quota[c] += 1
                progressed = True
        if not progressed:
            break
    while sum(quota.values()) > n:
        c = max(quota, key=lambda k: (quota[k], k))
        quota[c] -= 1
    return quota


def load_images(
    manifest: Manifest, entries: list[ManifestEntry], spec: PreprocessSpec, root: RootsOverride, desc: str
) -> np.ndarray:
    """Decode entries to a (N, H, W, 3) uint8 array with a progress bar.

    ``root``: None, or where the run's root(s) are now (``Manifest.roots_for``).
    """
    out = np.empty((len(entries), spec.height, spec.width, 3), dtype=np.uint8)
    for i, entry in enumerate(tqdm(entries, desc=desc, unit="img", leave=False)):
        path = manifest.resolve(entry, root)
        try:
            out[i] = load_image(path, spec)
        except InvalidImageError as err:
            raise ConversionError(
                f"cannot read {desc} image: {err.message}",
                hint="if the dataset moved since training, pass --data-root NEW_ROOT (once per root of the "
                     "run's manifest, in its order)",
            ) from None
    return out


def representative_dataset(images: np.ndarray):
    """A TFLite ``representative_dataset`` callable over uint8 images (raw pixels, float32)."""

    def gen():
        for img in images:
            yield [img[None, ...].astype(np.float32)]

    return gen
