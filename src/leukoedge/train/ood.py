"""Out-of-distribution score and abstention threshold (pure numpy + preprocess).

Score: the maximum softmax probability (Hendrycks & Gimpel 2017). It needs
nothing but the model's output, so the device computes it for free from the
same ``probabilities`` tensor, and it survives int8 quantisation.

The threshold is the ``quantile`` (5 % by default) of the validation
set's max-softmax: about 5 % of in-distribution images abstain, by
construction, whatever the model's calibration. Images scoring below it are
flagged "does not look like the training images". How well this separates
real foreign images is measured, not assumed: AUROC of (low score = OOD)
between the test split and each ``--ood`` folder.

What can fail: :class:`DatasetError` for an OOD folder with no readable images.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..errors import DatasetError, InvalidImageError
from ..preprocess import PreprocessSpec, load_image
from .metrics import roc_auc

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff"}
SCORE_NAME = "max_softmax"


def max_softmax(probs: np.ndarray) -> np.ndarray:
    return np.asarray(probs, dtype=np.float64).max(axis=1)


def choose_threshold(val_probs: np.ndarray, quantile: float = 0.05) -> float:
    """Score below which the device abstains: the ``quantile`` of validation scores."""
    scores = max_softmax(val_probs)
    if not len(scores):
        raise DatasetError("cannot choose an abstention threshold: the validation split is empty")
    return float(np.quantile(scores, quantile))


def ood_auroc(id_scores: np.ndarray, ood_scores: np.ndarray) -> float:
    """AUROC of detecting OOD by a LOW score (1.0 = perfect separation, 0.5 = chance)."""
    scores = np.r_[-np.asarray(id_scores, dtype=np.float64), -np.asarray(ood_scores, dtype=np.float64)]
    positive = np.r_[np.zeros(len(id_scores), bool), np.ones(len(ood_scores), bool)]
    return roc_auc(scores, positive)


def list_images(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetError(f"{folder}: OOD folder does not exist")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise DatasetError(f"{folder}: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) found")
    return files


def load_folder(folder: str | Path, spec: PreprocessSpec) -> np.ndarray:
    """Every readable image under ``folder`` through the one preprocessing path."""
    arrays = []
    for path in tqdm(list_images(folder), desc=f"ood {Path(folder).name}", unit="img", leave=False, mininterval=1.0):
        try:
            arrays.append(load_image(path, spec))
        except InvalidImageError:
            continue  # an unreadable file is not an OOD sample; counted below
    if not arrays:
        raise DatasetError(f"{folder}: none of the images could be decoded")
    return np.stack(arrays)
