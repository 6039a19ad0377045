"""Where the white cells are: a nucleus-colour mask in numpy + Pillow, below every stage.

The shortcut audit flattens the background around white cells and measures
how much heatmap mass falls on them; the ``cells`` augmentation recipe swaps
the background around them between training images; the device's tiling keeps
the tiles that hold a white cell, and its capture quality gate says "no white
cell in view". All of them need the same answer to "which pixels are white
cells", so it lives here, once, importing no TensorFlow. It is a colour rule
(Wright-Giemsa nuclei absorb green): it is computed on as-captured colour
images, never on grayscale ones, and it is not part of the model's preprocessing.
"""
from __future__ import annotations

import numpy as np

from . import stain

__all__ = ["label_components", "nucleus_score", "otsu_threshold", "white_cell_mask", "white_cell_mask_per_field",
           "MIN_SCORE", "MIN_AREA_FRACTION", "DILATE_FRACTION"]

#: The mask's defaults: the lowest nucleus score that can count, the smallest kept component
#: and the rim dilation (both fractions of the image the mask is computed on, i.e. of one field).
MIN_SCORE, MIN_AREA_FRACTION, DILATE_FRACTION = 60.0, 0.0015, 0.03


def _square_filter(mask: np.ndarray, size: int, reduce) -> np.ndarray:
    """Min (``np.logical_and``) or max (``np.logical_or``) of a boolean mask over ``size`` x ``size`` squares.

    Separable: along the rows, then the columns, each as ``size`` shifted views
    over the window clipped to the image. Identical to Pillow's MinFilter /
    MaxFilter (which pad by repeating the edge pixel, a value already inside the
    clipped window) at a fifth of the cost on a boolean mask (Pillow sorts each
    window); checked against them in tests/test_cells.py.
    """
    r = size // 2
    out = mask
    for axis in (1, 0):
        n = out.shape[axis]
        acc = out.copy()
        for d in range(1, min(r, n - 1) + 1):
            ahead = [slice(None)] * 2
            behind = [slice(None)] * 2
            ahead[axis], behind[axis] = slice(d, None), slice(None, n - d)
            reduce(acc[tuple(behind)], out[tuple(ahead)], out=acc[tuple(behind)])
            reduce(acc[tuple(ahead)], out[tuple(behind)], out=acc[tuple(ahead)])
        out = acc
    return out


def _erode(mask: np.ndarray, size: int) -> np.ndarray:
    return _square_filter(mask, size, np.logical_and)


def _dilate(mask: np.ndarray, size: int) -> np.ndarray:
    return _square_filter(mask, size, np.logical_or)


def label_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """4-connected component labels (0 = background, 1..n) by min-label propagation with pointer jumping."""
    h, w = mask.shape
    big = h * w + 1
    lab = np.where(mask, np.arange(1, h * w + 1).reshape(h, w), big)
    while True:
        prev = lab
        nb = lab.copy()
        nb[1:, :] = np.minimum(nb[1:, :], lab[:-1, :])
        nb[:-1, :] = np.minimum(nb[:-1, :], lab[1:, :])
        nb[:, 1:] = np.minimum(nb[:, 1:], lab[:, :-1])
        nb[:, :-1] = np.minimum(nb[:, :-1], lab[:, 1:])
        nb = np.where(mask, nb, big)
        # Pointer jumping: follow each pixel's label to the label of the pixel it names.
        flat = np.append(nb.ravel(), big)
        nb = np.where(mask, flat[np.minimum(nb, big) - 1], big)
        lab = nb
        if np.array_equal(lab, prev):
            break
    roots, inv = np.unique(lab[mask], return_inverse=True)
    out = np.zeros((h, w), dtype=np.int64)
    out[mask] = inv + 1
    return out, int(roots.size)


def nucleus_score(rgb: np.ndarray) -> np.ndarray:
    """``(B - G) + min(R - G, B - G)``: high for violet/purple/magenta nuclei, low for background and red cells.

    Wright-Giemsa nuclei absorb green strongly: both ``B - G`` and ``R - G`` are
    positive (dark-violet nuclei ~150, pale magenta Pro-B blasts ~90). ``B - G``
    alone also rises on the grey-blue and teal red cells of bluish-lit Taleqani
    fields (R <= G there: the second term pulls them down, to <= ~55), and
    ``R - G`` alone rises on pink red cells (R >> B: capping it at ``B - G`` keeps
    them low). Checked by eye on 24 Taleqani fields of all four classes at 160 px;
    ``B - G`` alone outlined red-cell clusters instead of the blasts in Pre-B fields.
    """
    x = stain.check_rgb(rgb).astype(np.float64)
    bg, rg = x[..., 2] - x[..., 1], x[..., 0] - x[..., 1]
    return bg + np.minimum(rg, bg)


def otsu_threshold(values: np.ndarray) -> float:
    hist, edges = np.histogram(values, bins=256)
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centres)
    mu0 = m0 / np.maximum(w0, 1)
    mu1 = (m0[-1] - m0) / np.maximum(w1, 1)
    return float(centres[np.argmax(w0 * w1 * (mu0 - mu1) ** 2)])


def white_cell_mask(
    rgb: np.ndarray, min_score: float = MIN_SCORE, keep_fraction: float = 0.05, dilate_fraction: float = DILATE_FRACTION,
    min_area_fraction: float = MIN_AREA_FRACTION,
) -> np.ndarray:
    """Boolean mask of white cells: nucleus thresholding, clean-up, component filter, dilation.

    Threshold: Otsu on :func:`nucleus_score`, but never below ``min_score`` (an
    image without nuclei gives an empty mask, not red cells or noise). Opening
    (3x3 min then max) removes specks; components smaller than
    ``min_area_fraction`` of the image (platelets, debris) or than
    ``keep_fraction`` of the largest are dropped; a max filter of
    ``dilate_fraction`` of the short side adds the cytoplasm rim around each nucleus.
    """
    score = nucleus_score(rgb)
    thr = max(otsu_threshold(score), min_score)
    mask = score > thr
    mask = _dilate(_erode(mask, 3), 3)
    if not mask.any():
        return mask
    labels, n = label_components(mask)
    areas = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    keep = np.flatnonzero(areas >= max(keep_fraction * areas.max(), min_area_fraction * mask.size)) + 1
    mask = np.isin(labels, keep)
    size = 2 * int(round(dilate_fraction * min(mask.shape) / 2)) + 1
    if size >= 3:
        mask = _dilate(mask, size)
    return mask


def white_cell_mask_per_field(rgb: np.ndarray, field_size: tuple[int, int]) -> np.ndarray:
    """:func:`white_cell_mask` of an image larger than one field, its size rules taken per ``field_size`` (h, w).

    The smallest kept component and the rim are fractions of the image the mask is
    given; on a capture showing many training fields they are rescaled so a white
    cell is kept and outlined as it would be in one field (the rim capped at half
    the short side).
    """
    h, w = rgb.shape[:2]
    area = MIN_AREA_FRACTION * field_size[0] * field_size[1] / (h * w)
    dilate = min(0.5, DILATE_FRACTION * min(field_size) / min(h, w))
    return white_cell_mask(rgb, min_area_fraction=area, dilate_fraction=dilate)
