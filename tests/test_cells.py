"""The white-cell mask's morphology: numpy square filters equal to Pillow's rank filters they replaced."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageFilter

from leukoedge import cells


def _pillow(mask: np.ndarray, flt: ImageFilter.Filter) -> np.ndarray:
    return np.asarray(Image.fromarray(mask.astype(np.uint8) * 255, mode="L").filter(flt)) > 127


@pytest.mark.parametrize("size", [3, 5, 9, 31])
def test_square_filters_equal_pillows_min_and_max_filters_edges_included(size):
    rng = np.random.default_rng(size)
    for h, w in [(1, 1), (1, 7), (5, 2), (17, 40), (64, 33)]:
        for density in (0.05, 0.5, 0.95):
            mask = rng.random((h, w)) < density
            assert np.array_equal(cells._erode(mask, size), _pillow(mask, ImageFilter.MinFilter(size)))
            assert np.array_equal(cells._dilate(mask, size), _pillow(mask, ImageFilter.MaxFilter(size)))


def test_dilating_one_pixel_grows_a_square_clipped_at_the_border():
    mask = np.zeros((6, 6), bool)
    mask[0, 2] = True
    out = cells._dilate(mask, 5)
    assert out.sum() == 3 * 5 and out[:3, :5].all()
    eroded = cells._erode(out, 3)
    assert eroded[0, 0]  # the image edge counts as more of the edge pixel (Pillow's padding), not as background
    assert not eroded[0, 4] and not eroded[2, 2]  # next to background it erodes
