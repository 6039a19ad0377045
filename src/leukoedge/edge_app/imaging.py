"""The image files stored with each result: original, thumbnail, heatmap overlay.

Pure functions of bytes / arrays (Pillow + numpy), testable without a server.
Originals that arrive as JPEG or PNG are kept byte-for-byte, so re-classifying
the stored file reproduces the stored result exactly; anything else (TIFF,
BMP, 16-bit, ...) is stored as a lossless PNG of the decoded RGB pixels the
model worked from (a browser shows no TIFF), which are reduced to at least
twice the model input (:func:`leukoedge.preprocess.decode_size`): the stored
PNG re-classifies exactly, but is not the full-resolution file, so a lab keeps
its own originals of such uploads. Camera stills are stored in full as
high-quality JPEG (a 12 MP PNG takes seconds to encode on a Pi).

Thumbnails and heatmap overlays are drawn from the same decoded pixels, so a
12 MP upload is never decoded in full just to draw them.
"""
from __future__ import annotations

import io

import numpy as np
from PIL import Image

from ..runtime import overlay

THUMBNAIL_SIDE = 256
HEATMAP_SIDE = 640
CAMERA_JPEG_QUALITY = 95


def _jpeg(rgb: np.ndarray, *, max_side: int | None, quality: int) -> bytes:
    img = Image.fromarray(np.ascontiguousarray(rgb), mode="RGB")
    if max_side is not None and max(img.size) > max_side:
        img.thumbnail((max_side, max_side), Image.Resampling.BILINEAR)
    out = io.BytesIO()
    img.save(out, format="JPEG", quality=quality)
    return out.getvalue()


def _png(rgb: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb), mode="RGB").save(out, format="PNG", compress_level=3)
    return out.getvalue()


def stored_original(data: bytes | None, fmt: str | None, rgb: np.ndarray) -> tuple[bytes, str]:
    """(bytes, extension) to keep: the upload itself when JPEG/PNG, else PNG of ``rgb``.

    ``data`` is None for camera stills, which become JPEG; ``fmt`` is the
    upload's format from its (already checked) header.
    """
    if data is None:
        return _jpeg(rgb, max_side=None, quality=CAMERA_JPEG_QUALITY), ".jpg"
    if fmt == "JPEG":
        return bytes(data), ".jpg"
    if fmt == "PNG":
        return bytes(data), ".png"
    return _png(rgb), ".png"


def thumbnail(rgb: np.ndarray) -> bytes:
    return _jpeg(rgb, max_side=THUMBNAIL_SIDE, quality=80)


def heatmap_overlay(rgb: np.ndarray, heatmap: np.ndarray) -> bytes:
    """JPEG of the heatmap blended over a display-sized copy of the image."""
    img = Image.fromarray(np.ascontiguousarray(rgb), mode="RGB")
    if max(img.size) > HEATMAP_SIDE:
        img.thumbnail((HEATMAP_SIDE, HEATMAP_SIDE), Image.Resampling.BILINEAR)
    return _jpeg(overlay(np.asarray(img), heatmap), max_side=None, quality=85)
