"""Real-size image files for tests: camera frames as a lab has them (2-12 MP JPEG, TIFF, PNG).

The content is a synthetic smear field (the project's own generator) stretched
to the frame size with sensor-like noise, so files have realistic sizes
(a 12 MP JPEG of about 1-3 MB) and the model sees smear-like pixels.
"""
from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image

from leukoedge.data.synth import render_field

#: A Raspberry Pi HQ camera still.
HQ_FRAME = (4056, 3040)
#: An ALL-IDB2-like 5 MP field.
FIELD_5MP = (2592, 1944)


def camera_frame(size: tuple[int, int] = HQ_FRAME, *, seed: int = 0, label: str = "Pro-B",
                 noise: float = 2.0) -> np.ndarray:
    """uint8 RGB (height, width, 3): a smear field stretched to ``size`` = (width, height), plus noise."""
    rng = np.random.default_rng(seed)
    field = Image.fromarray(render_field(label, rng, 448))
    big = np.asarray(field.resize(size, Image.Resampling.BICUBIC), dtype=np.float32)
    if noise:
        big = big + rng.normal(0, noise, big.shape).astype(np.float32)
    return np.clip(big, 0, 255).astype(np.uint8)


def encode(img: np.ndarray | Image.Image, fmt: str, **kw) -> bytes:
    pil = img if isinstance(img, Image.Image) else Image.fromarray(img)
    out = io.BytesIO()
    pil.save(out, format=fmt, **kw)
    return out.getvalue()


def gray16(rgb: np.ndarray) -> Image.Image:
    """A 16-bit grayscale image (mode I;16) from an RGB frame, using the full 16-bit range."""
    luma = rgb.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    return Image.fromarray((luma * 257.0).astype(np.uint16))


def pad_jpeg(data: bytes, total: int) -> bytes:
    """The same JPEG grown to exactly ``total`` bytes with comment (COM) segments after SOI: still valid."""
    missing = total - len(data)
    if data[:2] != b"\xff\xd8" or missing < 0 or 0 < missing < 4:
        raise ValueError("need a JPEG at least 4 bytes smaller than the target size")
    segments = []
    while missing:
        seg = min(missing, 65537)  # marker (2) + length (2) + up to 65533 bytes of comment
        if 0 < missing - seg < 4:
            seg -= 4
        segments.append(b"\xff\xfe" + struct.pack(">H", seg - 2) + b"L" * (seg - 4))
        missing -= seg
    out = data[:2] + b"".join(segments) + data[2:]
    assert len(out) == total, (len(out), total)
    return out


def tiff_without_width_on_page(data: bytes, page: int) -> bytes:
    """A little-endian TIFF with the ImageWidth tag (256) of IFD ``page`` renamed to an unknown tag.

    Pillow then raises ``TypeError: Missing dimensions`` when it reaches that page
    (for page 1: on ``n_frames``), the crash issue 13 found in 24 of 5,500 fuzzed uploads.
    """
    buf = bytearray(data)
    if buf[:4] != b"II*\x00":
        raise ValueError("expected a little-endian TIFF")
    offset = struct.unpack_from("<I", buf, 4)[0]
    for _ in range(page):
        count = struct.unpack_from("<H", buf, offset)[0]
        offset = struct.unpack_from("<I", buf, offset + 2 + 12 * count)[0]
    count = struct.unpack_from("<H", buf, offset)[0]
    for i in range(count):
        entry = offset + 2 + 12 * i
        if struct.unpack_from("<H", buf, entry)[0] == 256:
            struct.pack_into("<H", buf, entry, 65000)
            return bytes(buf)
    raise ValueError("no ImageWidth tag on that page")


def two_page_tiff(first: np.ndarray, second: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(first).save(out, format="TIFF", save_all=True, append_images=[Image.fromarray(second)])
    return out.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG claiming ``width`` x ``height`` RGB with a tiny (invalid) body: a decompression bomb's header."""
    def chunk(tag, body):
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 10)) + chunk(b"IEND", b"")
