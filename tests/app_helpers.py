"""Plain helpers for the edge-app tests (no fixtures; see ``app_fixtures`` for those)."""
from __future__ import annotations

import io
import re

import numpy as np
from PIL import Image

from bundle_factory import CLASSES  # noqa: F401  (re-exported for the tests)


def png_bytes(arr: np.ndarray | Image.Image) -> bytes:
    img = arr if isinstance(arr, Image.Image) else Image.fromarray(arr)
    out = io.BytesIO()
    img.save(out, format="PNG")
    return out.getvalue()


def jpeg_bytes(arr: np.ndarray, quality: int = 90) -> bytes:
    out = io.BytesIO()
    Image.fromarray(arr).save(out, format="JPEG", quality=quality)
    return out.getvalue()


def csrf_from(html: bytes | str) -> str:
    """The CSRF token embedded in a rendered form."""
    text = html.decode() if isinstance(html, bytes) else html
    match = re.search(r'name="csrf_token" value="([^"]+)"', text)
    assert match, "page has no CSRF token"
    return match.group(1)
