"""White-cell masks for training and the audit: the mask itself lives in :mod:`leukoedge.cells`.

Re-exported here so training code keeps one import; the batch helper with its
progress bar is the only thing that belongs to training.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from tqdm import tqdm

from ..cells import label_components, nucleus_score, otsu_threshold, white_cell_mask

__all__ = ["label_components", "nucleus_score", "otsu_threshold", "white_cell_mask", "white_cell_masks_of"]


def white_cell_masks_of(images: Sequence[np.ndarray], desc: str = "white-cell masks") -> np.ndarray:
    """Boolean ``[N, H, W]`` masks of same-size uint8 RGB images, with a progress bar."""
    return np.stack([white_cell_mask(im) for im in tqdm(images, desc=desc, unit="img", leave=False,
                                                        mininterval=1.0)])
