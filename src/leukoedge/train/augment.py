"""Training-time augmentation, in tf.data only (models have no Random* layers).

Why in tf.data: a model with ``RandomFlip``/``RandomRotation`` layers carries
them into the saved file and into conversion, where they are either dead
weight or, worse, change behaviour. Here the model stays a pure function of
the preprocessed pixels and augmentation is recorded in ``config.json``.

Every random draw is *stateless*, seeded from ``(run seed, epoch, position)``,
so a run is reproducible for a seed and a resumed run sees the same
augmented images as an uninterrupted one.

Operations (per image, on float32 0..255 RGB):

- flips (horizontal and vertical) and 90-degree rotations: smear fields have
  no canonical orientation, so the full dihedral group is label-preserving;
- small affine (rotation, shift, zoom, shear) with reflected borders;
- brightness / contrast / hue: lamp and camera differences;
- stain jitter: per-channel scale and offset in optical density
  (``-log(I/255)``), an RGB approximation of HED jitter (Tellez et al. 2018)
  that mimics stronger/weaker staining rather than a global colour cast;
- HED jitter (``hed``): Tellez et al. (2018) scale and shift of each stain
  concentration after colour deconvolution with the matrix in
  :mod:`leukoedge.stain` (the same formula as ``stain.hed_jitter``);
- random grayscale (``grayscale``, a probability): on those images only shape
  and intensity are left, so colour cannot be the whole answer;
- background swap (``background``, a probability): the image's white cells
  (mask from :mod:`.cells`) are pasted onto another training image's
  background, whose own white cells are painted over with its mean background
  colour. Taleqani backgrounds (red cells, tint, illumination) differ by
  class; after the swap the background no longer says the class, only the
  white cells do;
- cell-centred crop (``cell_crop``, a probability): a square of
  :data:`CELL_CROP_SIDE` of the field, centred on a random white-cell pixel,
  scaled up to the input size, so the net also sees cells large and with
  little field around them;
- scale jitter (``scale_jitter`` F, ``leukoedge train --scale-jitter``, off in
  every recipe): the whole image zoomed by a factor drawn uniformly from
  [1 - F, 1 + F] about its centre (:func:`scale_jitter`). The device brings a
  capture to the training um/px before tiling it (issue 15), so what is left
  is the calibration's own error, a few percent; a model trained with a
  +-15 % jitter does not depend on it. Zooming in is a central crop resized up;
  zooming out shrinks the image and fills the margin with the image's own
  background colour (the median of its border pixels), not a reflection: a
  mirrored margin would invent half cells that no capture contains, and the
  device's tiles of a small capture are padded, not mirrored, too. It runs
  before the other geometric operations, so the affine ``zoom`` (reflected
  borders, +-8 % in ``default``) comes on top.

Background swap and cell crops need a white-cell mask per training image;
the pipeline computes them once on the as-captured images (see
:func:`leukoedge.train.dataset.white_cell_masks`). They run before every other
operation, so geometry and colour changes apply to the composed image.

The ``robust`` recipe turns the last two up: it is the "do not take the colour
shortcut" recipe of issue 7 (compare in benchmarks/results/robustness.md).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

from ..errors import UsageError
from ..stain import HED_FROM_RGB, LUMA, RGB_FROM_HED


@dataclass(frozen=True)
class AugmentConfig:
    """One augmentation recipe (0 / False disables an operation).

    Attributes:
        flip: random horizontal and vertical flips.
        rot90: random multiples of 90 degrees.
        rotation_deg: max absolute small rotation in degrees.
        shift: max shift as a fraction of the side.
        zoom: max relative zoom in/out.
        shear_deg: max absolute shear angle in degrees.
        brightness: max brightness delta as a fraction of 255.
        contrast: max relative contrast change.
        hue: max hue shift (fraction of the colour wheel).
        stain: max relative optical-density scale/offset per channel.
        hed: HED jitter strength (sigma = bias; 0.05 light, 0.2 strong).
        grayscale: probability of replacing an image by its luma.
        background: probability of a background swap with another training image.
        cell_crop: probability of a crop centred on a white cell.
        scale_jitter: max relative zoom F of the scale jitter (0 = off, the default of
            every recipe; ``--scale-jitter`` sets it); see :func:`scale_jitter`.
    """

    flip: bool = True
    rot90: bool = True
    rotation_deg: float = 10.0
    shift: float = 0.05
    zoom: float = 0.08
    shear_deg: float = 4.0
    brightness: float = 0.08
    contrast: float = 0.1
    hue: float = 0.02
    stain: float = 0.05
    hed: float = 0.0
    grayscale: float = 0.0
    background: float = 0.0
    cell_crop: float = 0.0
    scale_jitter: float = 0.0

    def __post_init__(self) -> None:
        if not (0.0 <= self.grayscale <= 1.0) or not (0.0 <= self.hed < 1.0):
            raise UsageError(f"augmentation grayscale must be a probability and hed in [0, 1), got "
                             f"{self.grayscale}, {self.hed}")
        if not (0.0 <= self.background <= 1.0) or not (0.0 <= self.cell_crop <= 1.0):
            raise UsageError(f"augmentation background and cell_crop must be probabilities, got "
                             f"{self.background}, {self.cell_crop}")
        for name in ("rotation_deg", "shift", "zoom", "shear_deg", "brightness", "contrast", "hue", "stain"):
            if getattr(self, name) < 0:
                raise UsageError(f"augmentation {name} must be >= 0, got {getattr(self, name)}")
        if self.zoom >= 0.5 or self.shift >= 0.5 or self.hue > 0.5:
            raise UsageError("augmentation zoom/shift must be < 0.5 and hue <= 0.5")
        if not (0.0 <= self.scale_jitter < 0.5):  # also false for NaN
            raise UsageError(f"--scale-jitter must be a fraction in [0, 0.5), got {self.scale_jitter}",
                             hint="0.15 zooms each training image by a random factor between 0.85 and 1.15")

    @property
    def enabled(self) -> bool:
        return any(bool(v) for v in asdict(self).values())

    @property
    def needs_cells(self) -> bool:
        """True if the recipe needs a white-cell mask per training image."""
        return bool(self.background or self.cell_crop)

    @property
    def has_affine(self) -> bool:
        return bool(self.rotation_deg or self.shift or self.zoom or self.shear_deg)

    def to_dict(self) -> dict:
        return asdict(self)


_ROBUST = AugmentConfig(brightness=0.15, contrast=0.2, hue=0.05, stain=0.1, hed=0.15, grayscale=0.3)

#: Named recipes. ``paper003`` mirrors paper 003's ImageDataGenerator
#: (rotation, width/height shift, shear, zoom, horizontal flip; no colour).
RECIPES: dict[str, AugmentConfig] = {
    "default": AugmentConfig(),
    "paper003": AugmentConfig(flip=True, rot90=False, rotation_deg=20.0, shift=0.1, zoom=0.1,
                              shear_deg=11.0, brightness=0.0, contrast=0.0, hue=0.0, stain=0.0),
    "none": AugmentConfig(flip=False, rot90=False, rotation_deg=0.0, shift=0.0, zoom=0.0, shear_deg=0.0,
                          brightness=0.0, contrast=0.0, hue=0.0, stain=0.0),
    "robust": _ROBUST,
    "cells": replace(_ROBUST, background=0.5, cell_crop=0.25),
    "background-swap": replace(_ROBUST, background=0.5),
}

#: Side of a cell-centred crop as a fraction of the field's short side (drawn uniformly).
CELL_CROP_SIDE = (0.4, 0.7)


def recipe(name: str, scale_jitter: float = 0.0) -> AugmentConfig:
    """The named recipe, with the scale jitter ``scale_jitter`` (0 = off) on top."""
    try:
        base = RECIPES[name]
    except KeyError:
        raise UsageError(f"unknown augmentation recipe {name!r}; use one of {', '.join(RECIPES)}") from None
    return replace(base, scale_jitter=float(scale_jitter)) if scale_jitter else base


def run_recipe(augmentation: dict) -> AugmentConfig:
    """The recipe a run trains with, from its ``config.json["augmentation"]`` (no jitter in older runs)."""
    return recipe(augmentation.get("recipe", "default"), float(augmentation.get("scale_jitter") or 0.0))


def augment_image(image, seed, cfg: AugmentConfig):
    """Augment one float32 HxWx3 image in 0..255 with a stateless ``seed`` (int64[2])."""
    import tensorflow as tf

    seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), num=12)
    if cfg.flip:
        image = tf.image.stateless_random_flip_left_right(image, seeds[0])
        image = tf.image.stateless_random_flip_up_down(image, seeds[1])
    if cfg.scale_jitter:
        image = scale_jitter(image, seeds[10], cfg.scale_jitter)
    if cfg.rot90:
        k = tf.random.stateless_uniform([], seeds[2], 0, 4, dtype=tf.int32)
        image = tf.image.rot90(image, k)
    if cfg.has_affine:
        image = _affine(image, seeds[3], cfg)
    if cfg.hed:
        image = _hed(image, seeds[8], cfg.hed)
    x = image / 255.0
    if cfg.stain:
        x = _stain(x, seeds[4], cfg.stain)
    if cfg.brightness:
        x = x + tf.random.stateless_uniform([], seeds[5], -cfg.brightness, cfg.brightness)
    if cfg.contrast:
        factor = tf.random.stateless_uniform([], seeds[6], 1 - cfg.contrast, 1 + cfg.contrast)
        x = tf.image.adjust_contrast(x, factor)
    if cfg.hue:
        x = tf.image.adjust_hue(tf.clip_by_value(x, 0.0, 1.0), tf.random.stateless_uniform([], seeds[7], -cfg.hue, cfg.hue))
    if cfg.grayscale:
        luma = tf.reduce_sum(tf.clip_by_value(x, 0.0, 1.0) * tf.constant(LUMA, tf.float32), axis=-1, keepdims=True)
        gray = tf.random.stateless_uniform([], seeds[9], 0.0, 1.0) < cfg.grayscale
        x = tf.where(gray, tf.repeat(luma, 3, axis=-1), x)
    return tf.clip_by_value(x * 255.0, 0.0, 255.0)


def cell_views(image, mask, other, other_mask, seed, cfg: AugmentConfig):
    """Background swap and cell-centred crop (each with its probability) on float32 0..255 images.

    ``mask``/``other_mask`` are the HxW white-cell masks (0/1) of ``image`` and of
    the training image ``other`` whose background may be borrowed. An image in
    which no white cell was found keeps its own background: swapping it would
    leave nothing of the image but its label.
    """
    import tensorflow as tf

    s = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), num=3)
    m = tf.cast(mask, tf.float32)
    if cfg.background:
        swap = (tf.random.stateless_uniform([], s[0], 0.0, 1.0) < cfg.background) & (tf.reduce_max(m) > 0.5)
        image = tf.cond(swap, lambda: swap_background(image, m, other, tf.cast(other_mask, tf.float32)),
                        lambda: image)
    if cfg.cell_crop:
        crop = tf.random.stateless_uniform([], s[1], 0.0, 1.0) < cfg.cell_crop
        image = tf.cond(crop, lambda: cell_centred_crop(image, m, s[2]), lambda: image)
    return image


def swap_background(image, mask, other, other_mask):
    """``image``'s white cells on ``other``'s background; ``other``'s white cells painted with its mean background."""
    import tensorflow as tf

    keep = mask[..., None]
    other_cells = other_mask[..., None]
    other_bg = 1.0 - other_cells
    mean_bg = tf.reduce_sum(other * other_bg, axis=[0, 1]) / tf.maximum(tf.reduce_sum(other_bg), 1.0)
    backdrop = other * other_bg + mean_bg * other_cells
    return image * keep + backdrop * (1.0 - keep)


def cell_centred_crop(image, mask, seed):
    """A square crop of :data:`CELL_CROP_SIDE` of the short side, centred on a random white-cell pixel.

    The crop is shifted to stay inside the field and scaled back to the input
    size; an image without white cells is returned unchanged.
    """
    import tensorflow as tf

    s = tf.random.experimental.stateless_split(seed, num=2)
    h = tf.shape(image)[0]
    w = tf.shape(image)[1]
    cells = tf.where(mask > 0.5)  # (k, 2) int64 row, col

    def crop():
        pick = tf.random.stateless_uniform([], s[0], 0, tf.shape(cells, tf.int64)[0], dtype=tf.int64)
        cy, cx = tf.cast(cells[pick, 0], tf.float32), tf.cast(cells[pick, 1], tf.float32)
        hf, wf = tf.cast(h, tf.float32), tf.cast(w, tf.float32)
        side = tf.random.stateless_uniform([], s[1], *CELL_CROP_SIDE) * tf.minimum(hf, wf)
        y0 = tf.clip_by_value(cy - side / 2.0, 0.0, hf - side)
        x0 = tf.clip_by_value(cx - side / 2.0, 0.0, wf - side)
        box = tf.stack([y0 / (hf - 1.0), x0 / (wf - 1.0), (y0 + side - 1.0) / (hf - 1.0), (x0 + side - 1.0) / (wf - 1.0)])
        return tf.image.crop_and_resize(image[None], box[None], [0], tf.stack([h, w]), method="bilinear")[0]

    return tf.cond(tf.shape(cells)[0] > 0, crop, lambda: image)


def scale_jitter(image, seed, jitter: float):
    """Zoom float32 HxWx3 ``image`` about its centre by a factor drawn from [1 - jitter, 1 + jitter].

    One bilinear ``crop_and_resize`` of a centred box of side 1/factor (in
    image units): a factor above 1 samples a central crop (cells larger), below
    1 a box larger than the image, whose outside is the fill. The fill is the
    per-channel median of the image's border pixels (its background); the
    image is shifted by it so ``crop_and_resize``'s scalar extrapolation value
    can stand for a colour.
    """
    import tensorflow as tf

    factor = tf.random.stateless_uniform([], seed, 1.0 - jitter, 1.0 + jitter)
    half = 0.5 / factor
    box = tf.stack([0.5 - half, 0.5 - half, 0.5 + half, 0.5 + half])
    fill = border_colour(image)
    out = tf.image.crop_and_resize((image - fill)[None], box[None], [0], tf.shape(image)[:2], method="bilinear",
                                   extrapolation_value=0.0)[0]
    return out + fill


def border_colour(image):
    """Per-channel median of the outermost pixel ring of float32 HxWx3 ``image`` (its background colour)."""
    import tensorflow as tf

    ring = tf.concat([image[0], image[-1], image[1:-1, 0], image[1:-1, -1]], axis=0)  # (2W + 2H - 4, 3)
    ordered = tf.sort(ring, axis=0)
    return ordered[tf.shape(ordered)[0] // 2]


def _hed(image, seed, strength: float):
    """HED jitter on float 0..255 RGB: the TensorFlow twin of :func:`leukoedge.stain.hed_jitter`."""
    import tensorflow as tf

    s = tf.random.experimental.stateless_split(seed, num=2)
    alpha = tf.random.stateless_uniform([3], s[0], 1 - strength, 1 + strength)
    beta = tf.random.stateless_uniform([3], s[1], -strength, strength)
    od = -tf.math.log((tf.clip_by_value(image, 0.0, 255.0) + 1.0) / 256.0)
    hed = tf.tensordot(od, tf.constant(HED_FROM_RGB, tf.float32), axes=1) * alpha + beta
    od = tf.tensordot(hed, tf.constant(RGB_FROM_HED, tf.float32), axes=1)
    return tf.clip_by_value(256.0 * tf.exp(-od) - 1.0, 0.0, 255.0)


def _affine(image, seed, cfg: AugmentConfig):
    """Rotation, shear, zoom and shift as one projective transform (reflect fill)."""
    import tensorflow as tf

    s = tf.random.experimental.stateless_split(seed, num=5)
    uni = lambda i, lim: tf.random.stateless_uniform([], s[i], -lim, lim)  # noqa: E731
    theta = uni(0, cfg.rotation_deg * math.pi / 180.0)
    shear = uni(1, cfg.shear_deg * math.pi / 180.0)
    zoom = 1.0 + uni(2, cfg.zoom)
    h = tf.cast(tf.shape(image)[0], tf.float32)
    w = tf.cast(tf.shape(image)[1], tf.float32)
    tx = uni(3, cfg.shift) * w
    ty = uni(4, cfg.shift) * h
    # The transform maps OUTPUT pixel (x, y) to the INPUT pixel it samples:
    # in = A @ (out - c) + c + t, with A = rotation @ shear / zoom.
    cos, sin = tf.cos(theta), tf.sin(theta)
    a00, a01 = cos / zoom, (-sin + cos * tf.tan(shear)) / zoom
    a10, a11 = sin / zoom, (cos + sin * tf.tan(shear)) / zoom
    cx, cy = (w - 1) / 2.0, (h - 1) / 2.0
    a02 = cx + tx - a00 * cx - a01 * cy
    a12 = cy + ty - a10 * cx - a11 * cy
    transform = tf.stack([a00, a01, a02, a10, a11, a12, 0.0, 0.0])[None, :]
    out = tf.raw_ops.ImageProjectiveTransformV3(
        images=image[None], transforms=transform, output_shape=tf.shape(image)[:2],
        fill_value=0.0, interpolation="BILINEAR", fill_mode="REFLECT")
    return out[0]


def _stain(x, seed, strength: float):
    """Per-channel optical-density scale and offset (x in 0..1)."""
    import tensorflow as tf

    s = tf.random.experimental.stateless_split(seed, num=2)
    scale = tf.random.stateless_uniform([3], s[0], 1 - strength, 1 + strength)
    offset = tf.random.stateless_uniform([3], s[1], -strength, strength)
    od = -tf.math.log(tf.clip_by_value(x, 1.0 / 255.0, 1.0))
    od = od * scale + offset
    return tf.exp(-tf.maximum(od, 0.0))
