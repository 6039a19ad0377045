"""Class activation maps and their overlay on the image (numpy + Pillow).

CAM (Zhou et al. 2016): for a network ending in global-average-pooling and a
dense softmax layer, the class score is ``sum_c w[c, k] * mean(F[:, :, c])``,
so ``sum_c w[c, k] * F[:, :, c]`` shows *where* the evidence for class ``k``
lies. ``convert`` stores ``w`` in the bundle when the model has that shape;
otherwise the channel mean of the feature map (where the last layer is
active, class-agnostic) is shown, and the bundle says which method it used.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

from ..errors import InvalidImageError


def class_activation_map(features: np.ndarray, weights: np.ndarray | None, class_index: int) -> np.ndarray:
    """Raw (unnormalised) map, shape of the feature map's spatial grid."""
    features = np.asarray(features, dtype=np.float32)
    if features.ndim != 3:
        raise ValueError(f"expected an HxWxC feature map, got shape {features.shape}")
    if weights is None:
        return features.mean(axis=2)
    if weights.shape[0] != features.shape[2]:
        raise ValueError(f"CAM weights have {weights.shape[0]} channels, the feature map {features.shape[2]}")
    return np.tensordot(features, weights[:, class_index].astype(np.float32), axes=([2], [0]))


def normalise_map(cam: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """ReLU, upsample (bilinear) to ``size`` = (height, width), scale to [0, 1] float32.

    A flat map (no positive evidence anywhere) becomes all zeros rather than
    dividing by zero.
    """
    cam = np.maximum(np.asarray(cam, dtype=np.float32), 0.0)
    up = Image.fromarray(np.ascontiguousarray(cam, dtype=np.float32)).resize((size[1], size[0]), resample=Image.Resampling.BILINEAR)
    out = np.asarray(up, dtype=np.float32)
    out = np.maximum(out, 0.0)
    peak = float(out.max())
    if peak <= 1e-12:
        return np.zeros(size, dtype=np.float32)
    return np.clip(out / peak, 0.0, 1.0).astype(np.float32)


def _jet_lut() -> np.ndarray:
    """256x3 uint8 'jet' colour map (blue = low, red = high), built from its formula."""
    x = np.linspace(0.0, 1.0, 256)
    r = np.clip(1.5 - np.abs(4 * x - 3), 0, 1)
    g = np.clip(1.5 - np.abs(4 * x - 2), 0, 1)
    b = np.clip(1.5 - np.abs(4 * x - 1), 0, 1)
    return (np.stack([r, g, b], axis=1) * 255 + 0.5).astype(np.uint8)


_JET = _jet_lut()


def colorize(heatmap: np.ndarray) -> np.ndarray:
    """HxW values in [0, 1] -> HxWx3 uint8 colours."""
    idx = np.clip(np.nan_to_num(np.asarray(heatmap, dtype=np.float32)) * 255 + 0.5, 0, 255).astype(np.uint8)
    return _JET[idx]


def overlay(rgb: np.ndarray, heatmap: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """Blend a [0, 1] heatmap (any size) over a uint8 RGB image; returns uint8 RGB.

    The heatmap is resized to the image, so it works on the full-resolution
    capture as well as on the model-sized input.
    """
    rgb = np.asarray(rgb)
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise InvalidImageError(f"overlay needs a uint8 HxWx3 image, got {rgb.dtype} {rgb.shape}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    heat = np.asarray(heatmap, dtype=np.float32)
    if heat.shape != rgb.shape[:2]:
        heat = np.asarray(
            Image.fromarray(np.ascontiguousarray(heat)).resize((rgb.shape[1], rgb.shape[0]), Image.Resampling.BILINEAR),
            dtype=np.float32,
        )
    colours = colorize(heat).astype(np.float32)
    out = (1.0 - alpha) * rgb.astype(np.float32) + alpha * colours
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)
