"""Out-of-distribution score of the training report (pure numpy + preprocess).

Score: the maximum softmax probability (Hendrycks & Gimpel 2017). It needs
nothing but the model's output, so the device computes it for free from the
same ``probabilities`` tensor, and it survives int8 quantisation.

The threshold is the ``quantile`` (5 % by default) of the validation set's
max-softmax (:func:`leukoedge.stats.thresholds.quantile_threshold`): about
5 % of in-distribution images abstain, by construction, whatever the model's
calibration. Images scoring below it are flagged "does not look like the
training images". How well this separates real foreign images is measured,
not assumed: AUROC (:func:`leukoedge.stats.metrics.auroc`) of (low score =
OOD) between the test split and each ``--ood`` folder.

What can fail: :class:`DatasetError` for an OOD folder with no readable images.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..errors import DatasetError, InvalidImageError
from ..files import require_image_files
from ..preprocess import PreprocessSpec, load_image

SCORE_NAME = "max_softmax"


def max_softmax(probs: np.ndarray) -> np.ndarray:
    return np.asarray(probs, dtype=np.float64).max(axis=1)


def load_folder(folder: str | Path, spec: PreprocessSpec) -> np.ndarray:
    """Every readable image under ``folder`` through the one preprocessing path."""
    arrays = []
    paths = require_image_files(folder, DatasetError, f"OOD folder {folder}")
    for path in tqdm(paths, desc=f"ood {Path(folder).name}", unit="img", leave=False, mininterval=1.0):
        try:
            arrays.append(load_image(path, spec))
        except InvalidImageError:
            continue  # an unreadable file is not an OOD sample; counted below
    if not arrays:
        raise DatasetError(f"{folder}: none of the images could be decoded")
    return np.stack(arrays)
