#!/usr/bin/env python3
"""Uploads of real camera images (issue 13 part 2): size sweep, fuzz, server memory, 12 MP decode.

    python benchmarks/uploads.py --label before --src /tmp/le-before/src --bundle BUNDLE
    python benchmarks/uploads.py --label after  --src src                --bundle BUNDLE
    python benchmarks/uploads.py --report            # re-render uploads.md from uploads.json
    python benchmarks/uploads.py --reproduce-fuzz 123 --out case123.bin   # one fuzz payload

Everything runs against a REAL server process: ``leukoedge serve --bundle B
--host 127.0.0.1 --port P --camera none --data-dir TMP`` (waitress) started by
this script with ``PYTHONPATH=SRC``, so the source tree under test is chosen
by ``--src`` (a git worktree of the old commit for "before", the working tree
for "after"); the script checks that the child imports leukoedge from there.
Parts (``--parts``, default all):

1. ``sweep``: real JPEGs of smear-like content (mosaics of the BCCD smear
   fields in ``../shared/datasets/ood/bccd-fields``, upscaled, recoloured per
   tile, with sensor-like noise added until the file reaches its size) at
   0.1 .. 20 MB, a 12 MP (4056 x 3040) camera-like frame, and 5 MP PNG
   (8-bit, 16-bit) and 16-bit TIFF rows, each POSTed as multipart field
   ``image`` to ``/api/classify``: HTTP status, ``error.message`` and
   client latency (median of ``--repeats``).
2. ``fuzz``: ``--fuzz-n`` mutated uploads, seeded and reproducible: small
   valid JPEG / PNG / TIFF (multi-page, 16-bit) / BMP / GIF / WebP / PPM /
   TGA images, mutated by bit flips, truncation, byte insertion and
   deletion, and format-aware header edits (TIFF tags removed or changed per
   page, PNG chunk lengths and IHDR fields, JPEG SOF and segment lengths,
   GIF / BMP header fields). Counts status classes; every 5xx is matched to
   the traceback the server logged. Then ``form``: the browser form
   ``POST /upload`` (field ``images``, CSRF token from ``GET /upload``) with
   batches of good + bad + good files: per-file answer, or one error?
3. ``rss``: resident memory of a fresh server process (``/proc/PID/status``
   VmRSS sampled every 5 ms, and VmHWM after resetting it through
   ``/proc/PID/clear_refs``): idle, one maximum-size upload (7999 x 7999
   smooth PNG under the 32 MB limit, 12 MP JPEG, 64 MP in a small 1-bit
   PNG), two at once, and what stays resident after.
4. ``latency``: ``Classifier.classify(jpeg_bytes)`` of the 12 MP frame at
   ``num_threads=1``, in a child process importing leukoedge from ``--src``:
   p50 with the preprocess / invoke split, against Pillow's reduced-size
   JPEG decode (``Image.draft('RGB', (w//8, h//8))``) + resize to the model
   input, interleaved in the same run, quoted as a ratio.

Results merge into ``benchmarks/results/uploads.json`` under ``--label``
(``before``, ``after``, ...) and ``uploads.md`` shows the labels side by
side. Generated images are cached in ``--images-dir`` and identical for
every label (same seed; their SHA-256 is recorded). Every classified upload
is stored by the app, so each server gets a throw-away ``--data-dir``.
Run it niced on a shared machine: ``nice -n 5 python benchmarks/uploads.py ...``.
"""
from __future__ import annotations

import argparse
import base64
import hashlib
import html
import http.client
import io
import json
import os
import random
import re
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
NAME = "uploads"
MB = 1_000_000
MiB = 1 << 20
DEFAULT_CONTENT = REPO.parent / "shared" / "datasets" / "ood" / "bccd-fields"
STARTUP_TIMEOUT_S = 120
LABEL_ORDER = ("before", "after")

# ----------------------------------------------------------------------------------------------
# Image generation (numpy + Pillow only; deterministic for a given seed and Pillow version)
# ----------------------------------------------------------------------------------------------

#: (id, target size in MB (10^6 bytes), width, height): the JPEG size sweep.
SWEEP_JPEG = (
    ("jpeg-0.1MB", 0.1, 640, 480),
    ("jpeg-0.25MB", 0.25, 1024, 768),
    ("jpeg-0.5MB", 0.5, 1280, 960),
    ("jpeg-1MB", 1.0, 1920, 1440),
    ("jpeg-2MB", 2.0, 2592, 1944),
    ("jpeg-5MB", 5.0, 4056, 3040),
    ("jpeg-10MB", 10.0, 4056, 3040),
    ("jpeg-20MB", 20.0, 6000, 4000),
)
CAMERA_W, CAMERA_H = 4056, 3040  # Raspberry Pi HQ camera (IMX477) full-resolution still
FIVE_MP = (2592, 1944)
MAX_SIDE_PX = 7999  # largest square under the 64 MP header limit of the "before" code


def load_sources(content: Path | None, limit: int = 24) -> tuple[list[np.ndarray], str]:
    """Smear fields to build images from: BCCD fields, else leukoedge's synthetic generator."""
    if content is not None and content.is_dir():
        files = sorted(p for p in content.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))[:limit]
        if files:
            srcs = [np.asarray(Image.open(p).convert("RGB")) for p in files]
            return srcs, f"{len(srcs)} fields from {content} (first {limit} by name)"
    sys.path.insert(0, str(REPO / "src"))
    from leukoedge.data.synth import render_field  # numpy + Pillow only

    rng = np.random.default_rng(0)
    labels = ("Benign", "Early", "Pre", "Pro")
    srcs = [render_field(labels[i % 4], rng, size=480) for i in range(12)]
    return srcs, "leukoedge.data.synth.render_field (480 px), 12 fields"


def smear_canvas(w: int, h: int, seed: int, sources: list[np.ndarray], *, tile_px: int = 1600,
                 blur: float = 0.0) -> np.ndarray:
    """A WxH uint8 RGB mosaic of upscaled, flipped, slightly recoloured smear fields."""
    from PIL import ImageFilter

    rng = np.random.default_rng(seed)
    cols = max(1, round(w / tile_px))
    tw = -(-w // cols)
    th = max(1, tw * 3 // 4)
    rows = -(-h // th)
    canvas = Image.new("RGB", (w, h))
    for r in range(rows):
        for c in range(cols):
            src = sources[int(rng.integers(len(sources)))]
            img = Image.fromarray(src)
            if blur:
                img = img.filter(ImageFilter.GaussianBlur(blur))
            if rng.random() < 0.5:
                img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            if rng.random() < 0.5:
                img = img.transpose(Image.Transpose.FLIP_TOP_BOTTOM)
            tile = np.asarray(img.resize((tw, th), Image.Resampling.BILINEAR), dtype=np.float32)
            gain = rng.uniform(0.94, 1.06, size=3).astype(np.float32)
            tile = np.clip(tile * gain, 0, 255).astype(np.uint8)
            canvas.paste(Image.fromarray(tile), (c * tw, r * th))
    return np.asarray(canvas)


def add_noise(canvas: np.ndarray, sigma: float, seed: int) -> np.ndarray:
    """Gaussian sensor-like noise (a 256-row band of noise reused down the image)."""
    if sigma <= 0:
        return canvas
    h, w, _ = canvas.shape
    band = np.round(np.random.default_rng(seed).normal(0.0, sigma, (256, w, 3))).astype(np.int16)
    out = np.empty_like(canvas)
    for y in range(0, h, 256):
        rows = min(256, h - y)
        out[y:y + rows] = np.clip(canvas[y:y + rows].astype(np.int16) + band[:rows], 0, 255).astype(np.uint8)
    return out


def encode_jpeg(rgb: np.ndarray, quality: int, subsampling: int = 2) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=quality, subsampling=subsampling)
    return buf.getvalue()


def jpeg_of_size(canvas: np.ndarray, target: int, seed: int, tol: float = 0.05) -> tuple[bytes, dict]:
    """A JPEG of ``canvas`` + noise within ``tol`` of ``target`` bytes (searching noise, then quality)."""
    best: tuple[bytes, dict] | None = None

    def consider(data: bytes, params: dict):
        nonlocal best
        if best is None or abs(len(data) - target) < abs(len(best[0]) - target):
            best = (data, params)
        return abs(len(data) - target) <= tol * target

    plain = encode_jpeg(canvas, 90)
    if len(plain) > target:  # too big already: lower the quality
        lo, hi = 10, 90
        while lo <= hi:
            q = (lo + hi) // 2
            data = encode_jpeg(canvas, q)
            if consider(data, {"quality": q, "subsampling": "4:2:0", "noise_sigma": 0}):
                return best
            lo, hi = (q + 1, hi) if len(data) < target else (lo, q - 1)
        return best
    # Realistic first: moderate sensor noise at camera qualities, heavier noise only at quality 100.
    for q, sub, cap in ((90, 2, 16.0), (95, 0, 16.0), (100, 0, 96.0)):
        lo, hi = 0.0, cap
        top = encode_jpeg(add_noise(canvas, hi, seed), q, sub)
        if len(top) < target:
            consider(top, {"quality": q, "subsampling": "4:4:4" if sub == 0 else "4:2:0", "noise_sigma": hi})
            continue
        for _ in range(12):
            sigma = (lo + hi) / 2
            data = encode_jpeg(add_noise(canvas, sigma, seed), q, sub)
            params = {"quality": q, "subsampling": "4:4:4" if sub == 0 else "4:2:0", "noise_sigma": round(sigma, 3)}
            if consider(data, params):
                return best
            lo, hi = (sigma, hi) if len(data) < target else (lo, sigma)
    return best


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF)


def encode_png16_rgb(arr16: np.ndarray, level: int = 6) -> bytes:
    """A 16-bit RGB PNG (Pillow cannot write 48-bit PNG); Up filter on every row."""
    h, w, _ = arr16.shape
    raw = np.ascontiguousarray(arr16, dtype=">u2").view(np.uint8).reshape(h, w * 6)
    up = raw.copy()
    up[1:] = raw[1:] - raw[:-1]  # uint8 wrap-around = PNG "Up" filter
    lines = np.empty((h, 1 + w * 6), dtype=np.uint8)
    lines[:, 0] = 2
    lines[:, 1:] = up
    ihdr = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr)
            + png_chunk(b"IDAT", zlib.compress(lines.tobytes(), level)) + png_chunk(b"IEND", b""))


def encode_tiff(pages: list[np.ndarray], rows_per_strip: int = 64) -> bytes:
    """Baseline uncompressed little-endian TIFF of uint8/uint16 pages (HxW or HxWx3), one IFD per page."""
    out = bytearray(b"II*\x00\x00\x00\x00\x00")
    prev_next_ptr = 4
    for arr in pages:
        arr = np.ascontiguousarray(arr)
        h, w = arr.shape[:2]
        spp = 1 if arr.ndim == 2 else arr.shape[2]
        bits = arr.dtype.itemsize * 8
        row_bytes = w * spp * arr.dtype.itemsize
        data = arr.astype("<u2" if bits == 16 else np.uint8).tobytes()
        offsets, counts = [], []
        for y in range(0, h, rows_per_strip):
            n = min(rows_per_strip, h - y) * row_bytes
            if len(out) % 2:
                out += b"\x00"
            offsets.append(len(out))
            counts.append(n)
            out += data[y * row_bytes:y * row_bytes + n]

        def array_at(fmt: str, values: list[int]) -> int:
            nonlocal out
            if len(out) % 2:
                out += b"\x00"
            pos = len(out)
            out += struct.pack("<" + fmt * len(values), *values)
            return pos

        entries: list[tuple[int, int, int, bytes]] = []  # (tag, type, count, 4-byte field)

        def entry(tag: int, typ: int, values: list[int]):
            size = {3: 2, 4: 4}[typ]
            fmt = {3: "H", 4: "I"}[typ]
            if len(values) * size <= 4:
                field = struct.pack("<" + fmt * len(values), *values).ljust(4, b"\x00")
            else:
                field = struct.pack("<I", array_at(fmt, values))
            entries.append((tag, typ, len(values), field))

        entry(256, 4, [w])
        entry(257, 4, [h])
        entry(258, 3, [bits] * spp)
        entry(259, 3, [1])
        entry(262, 3, [2 if spp == 3 else 1])
        entry(273, 4, offsets)
        entry(277, 3, [spp])
        entry(278, 4, [rows_per_strip])
        entry(279, 4, counts)
        entry(284, 3, [1])
        if len(out) % 2:
            out += b"\x00"
        ifd = len(out)
        out[prev_next_ptr:prev_next_ptr + 4] = struct.pack("<I", ifd)
        out += struct.pack("<H", len(entries))
        for tag, typ, count, field in sorted(entries):
            out += struct.pack("<HHI", tag, typ, count) + field
        prev_next_ptr = len(out)
        out += b"\x00\x00\x00\x00"
    return bytes(out)


def pillow_bytes(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


class ImageCache:
    """Generated images kept on disk (same bytes for every label), with their generation facts."""

    def __init__(self, folder: Path, sources: list[np.ndarray], seed: int):
        self.folder = folder
        self.sources = sources
        self.seed = seed
        folder.mkdir(parents=True, exist_ok=True)

    def get(self, key: str, make) -> tuple[bytes, dict]:
        path, meta_path = self.folder / f"{key}.bin", self.folder / f"{key}.json"
        if path.is_file() and meta_path.is_file():
            return path.read_bytes(), json.loads(meta_path.read_text())
        print(f"  generating {key} ...", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        data, meta = make()
        meta = {**meta, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(),
                "generate_s": round(time.perf_counter() - t0, 1)}
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)
        meta_path.write_text(json.dumps(meta, indent=1))
        return data, meta

    def canvas(self, w: int, h: int, salt: int, **kw) -> np.ndarray:
        return smear_canvas(w, h, self.seed * 1000 + salt, self.sources, **kw)

    # -- the images ------------------------------------------------------------------------------
    def sweep(self) -> list[tuple[str, bytes, dict]]:
        out = []
        for i, (key, mb, w, h) in enumerate(SWEEP_JPEG):
            def make(mb=mb, w=w, h=h, i=i):
                data, params = jpeg_of_size(self.canvas(w, h, i), int(mb * MB), self.seed + i)
                return data, {"format": "JPEG", "width": w, "height": h, "target_bytes": int(mb * MB), **params,
                              "description": f"JPEG {w}x{h}, target {mb:g} MB"}
            out.append((key, *self.get(key, make)))
        out.append(("camera-12MP", *self.camera_12mp()))
        out.append(("png-5MP-8bit", *self.get("png-5MP-8bit", self._png8)))
        out.append(("png-5MP-16bit", *self.get("png-5MP-16bit", self._png16)))
        out.append(("tiff-5MP-16bit", *self.get("tiff-5MP-16bit", self._tiff16)))
        return out

    def camera_12mp(self) -> tuple[bytes, dict]:
        def make():
            rgb = add_noise(self.canvas(CAMERA_W, CAMERA_H, 50), 2.5, self.seed + 50)
            return encode_jpeg(rgb, 92, 2), {"format": "JPEG", "width": CAMERA_W, "height": CAMERA_H, "quality": 92,
                                              "subsampling": "4:2:0", "noise_sigma": 2.5,
                                              "description": "12 MP camera-like frame (4056x3040, q92 4:2:0)"}
        return self.get("camera-12MP", make)

    def _png8(self):
        w, h = FIVE_MP
        rgb = add_noise(self.canvas(w, h, 60), 2.0, self.seed + 60)
        return pillow_bytes(Image.fromarray(rgb), "PNG", compress_level=6), {
            "format": "PNG", "width": w, "height": h, "bit_depth": 8, "noise_sigma": 2.0,
            "description": f"PNG {w}x{h} 8-bit RGB"}

    def _rgb16(self, salt: int) -> np.ndarray:
        w, h = FIVE_MP
        base = self.canvas(w, h, salt).astype(np.uint32) * 257
        noise = np.random.default_rng(self.seed + salt).normal(0, 160, (256, w, 3))
        out = np.empty((h, w, 3), dtype=np.uint16)
        for y in range(0, h, 256):
            rows = min(256, h - y)
            out[y:y + rows] = np.clip(base[y:y + rows] + noise[:rows], 0, 65535).astype(np.uint16)
        return out

    def _png16(self):
        w, h = FIVE_MP
        return encode_png16_rgb(self._rgb16(61)), {"format": "PNG", "width": w, "height": h, "bit_depth": 16,
                                                   "description": f"PNG {w}x{h} 16-bit RGB"}

    def _tiff16(self):
        w, h = FIVE_MP
        return encode_tiff([self._rgb16(62)]), {"format": "TIFF", "width": w, "height": h, "bit_depth": 16,
                                                "compression": "none",
                                                "description": f"TIFF {w}x{h} 16-bit RGB, uncompressed"}

    def max_png(self, limit: int) -> tuple[bytes, dict]:
        """7999x7999 smooth RGB PNG under ``limit`` bytes (posterised further until it fits)."""
        def make():
            canvas = self.canvas(MAX_SIDE_PX, MAX_SIDE_PX, 70, tile_px=4000, blur=2.0)
            for shift in range(0, 5):
                rgb = canvas if shift == 0 else (canvas >> shift) << shift
                data = pillow_bytes(Image.fromarray(rgb), "PNG", compress_level=9)
                print(f"    {MAX_SIDE_PX}px PNG, {8 - shift} bits/channel: {len(data) / MB:.1f} MB", file=sys.stderr)
                if len(data) <= limit:
                    return data, {"format": "PNG", "width": MAX_SIDE_PX, "height": MAX_SIDE_PX, "bit_depth": 8,
                                  "posterise_bits": shift, "description":
                                  f"PNG {MAX_SIDE_PX}x{MAX_SIDE_PX} RGB, smooth (blurred, upscaled mosaic"
                                  f"{f', low {shift} bits zeroed' if shift else ''})"}
            raise SystemExit("could not fit the maximum-size PNG under the upload limit")
        return self.get("png-8k-smooth", make)

    def onebit_png(self) -> tuple[bytes, dict]:
        def make():
            for blur in (4.0, 8.0, 16.0, 32.0):  # smoother fields until the file is small
                canvas = self.canvas(MAX_SIDE_PX, MAX_SIDE_PX, 71, tile_px=8000, blur=blur)
                gray = canvas.mean(axis=2)
                data = pillow_bytes(Image.fromarray(gray > np.median(gray)).convert("1"), "PNG", compress_level=9)
                if len(data) <= 60_000:
                    break
            return data, {"format": "PNG", "width": MAX_SIDE_PX, "height": MAX_SIDE_PX, "bit_depth": 1,
                          "blur": blur, "description": f"PNG {MAX_SIDE_PX}x{MAX_SIDE_PX} 1-bit, thresholded smear "
                          "(64 MP in a small file)"}
        return self.get("png-8k-1bit", make)

    def small(self, kind: str) -> bytes:
        """Small good files (224 px, as the Taleqani fields) that pass any size limit."""
        rgb = self.canvas(224, 168, 80)
        if kind == "jpeg":
            return encode_jpeg(rgb, 90)
        return pillow_bytes(Image.fromarray(rgb), "PNG")


# ----------------------------------------------------------------------------------------------
# Fuzz corpus and mutations
# ----------------------------------------------------------------------------------------------

def fuzz_bases(sources: list[np.ndarray], seed: int) -> list[tuple[str, bytes]]:
    """Small valid images of many formats and modes (deterministic)."""
    rgb = smear_canvas(96, 72, seed * 1000 + 90, sources)
    rgb2 = smear_canvas(96, 72, seed * 1000 + 91, sources)
    img, img2 = Image.fromarray(rgb), Image.fromarray(rgb2)
    gray = img.convert("L")
    gray16 = (np.asarray(gray, dtype=np.uint16) * 257 + 100).astype(np.uint16)
    rgb16 = rgb.astype(np.uint16) * 257
    alpha = np.tile(np.linspace(0, 255, 96, dtype=np.uint8), (72, 1))
    rgba = Image.fromarray(np.dstack([rgb, alpha]), "RGBA")
    pal = img.quantize(64)
    pal.info["transparency"] = 0
    exif = Image.Exif()
    exif[274] = 6
    bases = [
        ("jpeg", pillow_bytes(img, "JPEG", quality=85)),
        ("jpeg-progressive", pillow_bytes(img, "JPEG", quality=85, progressive=True)),
        ("jpeg-exif-orient6", pillow_bytes(img, "JPEG", quality=85, exif=exif.tobytes())),
        ("jpeg-gray", pillow_bytes(gray, "JPEG", quality=85)),
        ("png-rgb", pillow_bytes(img, "PNG")),
        ("png-rgba", pillow_bytes(rgba, "PNG")),
        ("png-palette-trns", pillow_bytes(pal, "PNG", transparency=0)),
        ("png-gray16", pillow_bytes(Image.fromarray(gray16), "PNG")),
        ("png-rgb16", encode_png16_rgb(rgb16)),
        ("tiff-rgb", pillow_bytes(img, "TIFF")),
        ("tiff-rgb-lzw", pillow_bytes(img, "TIFF", compression="tiff_lzw")),
        ("tiff-multipage-3", pillow_bytes(img, "TIFF", save_all=True, append_images=[img2, img.transpose(Image.Transpose.ROTATE_180)])),
        ("tiff-multipage-deflate", pillow_bytes(img, "TIFF", compression="tiff_adobe_deflate", save_all=True,
                                                append_images=[img2])),
        ("tiff-gray16", pillow_bytes(Image.fromarray(gray16), "TIFF")),
        ("tiff-rgb16", encode_tiff([rgb16], rows_per_strip=16)),
        ("tiff-rgb16-multipage", encode_tiff([rgb16, rgb2.astype(np.uint16) * 257], rows_per_strip=16)),
        ("bmp-rgb", pillow_bytes(img, "BMP")),
        ("bmp-palette", pillow_bytes(img.quantize(200), "BMP")),
        ("gif", pillow_bytes(pal, "GIF")),
        ("gif-animated", pillow_bytes(img.quantize(64), "GIF", save_all=True,
                                      append_images=[img2.quantize(64), gray.quantize(32)], duration=100, loop=0)),
        ("webp", pillow_bytes(img, "WEBP", quality=80)),
        ("ppm", pillow_bytes(img, "PPM")),
        ("tga", pillow_bytes(img, "TGA")),
    ]
    return bases


CONTENT_TYPES = {"jpeg": "image/jpeg", "png": "image/png", "tiff": "image/tiff", "bmp": "image/bmp",
                 "gif": "image/gif", "webp": "image/webp", "ppm": "image/x-portable-pixmap", "tga": "image/x-tga"}
INTERESTING_16 = (0, 1, 2, 7, 8, 0x7F, 0x80, 0xFF, 0x100, 0x7FFF, 0x8000, 0xFFFF, 20001, 8000)
INTERESTING_32 = (0, 1, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 0x10000, 65536, 20001, 8000, 100_000)


def sniff(data: bytes) -> str:
    if data[:2] == b"\xff\xd8":
        return "jpeg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return "tiff"
    if data[:2] == b"BM":
        return "bmp"
    if data[:4] == b"GIF8":
        return "gif"
    return "other"


# -- generic mutations --------------------------------------------------------------------------
def _pos(rng: random.Random, n: int) -> int:
    """A byte position, biased towards the header (half the time within the first 512 bytes)."""
    if n <= 1:
        return 0
    return rng.randrange(min(n, 512)) if rng.random() < 0.5 else rng.randrange(n)


def m_bitflip(d: bytearray, rng, ctx):
    k = rng.choice((1, 1, 2, 4, 8, 16, 64))
    pos = [_pos(rng, len(d)) for _ in range(k)]
    for p in pos:
        d[p] ^= 1 << rng.randrange(8)
    return d, f"bitflip x{k} @{pos[:6]}{'...' if k > 6 else ''}"


def m_byteset(d, rng, ctx):
    k = rng.choice((1, 2, 4, 8))
    pos = [_pos(rng, len(d)) for _ in range(k)]
    vals = [rng.choice((0x00, 0xFF, 0x7F, 0x80, 0x01, rng.randrange(256))) for _ in pos]
    for p, v in zip(pos, vals):
        d[p] = v
    return d, f"byteset @{pos[:6]}={vals[:6]}"


def m_truncate(d, rng, ctx):
    cut = rng.randrange(1, len(d)) if rng.random() < 0.5 else rng.randrange(len(d) // 2, len(d))
    return d[:cut], f"truncate to {cut}/{len(d)} bytes"


def m_insert(d, rng, ctx):
    p, k = _pos(rng, len(d)), rng.choice((1, 2, 3, 4, 16, 64, 256))
    blob = bytes(rng.randrange(256) for _ in range(k)) if rng.random() < 0.5 else bytes([rng.randrange(256)]) * k
    return d[:p] + blob + d[p:], f"insert {k} bytes @{p}"


def m_delete(d, rng, ctx):
    p, k = _pos(rng, len(d)), rng.choice((1, 2, 4, 16, 64, 512))
    return d[:p] + d[p + k:], f"delete {k} bytes @{p}"


def m_duplicate(d, rng, ctx):
    a, k, b = rng.randrange(len(d)), rng.choice((4, 16, 64, 256)), _pos(rng, len(d))
    return d[:b] + d[a:a + k] + d[b:], f"copy {k} bytes from @{a} to @{b}"


def m_splice(d, rng, ctx):
    name, other = ctx["bases"][rng.randrange(len(ctx["bases"]))]
    p, q = rng.randrange(len(d)), rng.randrange(len(other))
    return d[:p] + other[q:], f"splice tail of {name} from @{q} at @{p}"


GENERIC = (m_bitflip, m_byteset, m_truncate, m_insert, m_delete, m_duplicate, m_splice)


# -- PNG ----------------------------------------------------------------------------------------
def png_chunks(d: bytes) -> list[tuple[int, int, bytes]]:
    out, pos = [], 8
    while pos + 8 <= len(d) and len(out) < 64:
        length = struct.unpack(">I", d[pos:pos + 4])[0]
        out.append((pos, length, bytes(d[pos + 4:pos + 8])))
        if length > len(d):
            break
        pos += 12 + length
    return out


def _fix_crc(d: bytearray, pos: int, length: int) -> None:
    end = pos + 8 + length
    if end + 4 <= len(d):
        d[end:end + 4] = struct.pack(">I", zlib.crc32(bytes(d[pos + 4:end])) & 0xFFFFFFFF)


def m_png(d, rng, ctx):
    chunks = png_chunks(d)
    if not chunks:
        return None
    op = rng.choice(("length", "ihdr", "ihdr", "drop", "idat-cut", "crc", "insert", "text-bomb"))
    if op == "length":
        pos, length, kind = chunks[rng.randrange(len(chunks))]
        new = rng.choice((0, 1, length - 1, length + 1, length * 2, 0x7FFFFFFF, 0xFFFFFFFF, rng.randrange(1 << 32)))
        d[pos:pos + 4] = struct.pack(">I", new & 0xFFFFFFFF)
        return d, f"png {kind.decode('latin-1')} chunk length {length} -> {new & 0xFFFFFFFF}"
    if op == "ihdr":
        pos, length, kind = chunks[0]
        if kind != b"IHDR" or length < 13:
            return None
        field = rng.choice(("width", "height", "bit_depth", "colour_type", "compression", "filter", "interlace"))
        off = {"width": 0, "height": 4, "bit_depth": 8, "colour_type": 9, "compression": 10, "filter": 11,
               "interlace": 12}[field]
        if field in ("width", "height"):
            val = rng.choice((0, 1, 7999, 8000, 20001, 65535, 0x7FFFFFFF, 0xFFFFFFFF))
            d[pos + 8 + off:pos + 12 + off] = struct.pack(">I", val)
        else:
            val = rng.choice((0, 1, 2, 3, 4, 5, 6, 7, 8, 16, 255))
            d[pos + 8 + off] = val
        fixed = rng.random() < 0.8
        if fixed:
            _fix_crc(d, pos, length)
        return d, f"png IHDR {field}={val}{' (CRC fixed)' if fixed else ''}"
    if op == "drop":
        i = rng.randrange(len(chunks))
        pos, length, kind = chunks[i]
        return d[:pos] + d[pos + 12 + length:], f"png drop chunk #{i} {kind.decode('latin-1')}"
    if op == "idat-cut":
        idats = [c for c in chunks if c[2] == b"IDAT"]
        if not idats:
            return None
        pos, length, _ = idats[0]
        keep = rng.randrange(0, max(1, length))
        body = bytes(d[pos + 8:pos + 8 + keep])
        new = png_chunk(b"IDAT", body)
        return d[:pos] + new + d[pos + 12 + length:], f"png IDAT cut to {keep}/{length} bytes (CRC fixed)"
    if op == "crc":
        pos, length, kind = chunks[rng.randrange(len(chunks))]
        end = pos + 8 + length
        if end + 4 > len(d):
            return None
        d[end] ^= 0xFF
        return d, f"png bad CRC on {kind.decode('latin-1')}"
    if op == "insert":
        kind = rng.choice((b"tRNS", b"PLTE", b"eXIf", b"iCCP", b"sBIT", b"XXXX", b"gAMA"))
        payload = bytes(rng.randrange(256) for _ in range(rng.choice((0, 1, 3, 6, 13, 40))))
        pos = chunks[1][0] if len(chunks) > 1 else 8 + 25
        return d[:pos] + png_chunk(kind, payload) + d[pos:], f"png insert {kind.decode()} chunk ({len(payload)} bytes)"
    # text-bomb: zTXt that inflates to 16 MB (Pillow has a text-chunk limit)
    payload = b"k\x00\x00" + zlib.compress(b"A" * (16 * MiB), 9)
    pos = chunks[1][0] if len(chunks) > 1 else 33
    return d[:pos] + png_chunk(b"zTXt", payload) + d[pos:], "png insert zTXt inflating to 16 MiB"


# -- TIFF ---------------------------------------------------------------------------------------
TIFF_TAGS = {256: "ImageWidth", 257: "ImageLength", 258: "BitsPerSample", 259: "Compression",
             262: "Photometric", 273: "StripOffsets", 277: "SamplesPerPixel", 278: "RowsPerStrip",
             279: "StripByteCounts", 284: "PlanarConfig", 317: "Predictor", 320: "ColorMap",
             338: "ExtraSamples", 339: "SampleFormat", 282: "XResolution", 296: "ResolutionUnit"}


def tiff_ifds(d: bytes) -> tuple[str, list[dict]]:
    if len(d) < 8 or d[:4] not in (b"II*\x00", b"MM\x00*"):
        return "<", []
    bo = "<" if d[:2] == b"II" else ">"
    off, ifds, seen = struct.unpack(bo + "I", d[4:8])[0], [], set()
    while 8 <= off and off + 2 <= len(d) and off not in seen and len(ifds) < 16:
        seen.add(off)
        n = struct.unpack(bo + "H", d[off:off + 2])[0]
        entries = []
        for i in range(n):
            e = off + 2 + 12 * i
            if e + 12 > len(d):
                break
            tag, typ, count = struct.unpack(bo + "HHI", d[e:e + 8])
            entries.append({"pos": e, "tag": tag, "type": typ, "count": count})
        nxt = off + 2 + 12 * n
        ifds.append({"off": off, "n": n, "entries": entries, "next_pos": nxt})
        if nxt + 4 > len(d):
            break
        off = struct.unpack(bo + "I", d[nxt:nxt + 4])[0]
    return bo, ifds


def _tag_name(tag: int) -> str:
    return TIFF_TAGS.get(tag, str(tag))


def m_tiff(d, rng, ctx, *, op: str | None = None, page: int | None = None, tag: int | None = None, value=None):
    bo, ifds = tiff_ifds(bytes(d))
    if not ifds:
        return None
    if page is None:
        page = len(ifds) - 1 if (len(ifds) > 1 and rng.random() < 0.6) else rng.randrange(len(ifds))
    page = min(page, len(ifds) - 1)
    ifd = ifds[page]
    if not ifd["entries"]:
        return None
    op = op or rng.choice(("remove", "remove", "value", "value", "value", "type", "count", "next"))
    pick = [e for e in ifd["entries"] if e["tag"] in TIFF_TAGS] or ifd["entries"]
    e = next((x for x in ifd["entries"] if x["tag"] == tag), None) if tag is not None else pick[rng.randrange(len(pick))]
    if e is None:
        return None
    where = f"page {page + 1}/{len(ifds)}"
    if op == "remove":
        rest = b"".join(bytes(d[x["pos"]:x["pos"] + 12]) for x in ifd["entries"] if x is not e)
        nxt = bytes(d[ifd["next_pos"]:ifd["next_pos"] + 4])
        block = struct.pack(bo + "H", len(ifd["entries"]) - 1) + rest + nxt + b"\x00" * 12
        d[ifd["off"]:ifd["off"] + len(block)] = block
        return d, f"tiff remove {_tag_name(e['tag'])} on {where}"
    if op == "value":
        typ, count = e["type"], e["count"]
        size = {1: 1, 3: 2, 4: 4, 8: 2, 9: 4}.get(typ)
        if size is None:
            return None
        fmt = {1: "B", 3: "H", 4: "I", 8: "h", 9: "i"}[typ]
        if value is None:
            value = rng.choice(INTERESTING_16 if size <= 2 else INTERESTING_32)
        if size == 1:
            value &= 0xFF
        elif size == 2:
            value &= 0xFFFF
        if fmt in "hi":
            value = struct.unpack(bo + fmt, struct.pack(bo + fmt.upper(), value))[0]
        if count * size <= 4:
            at = e["pos"] + 8 + size * rng.randrange(count or 1)
        else:
            base = struct.unpack(bo + "I", d[e["pos"] + 8:e["pos"] + 12])[0]
            at = base + size * rng.randrange(count)
            if at + size > len(d):
                return None
        d[at:at + size] = struct.pack(bo + fmt, value)
        return d, f"tiff {_tag_name(e['tag'])}={value} on {where}"
    if op == "type":
        new = rng.choice((0, 1, 2, 3, 4, 5, 7, 11, 12, 13, 16, 17, 255))
        d[e["pos"] + 2:e["pos"] + 4] = struct.pack(bo + "H", new)
        return d, f"tiff {_tag_name(e['tag'])} type {e['type']} -> {new} on {where}"
    if op == "count":
        new = rng.choice((0, 2, 3, 4, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF, e["count"] + 1))
        d[e["pos"] + 4:e["pos"] + 8] = struct.pack(bo + "I", new)
        return d, f"tiff {_tag_name(e['tag'])} count {e['count']} -> {new} on {where}"
    choices = {"itself": ifd["off"], "first IFD": ifds[0]["off"], "past EOF": len(d) + 1000,
               "odd offset": ifd["off"] + 1, "header": 4}
    label = rng.choice(sorted(choices))
    p = ifd["next_pos"]
    if p + 4 > len(d):
        return None
    d[p:p + 4] = struct.pack(bo + "I", choices[label])
    return d, f"tiff next-IFD pointer of {where} -> {label}"


# -- JPEG ---------------------------------------------------------------------------------------
def jpeg_segments(d: bytes) -> list[tuple[int, int, int]]:
    out, pos = [], 2
    while pos + 4 <= len(d) and d[pos] == 0xFF and len(out) < 64:
        marker = d[pos + 1]
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            pos += 2
            continue
        if marker == 0xD9:
            break
        length = struct.unpack(">H", d[pos + 2:pos + 4])[0]
        out.append((pos, marker, length))
        if marker == 0xDA:
            break
        pos += 2 + length
    return out


def m_jpeg(d, rng, ctx):
    segs = jpeg_segments(bytes(d))
    if not segs:
        return None
    op = rng.choice(("sof", "sof", "length", "drop", "scan-cut", "exif"))
    sofs = [s for s in segs if s[1] in (0xC0, 0xC1, 0xC2)]
    if op == "sof" and sofs:
        pos = sofs[0][0]
        field = rng.choice(("height", "width", "components", "precision", "sampling"))
        if field in ("height", "width"):
            val = rng.choice((0, 1, 8000, 20001, 65535))
            at = pos + (5 if field == "height" else 7)
            d[at:at + 2] = struct.pack(">H", val)
        elif field == "components":
            val = rng.choice((0, 1, 2, 4, 255))
            d[pos + 9] = val
        elif field == "precision":
            val = rng.choice((0, 1, 12, 16, 255))
            d[pos + 4] = val
        else:
            val = rng.choice((0x00, 0x11, 0x44, 0x88, 0xFF))
            d[pos + 11] = val
        return d, f"jpeg SOF{sofs[0][1] - 0xC0} {field}={val}"
    if op in ("length", "sof"):
        pos, marker, length = segs[rng.randrange(len(segs))]
        new = rng.choice((0, 1, 2, length - 1, length + 1, length + 100, 0xFFFF))
        d[pos + 2:pos + 4] = struct.pack(">H", new & 0xFFFF)
        return d, f"jpeg segment {marker:#04x} length {length} -> {new & 0xFFFF}"
    if op == "drop":
        pos, marker, length = segs[rng.randrange(len(segs))]
        return d[:pos] + d[pos + 2 + length:], f"jpeg drop segment {marker:#04x}"
    if op == "scan-cut":
        sos = [s for s in segs if s[1] == 0xDA]
        if not sos:
            return None
        start = sos[0][0] + 2 + sos[0][2]
        if start >= len(d) - 2:
            return None
        cut = rng.randrange(start, len(d) - 2)
        return d[:cut] + b"\xff\xd9", f"jpeg scan cut at {cut} (EOI kept)"
    # exif: an APP1 with an Orientation of any value, or a damaged IFD
    orient = rng.choice((0, 1, 3, 6, 8, 9, 255, 65535))
    tiff = b"II*\x00\x08\x00\x00\x00" + struct.pack("<H", 1) + struct.pack("<HHIHH", 274, 3, 1, orient, 0) + b"\x00" * 4
    damaged = rng.random() < 0.4
    if damaged:
        tiff = bytearray(tiff)
        for _ in range(3):
            tiff[rng.randrange(8, len(tiff))] = rng.randrange(256)
        tiff = bytes(tiff)
    app1 = b"Exif\x00\x00" + tiff
    seg = b"\xff\xe1" + struct.pack(">H", len(app1) + 2) + app1
    return d[:2] + seg + d[2:], f"jpeg insert EXIF Orientation={orient}{' (damaged IFD)' if damaged else ''}"


# -- GIF / BMP ----------------------------------------------------------------------------------
def m_gif(d, rng, ctx):
    if len(d) < 13:
        return None
    op = rng.choice(("screen", "descriptor", "lzw"))
    if op == "screen":
        at, val = rng.choice((6, 8)), rng.choice((0, 1, 8000, 20001, 65535))
        d[at:at + 2] = struct.pack("<H", val)
        return d, f"gif screen {'width' if at == 6 else 'height'}={val}"
    pos = 13 + (3 * (2 << (d[10] & 7)) if d[10] & 0x80 else 0)
    while pos < len(d) and d[pos] == 0x21:  # skip extensions
        pos += 2
        while pos < len(d) and d[pos]:
            pos += d[pos] + 1
        pos += 1
    if pos + 11 > len(d) or d[pos] != 0x2C:
        return None
    if op == "descriptor":
        field = rng.choice(("left", "top", "width", "height"))
        at = pos + 1 + 2 * ("left", "top", "width", "height").index(field)
        val = rng.choice((0, 1, 8000, 20001, 65535))
        d[at:at + 2] = struct.pack("<H", val)
        return d, f"gif image {field}={val}"
    lct = 3 * (2 << (d[pos + 9] & 7)) if d[pos + 9] & 0x80 else 0
    at = pos + 10 + lct
    if at >= len(d):
        return None
    val = rng.choice((0, 1, 12, 13, 255))
    d[at] = val
    return d, f"gif LZW minimum code size={val}"


def m_bmp(d, rng, ctx):
    if len(d) < 54:
        return None
    field = rng.choice(("offset", "header_size", "width", "height", "bpp", "compression", "colours"))
    at, fmt = {"offset": (10, "<I"), "header_size": (14, "<I"), "width": (18, "<i"), "height": (22, "<i"),
               "bpp": (28, "<H"), "compression": (30, "<I"), "colours": (46, "<I")}[field]
    if fmt == "<H":
        val = rng.choice((0, 1, 2, 3, 4, 7, 8, 16, 24, 32, 64, 0xFFFF))
    elif fmt == "<i":
        val = rng.choice((0, 1, -1, -72, 20001, -20001, 0x7FFFFFFF, -0x80000000))
    else:
        val = rng.choice((0, 1, 2, 3, 4, 5, 12, 40, 56, 108, 124, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF))
    d[at:at + struct.calcsize(fmt)] = struct.pack(fmt, val)
    return d, f"bmp {field}={val}"


STRUCTURAL = {"png": m_png, "tiff": m_tiff, "jpeg": m_jpeg, "gif": m_gif, "bmp": m_bmp}


def directed_cases(bases: dict[str, bytes]) -> list[tuple[str, str, bytes]]:
    """Hand-picked cases run first: (base, description, payload)."""
    out = []
    for base in ("tiff-multipage-3", "tiff-multipage-deflate", "tiff-rgb16-multipage"):
        for tag in (256, 257, 258, 273, 279, 262, 277):
            res = m_tiff(bytearray(bases[base]), random.Random(0), None, op="remove", page=1, tag=tag)
            if res:
                out.append((base, res[1], bytes(res[0])))
        for tag, value in ((256, 0), (257, 0), (256, 65535), (258, 0), (258, 3), (277, 0), (277, 7), (259, 7),
                           (259, 99), (262, 9), (273, 0xFFFFFFFF)):
            res = m_tiff(bytearray(bases[base]), random.Random(0), None, op="value", page=1, tag=tag, value=value)
            if res:
                out.append((base, res[1], bytes(res[0])))
    for tag in (256, 257, 273, 279):
        res = m_tiff(bytearray(bases["tiff-rgb"]), random.Random(0), None, op="remove", page=0, tag=tag)
        if res:
            out.append(("tiff-rgb", res[1], bytes(res[0])))
    png = bytearray(bases["png-rgb"])
    for field, off, val in (("width", 0, 0), ("width", 0, 7999), ("height", 4, 20001), ("bit_depth", 8, 3),
                            ("colour_type", 9, 1)):
        d = bytearray(png)
        if off < 8:
            d[16 + off:20 + off] = struct.pack(">I", val)
        else:
            d[16 + off] = val
        _fix_crc(d, 8, 13)
        out.append(("png-rgb", f"png IHDR {field}={val} (CRC fixed)", bytes(d)))
    big = bytearray(png)  # a 7999x7999 header over 96x72 pixel data
    big[16:24] = struct.pack(">II", 7999, 7999)
    _fix_crc(big, 8, 13)
    out.append(("png-rgb", "png IHDR 7999x7999 over tiny IDAT (CRC fixed)", bytes(big)))
    out += [("none", "empty file", b""), ("none", "one byte", b"\xff"), ("none", "text", b"hello, not an image\n"),
            ("none", "HTML", b"<!doctype html><title>x</title>"), ("none", "zip header", b"PK\x03\x04" + b"\x00" * 60),
            ("jpeg", "JPEG SOI only", b"\xff\xd8"), ("png-rgb", "PNG signature only", bytes(png[:8])),
            ("tiff-rgb", "TIFF header only", bases["tiff-rgb"][:8])]
    return out


def fuzz_case(index: int, seed: int, bases: list[tuple[str, bytes]], directed: list[tuple[str, str, bytes]]):
    """(base name, [mutation descriptions], payload) for case ``index``; same seed -> same bytes."""
    if index < len(directed):
        base, desc, data = directed[index]
        return base, ["directed: " + desc], data
    rng = random.Random(f"leukoedge-uploads-fuzz:{seed}:{index}")
    name, data = bases[(index - len(directed)) % len(bases)]
    d = bytearray(data)
    ops = []
    ctx = {"bases": bases}
    for _ in range(rng.choice((1, 1, 1, 2, 2, 3))):
        fmt = sniff(bytes(d))
        res = None
        if fmt in STRUCTURAL and rng.random() < 0.6:
            res = STRUCTURAL[fmt](d, rng, ctx)
        if res is None and len(d) < 2:
            res = (d + b"\x00", "append one zero byte")
        if res is None:
            res = GENERIC[rng.randrange(len(GENERIC))](d, rng, ctx)
        d, desc = bytearray(res[0]), res[1]
        ops.append(desc)
        if not d:
            break
    return name, ops, bytes(d)


# ----------------------------------------------------------------------------------------------
# HTTP against the real server
# ----------------------------------------------------------------------------------------------

def multipart(files: list[tuple[str, str, bytes, str]], fields: list[tuple[str, str]] = ()) -> tuple[bytes, str]:
    boundary = f"leukoedge-uploads-{uuid.uuid4().hex}"
    parts: list[bytes] = []
    for name, value in fields:
        parts += [f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'.encode(), value.encode(),
                  b"\r\n"]
    for field, filename, data, ctype in files:
        parts += [(f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="{filename}"\r\n'
                   f"Content-Type: {ctype}\r\n\r\n").encode(), data, b"\r\n"]
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


def http_request(port: int, method: str, path: str, body: bytes | None = None, headers: dict | None = None,
                 timeout: float = 120.0) -> dict:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    t0 = time.perf_counter()
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        data = resp.read()
        return {"status": resp.status, "headers": {k.lower(): v for k, v in resp.getheaders()}, "body": data,
                "ms": (time.perf_counter() - t0) * 1000.0, "error": None}
    except (TimeoutError, socket.timeout):
        return {"status": None, "headers": {}, "body": b"", "ms": (time.perf_counter() - t0) * 1000.0,
                "error": "timeout"}
    except (ConnectionError, http.client.HTTPException, OSError) as err:
        return {"status": None, "headers": {}, "body": b"", "ms": (time.perf_counter() - t0) * 1000.0,
                "error": f"{type(err).__name__}: {err}"}
    finally:
        conn.close()


def classify_upload(port: int, data: bytes, filename: str, ctype: str, timeout: float = 300.0) -> dict:
    body, content_type = multipart([("image", filename, data, ctype)])
    r = http_request(port, "POST", "/api/classify", body, {"Content-Type": content_type}, timeout)
    out = {"status": r["status"], "ms": round(r["ms"], 1), "error_type": None, "message": None}
    if r["error"]:
        out["message"] = f"no response ({r['error']})"
        return out
    try:
        doc = json.loads(r["body"])
    except ValueError:
        out["message"] = "non-JSON body: " + r["body"][:120].decode("utf-8", "replace")
        return out
    if isinstance(doc, dict) and isinstance(doc.get("error"), dict):
        out["error_type"] = doc["error"].get("type")
        out["message"] = doc["error"].get("message")
    elif isinstance(doc, dict):
        out.update({"label": doc.get("label"), "width": doc.get("width"), "height": doc.get("height"),
                    "server_latency_ms": doc.get("latency_ms"), "timings": doc.get("timings")})
    return out


def status_class(status: int | None) -> str:
    return "no response" if status is None else f"{status // 100}xx"


# ----------------------------------------------------------------------------------------------
# The server process
# ----------------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(src: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "LEUKOEDGE_TOKEN"}
    env["PYTHONPATH"] = str(src)
    return env


def check_source(python: str, src: Path, work: Path) -> dict:
    """Which leukoedge the server will import (must come from ``src``)."""
    code = ("import json, leukoedge, leukoedge.edge_app.app as a, leukoedge.preprocess as p; "
            "print(json.dumps({'leukoedge_file': leukoedge.__file__, 'app_file': a.__file__, "
            "'version': leukoedge.__version__}))")
    proc = subprocess.run([python, "-c", code], env=child_env(src), cwd=work, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"cannot import leukoedge from {src}:\n{proc.stderr[-2000:]}")
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    if not Path(info["leukoedge_file"]).resolve().is_relative_to(src.resolve()):
        raise SystemExit(f"the child imports leukoedge from {info['leukoedge_file']}, not from {src}")
    return info


class Server:
    """``leukoedge serve`` in a child process (PYTHONPATH=src), its log in a file."""

    def __init__(self, python: str, src: Path, bundle: Path, work: Path, name: str, cmd_prefix: list[str]):
        self.python, self.src, self.bundle, self.work, self.name = python, src, bundle, work, name
        self.cmd_prefix = cmd_prefix
        self.log_path = work / f"server-{name}.log"
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self.starts = 0
        self.cmd: list[str] = []

    def start(self) -> None:
        self.port = free_port()
        self.starts += 1
        data_dir = self.work / f"data-{self.name}-{self.starts}"
        self.cmd = [*self.cmd_prefix, "--bundle", str(self.bundle), "--host", "127.0.0.1", "--port", str(self.port),
                    "--camera", "none", "--data-dir", str(data_dir)]
        with open(self.log_path, "a") as log:
            log.write(f"\n==== start {self.starts} ====\n")
            log.flush()
            self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT, env=child_env(self.src),
                                         cwd=self.work)
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"leukoedge serve exited with code {self.proc.returncode}:\n{self.log_tail(30)}")
            r = http_request(self.port, "GET", "/api/health", timeout=2)
            if r["status"] == 200:
                return
            time.sleep(0.3)
        raise SystemExit(f"leukoedge serve was not healthy after {STARTUP_TIMEOUT_S} s")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_size(self) -> int:
        return self.log_path.stat().st_size if self.log_path.exists() else 0

    def log_since(self, offset: int) -> str:
        with open(self.log_path, "rb") as fh:
            fh.seek(offset)
            return fh.read().decode("utf-8", "replace")

    def log_tail(self, n: int) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None


_FRAME = re.compile(r'^\s*File "([^"]+)", line (\d+), in (\S+)')


def short_path(path: str) -> str:
    for marker in ("site-packages/", "/src/"):
        if marker in path:
            return path.split(marker, 1)[1]
    return path


def _parse_traceback(block: str) -> tuple[list[tuple[str, int, str]], str | None]:
    frames, exc = [], None
    for line in block.splitlines():
        m = _FRAME.match(line)
        if m:
            frames.append((short_path(m.group(1)), int(m.group(2)), m.group(3)))
            continue
        if frames and line and not line.startswith((" ", "\t")) and not set(line.strip()) <= set("^~ "):
            exc = line.strip()
            break
    return frames, exc


def traceback_cause(text: str) -> dict | None:
    """The exception chain and where it was raised, from the traceback(s) in one request's log excerpt.

    ``exception`` is the root cause then each exception raised while handling it (``A -> B``);
    ``raised_at`` is the deepest frame of the root cause.
    """
    blocks = [_parse_traceback(b) for b in text.split("Traceback (most recent call last):")[1:]]
    blocks = [b for b in blocks if b[0]]
    if not blocks:
        return None
    chain = [exc or "?" for _, exc in blocks]
    root_frames = blocks[0][0]
    deepest = root_frames[-1]
    ours = [f for frames, _ in blocks for f in frames if f[0].startswith("leukoedge/")]
    return {"exception": " -> ".join(chain)[:400], "exception_types": [c.split(":")[0] for c in chain],
            "raised_at": f"{deepest[0]}:{deepest[1]} in {deepest[2]}",
            "leukoedge_frame": f"{ours[-1][0]}:{ours[-1][1]} in {ours[-1][2]}" if ours else None}


# ----------------------------------------------------------------------------------------------
# Memory of the server process
# ----------------------------------------------------------------------------------------------

def proc_status(pid: int) -> dict:
    out = {}
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return out
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "Threads"):
            parts = rest.split()
            if parts and parts[0].isdigit():
                out[key] = int(parts[0]) * (1024 if key != "Threads" else 1)
    return out


def reset_hwm(pid: int) -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0, same user); False where refused."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class RssSampler:
    def __init__(self, pid: int, interval: float = 0.005):
        self.pid, self.interval = pid, interval
        self.peak = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            rss = proc_status(self.pid).get("VmRSS")
            if rss:
                self.peak = max(self.peak, rss)
                self.samples += 1
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def mib(n: int | None) -> float | None:
    return None if n is None else round(n / MiB, 1)


# ----------------------------------------------------------------------------------------------
# The parts
# ----------------------------------------------------------------------------------------------

def ctype_of(fmt: str) -> str:
    return CONTENT_TYPES.get(fmt.lower(), "application/octet-stream")


def ext_of(fmt: str) -> str:
    return {"JPEG": "jpg", "PNG": "png", "TIFF": "tif"}.get(fmt, "bin")


def part_sweep(server: Server, cache: ImageCache, repeats: int) -> list[dict]:
    rows = []
    for key, data, meta in cache.sweep():
        tries = [classify_upload(server.port, data, f"{key}.{ext_of(meta['format'])}", ctype_of(meta["format"]))
                 for _ in range(repeats)]
        first = tries[0]
        row = {"id": key, "description": meta["description"], "format": meta["format"], "width": meta["width"],
               "height": meta["height"], "megapixels": round(meta["width"] * meta["height"] / 1e6, 2),
               "bytes": len(data), "sha256": meta["sha256"], "generation": meta,
               "status": first["status"], "statuses": [t["status"] for t in tries], "error_type": first["error_type"],
               "message": first["message"], "latency_ms": [t["ms"] for t in tries],
               "latency_ms_median": round(statistics.median(t["ms"] for t in tries), 1)}
        ok = [t for t in tries if t["status"] and 200 <= t["status"] < 300]
        if ok:
            row["server_latency_ms_median"] = round(statistics.median(t["server_latency_ms"] for t in ok), 1)
            row["server_preprocess_ms_median"] = round(statistics.median(t["timings"]["preprocess_ms"] for t in ok), 1)
        rows.append(row)
        print(f"  {key:16s} {len(data) / MB:6.2f} MB -> {row['statuses']} {row['message'] or ''} "
              f"({row['latency_ms_median']:.0f} ms)", file=sys.stderr, flush=True)
    return rows


def part_threshold(server: Server, limit: int) -> dict:
    """Largest upload that is not answered 413, by bisection (random bytes: 400 = read and refused as no image)."""
    noise = random.Random("leukoedge-uploads-threshold").randbytes(limit)  # the same probe bytes for every label

    def refused(n: int) -> tuple[bool, dict]:
        r = classify_upload(server.port, noise[:n], "probe.jpg", "image/jpeg", timeout=120)
        return r["status"] in (413, None), r  # None: waitress itself cut the connection

    hi = limit
    too_big, r_hi = refused(hi)
    if not too_big:
        return {"largest_not_413_bytes": None, "note": f"{hi} bytes was not refused with 413 ({r_hi['status']})",
                "probes": 1}
    lo, probes = 1024, 1
    small_refused, r_lo = refused(lo)
    probes += 1
    if small_refused:
        return {"largest_not_413_bytes": 0, "note": "even 1 KiB was refused with 413", "probes": probes}
    while hi - lo > 1024:
        mid = (lo + hi) // 2
        probes += 1
        if refused(mid)[0]:
            hi = mid
        else:
            lo = mid
    return {"largest_not_413_bytes": lo, "smallest_413_bytes": hi, "resolution_bytes": 1024, "probes": probes,
            "status_below": r_lo["status"], "message_above": r_hi["message"]}


def part_fuzz(server: Server, sources, seed: int, n: int, keep_dir: Path, examples: int = 8) -> dict:
    bases = fuzz_bases(sources, seed)
    base_map = dict(bases)
    directed = directed_cases(base_map)
    counts: Counter = Counter()
    by_base: dict[str, Counter] = {}
    four: Counter = Counter()
    causes: dict[str, dict] = {}
    five_examples, hangs, crashes = [], [], []
    keep_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    for i in range(n):
        base, ops, payload = fuzz_case(i, seed, bases, directed)
        fmt = base.split("-")[0] if base != "none" else "other"
        offset = server.log_size()
        r = classify_upload(server.port, payload, f"fuzz-{i}.{fmt}", ctype_of(fmt), timeout=60)
        cls = status_class(r["status"])
        counts[cls] += 1
        by_base.setdefault(base, Counter())[cls] += 1
        if cls == "4xx":
            four[f"{r['status']} {r['error_type']}"] += 1
        elif cls == "5xx":
            time.sleep(0.05)  # let the traceback reach the log file
            cause = traceback_cause(server.log_since(offset)) or {"exception": "no traceback in the log",
                                                                   "raised_at": None, "leukoedge_frame": None}
            key = f"{' -> '.join(cause.get('exception_types') or [cause['exception']])} at {cause['raised_at']}"
            new_cause = key not in causes
            entry = causes.setdefault(key, {**cause, "count": 0, "first_case": i, "first_mutations": ops,
                                            "bases": Counter()})
            entry["count"] += 1
            entry["bases"][base] += 1
            if len(five_examples) < examples or (new_cause and len(five_examples) < examples + 12):
                path = keep_dir / f"case-{i:05d}-{base}.bin"
                path.write_bytes(payload)
                five_examples.append({"case": i, "base": base, "mutations": ops, "bytes": len(payload),
                                      "sha256": hashlib.sha256(payload).hexdigest(), "status": r["status"],
                                      "exception": cause["exception"], "raised_at": cause["raised_at"],
                                      "payload_b64": base64.b64encode(payload).decode() if len(payload) <= 6000 else None,
                                      "kept_at": str(path)})
        elif cls == "no response":
            if not server.alive():
                crashes.append({"case": i, "base": base, "mutations": ops, "exit_code": server.proc.returncode,
                                "log_tail": server.log_tail(15)})
                server.start()
            else:
                hangs.append({"case": i, "base": base, "mutations": ops, "error": r["message"]})
        if (i + 1) % 250 == 0:
            print(f"  fuzz {i + 1}/{n}: {dict(counts)}", file=sys.stderr, flush=True)
    health = http_request(server.port, "GET", "/api/health", timeout=10)["status"]
    for entry in causes.values():
        entry["bases"] = dict(entry["bases"].most_common())
    return {
        "n": n, "seed": seed, "directed_cases": len(directed),
        "bases": [{"name": name, "bytes": len(d), "sha256": hashlib.sha256(d).hexdigest()} for name, d in bases],
        "counts": {k: counts.get(k, 0) for k in ("2xx", "4xx", "5xx", "no response", "3xx")},
        "by_base": {b: dict(c) for b, c in sorted(by_base.items())},
        "4xx_types": dict(four.most_common()),
        "5xx_causes": sorted(causes.values(), key=lambda e: -e["count"]),
        "5xx_examples": five_examples,  # the first few, then the first of every further cause
        "hangs": hangs[:10], "hang_count": len(hangs),
        "crashes": crashes[:10], "crash_count": len(crashes),
        "server_healthy_after": health == 200, "server_rss_after_mib": mib(proc_status(server.pid).get("VmRSS")),
        "wall_s": round(time.perf_counter() - t0, 1),
    }


def part_form(server: Server, cache: ImageCache, sources, seed: int, fuzz: dict | None) -> list[dict]:
    good_jpeg, good_png = cache.small("jpeg"), cache.small("png")
    bases = dict(fuzz_bases(sources, seed))
    broken_tiff = m_tiff(bytearray(bases["tiff-multipage-3"]), random.Random(0), None, op="remove", page=1, tag=256)
    sweep_half = next((d for k, d, m in cache.sweep() if k == "jpeg-0.5MB"), None)
    batches = [
        ("good JPEG + random bytes + good PNG", [("a.jpg", good_jpeg), ("noise.jpg", os.urandom(3000)), ("b.png", good_png)]),
        ("good JPEG + truncated JPEG + good PNG", [("a.jpg", good_jpeg), ("cut.jpg", good_jpeg[:len(good_jpeg) // 2]),
                                                  ("b.png", good_png)]),
        ("good JPEG + multi-page TIFF, ImageWidth removed on page 2 + good PNG",
         [("a.jpg", good_jpeg), ("page2.tif", bytes(broken_tiff[0])), ("b.png", good_png)]),
    ]
    first5 = (fuzz or {}).get("5xx_examples") or []
    if first5:
        ex = first5[0]
        payload = Path(ex["kept_at"]).read_bytes()
        batches.append((f"good JPEG + fuzz case {ex['case']} (a 5xx on the API) + good PNG",
                        [("a.jpg", good_jpeg), (f"case{ex['case']}.bin", payload), ("b.png", good_png)]))
    if sweep_half is not None:
        batches.append(("good JPEG + 0.5 MB camera JPEG + good PNG",
                        [("a.jpg", good_jpeg), ("half.jpg", sweep_half), ("b.png", good_png)]))
    batches.append(("truncated JPEG + random bytes (nothing good)",
                    [("cut.jpg", good_jpeg[:len(good_jpeg) // 2]), ("noise.jpg", os.urandom(3000))]))
    rows = []
    for name, files in batches:
        page = http_request(server.port, "GET", "/upload")
        cookie = (page["headers"].get("set-cookie") or "").split(";", 1)[0]
        m = re.search(rb'name="csrf_token" value="([^"]+)"', page["body"])
        token = m.group(1).decode() if m else ""
        body, ctype = multipart([("images", fn, d, ctype_of(sniff(d))) for fn, d in files], [("csrf_token", token)])
        offset = server.log_size()
        r = http_request(server.port, "POST", "/upload", body, {"Content-Type": ctype, "Cookie": cookie}, 120)
        text = r["body"].decode("utf-8", "replace")
        failures = [(html.unescape(a), html.unescape(b)) for a, b in
                    re.findall(r'<li><span class="mono">(.*?)</span>: (.*?)</li>', text)]
        err = re.search(r'id="error-message">(.*?)</p>', text, re.S)
        row = {"batch": name, "files": [fn for fn, _ in files], "bytes": [len(d) for _, d in files],
               "status": r["status"], "location": r["headers"].get("location"),
               "classified": text.count('class="card tile"'), "failures": failures,
               "error_message": html.unescape(err.group(1).strip()) if err else None}
        if r["status"] and r["status"] >= 500:
            time.sleep(0.05)
            row["server_cause"] = traceback_cause(server.log_since(offset))
        if row["status"] == 303:
            row["classified"] = 1
        rows.append(row)
        print(f"  form: {name}: {r['status']} classified={row['classified']} failures={len(failures)} "
              f"{row['error_message'] or ''}", file=sys.stderr, flush=True)
    return rows


def part_rss(server: Server, cache: ImageCache, limit: int) -> dict:
    pid = server.pid
    out: dict = {"method": None, "phases": []}
    time.sleep(2)
    out["start"] = {k: mib(v) for k, v in proc_status(pid).items() if k != "Threads"}
    warm = classify_upload(server.port, cache.small("jpeg"), "warm.jpg", "image/jpeg")
    time.sleep(2)
    st = proc_status(pid)
    out["idle"] = {"after": "start + one 224 px upload, 2 s settle", "status": warm["status"],
                   "rss_mib": mib(st.get("VmRSS")), "hwm_since_start_mib": mib(st.get("VmHWM"))}
    images = [("camera-12MP", *cache.camera_12mp()), ("png-8k-smooth", *cache.max_png(limit)),
              ("png-8k-1bit", *cache.onebit_png())]
    hwm_ok = reset_hwm(pid)
    out["method"] = ("VmHWM reset through /proc/PID/clear_refs before each phase, and VmRSS sampled every 5 ms"
                     if hwm_ok else "VmRSS sampled every 5 ms (clear_refs refused, VmHWM not resettable)")

    def phase(name: str, key: str, data: bytes, meta: dict, clients: int) -> dict:
        before = proc_status(pid).get("VmRSS")
        reset_hwm(pid)
        results: list[dict] = [None] * clients
        barrier = threading.Barrier(clients)

        def go(j):
            barrier.wait()
            results[j] = classify_upload(server.port, data, f"{key}-{j}.{ext_of(meta['format'])}",
                                         ctype_of(meta["format"]), timeout=600)

        with RssSampler(pid) as sampler:
            threads = [threading.Thread(target=go, args=(j,)) for j in range(clients)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        st = proc_status(pid)
        peak = max(sampler.peak, st.get("VmHWM", 0) if hwm_ok else 0)
        time.sleep(1.0)
        after1 = proc_status(pid).get("VmRSS")
        row = {"phase": name, "image": key, "description": meta["description"], "bytes": len(data),
               "clients": clients, "statuses": [r["status"] for r in results],
               "messages": sorted({r["message"] for r in results if r["message"]}),
               "latency_ms": [r["ms"] for r in results], "rss_before_mib": mib(before), "peak_mib": mib(peak),
               "peak_over_before_mib": mib(peak - before) if before else None,
               "sampled_peak_mib": mib(sampler.peak), "rss_1s_after_mib": mib(after1)}
        print(f"  rss {name}: {row['statuses']} peak {row['peak_mib']} MiB (before {row['rss_before_mib']}), "
              f"1 s after {row['rss_1s_after_mib']}", file=sys.stderr, flush=True)
        return row

    for key, data, meta in images:
        out["phases"].append(phase(f"one {key}", key, data, meta, 1))
    for key, data, meta in images:
        out["phases"].append(phase(f"two {key} at once", key, data, meta, 2))
    time.sleep(5)
    st = proc_status(pid)
    out["resident_after"] = {"after": "all requests ended, 5 s settle", "rss_mib": mib(st.get("VmRSS")),
                             "rss_anon_mib": mib(st.get("RssAnon")), "hwm_last_phase_mib": mib(st.get("VmHWM"))}
    out["images"] = {key: {k: meta.get(k) for k in ("description", "bytes", "sha256", "width", "height")}
                     for key, _, meta in images}
    return out


LATENCY_WORKER = "_classify-worker"


def classify_worker(bundle: str, image: str, runs: int, warmup: int) -> int:
    """Child process: in-process classify at 1 thread vs Pillow draft decode (imports leukoedge from PYTHONPATH)."""
    import leukoedge
    from leukoedge.runtime import Classifier, load_bundle

    b = load_bundle(bundle, allow_invalid=True)
    clf = Classifier(b, num_threads=1)
    height, width = b.spec.size
    data = Path(image).read_bytes()

    def draft():
        t0 = time.perf_counter()
        img = Image.open(io.BytesIO(data))
        img.draft("RGB", (img.size[0] // 8, img.size[1] // 8))
        rgb = img.convert("RGB").resize((width, height), Image.Resampling.BILINEAR)
        np.asarray(rgb)
        return (time.perf_counter() - t0) * 1000.0, img.size

    def full():
        t0 = time.perf_counter()
        img = Image.open(io.BytesIO(data))
        img.load()
        np.asarray(img.convert("RGB").resize((width, height), Image.Resampling.BILINEAR))
        return (time.perf_counter() - t0) * 1000.0

    for _ in range(warmup):
        clf.classify(data)
        draft()
        full()
    cl, pre, inv, post, dr, fu = [], [], [], [], [], []
    every: dict[str, list[float]] = {}  # every key of pred.timings, whatever the tree under test reports
    draft_size = None
    for i in range(runs):
        for step in ((0, 1, 2), (1, 2, 0), (2, 0, 1))[i % 3]:
            if step == 0:
                t0 = time.perf_counter()
                pred = clf.classify(data)
                cl.append((time.perf_counter() - t0) * 1000.0)
                pre.append(pred.timings.get("preprocess_ms", float("nan")))
                inv.append(pred.timings.get("invoke_ms", float("nan")))
                post.append(pred.timings.get("postprocess_ms", float("nan")))
                for k, v in pred.timings.items():
                    every.setdefault(k, []).append(float(v))
            elif step == 1:
                ms, draft_size = draft()
                dr.append(ms)
            else:
                fu.append(full())

    def q(xs, p):
        xs = sorted(xs)
        return xs[min(len(xs) - 1, int(round(p * (len(xs) - 1))))]

    def summ(xs):
        return {"p50": round(statistics.median(xs), 2), "p90": round(q(xs, 0.9), 2), "min": round(min(xs), 2),
                "max": round(max(xs), 2)}

    with Image.open(io.BytesIO(data)) as probe:
        probe.draft("RGB", (probe.size[0] // 8, probe.size[1] // 8))
        draft_size = probe.size
    out = {"leukoedge_file": leukoedge.__file__, "num_threads": 1, "runs": runs, "warmup": warmup,
           "input": [height, width], "image_bytes": len(data), "draft_decoded_size": list(draft_size),
           "classify_ms": summ(cl), "preprocess_ms": summ(pre), "invoke_ms": summ(inv), "postprocess_ms": summ(post),
           "draft_baseline_ms": summ(dr), "full_decode_resize_ms": summ(fu),
           "timings_p50_ms": {k: round(statistics.median(v), 2) for k, v in every.items()},
           "runtime": clf.info().get("runtime"), "runtime_version": clf.info().get("runtime_version")}
    out["ratio_classify_to_draft"] = round(out["classify_ms"]["p50"] / out["draft_baseline_ms"]["p50"], 2)
    out["preprocess_share"] = round(out["preprocess_ms"]["p50"] / out["classify_ms"]["p50"], 3)
    print(json.dumps(out))
    return 0


def part_latency(python: str, src: Path, bundle: Path, cache: ImageCache, work: Path, runs: int, warmup: int) -> dict:
    data, meta = cache.camera_12mp()
    path = cache.folder / "camera-12MP.bin"
    cmd = [python, str(Path(__file__).resolve()), LATENCY_WORKER, str(bundle), str(path), str(runs), str(warmup)]
    print("+ PYTHONPATH=" + str(src) + " " + " ".join(cmd), file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, env=child_env(src), cwd=work, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"latency worker failed:\n{proc.stderr[-3000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["image"] = {k: meta.get(k) for k in ("description", "bytes", "sha256", "width", "height")}
    out["goal_ms"] = 20.0
    out["meets_goal"] = out["classify_ms"]["p50"] <= 20.0
    print(f"  12 MP classify p50 {out['classify_ms']['p50']} ms (preprocess {out['preprocess_ms']['p50']}, invoke "
          f"{out['invoke_ms']['p50']}); draft baseline {out['draft_baseline_ms']['p50']} ms; ratio "
          f"{out['ratio_classify_to_draft']}", file=sys.stderr, flush=True)
    return out


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------

def ordered_labels(runs: dict) -> list[str]:
    return sorted(runs, key=lambda k: (LABEL_ORDER.index(k) if k in LABEL_ORDER else len(LABEL_ORDER), k))


def _short(msg: str | None, n: int = 90) -> str | None:
    if msg is None:
        return None
    return msg if len(msg) <= n else msg[:n - 1] + "…"


def render(report: dict) -> str:
    from leukoedge.bench.machine import describe_machine
    from leukoedge.bench.report import fmt_bytes, md_table

    runs = report.get("runs", {})
    labels = ordered_labels(runs)
    parts: list[str] = []
    parts.append("Issue 13 part 2: what happens when the app is sent real camera images. Every figure comes from a "
                 "real `leukoedge serve` process (waitress) on a loopback port with a throw-away data folder, "
                 "started by this script with `PYTHONPATH` set to the source tree under test. Labels are "
                 "measured separately (each with its own machine line and command below) and shown side by "
                 "side; the images are byte-identical between labels (same seed, SHA-256 in the JSON).")
    rows = []
    for lb in labels:
        r = runs[lb]
        stamps = r.get("parts_runs") or {"all": {"command": r["command"], "machine": r["machine"],
                                                 "source": r["source"]}}
        groups: dict = {}
        for part, st in stamps.items():
            groups.setdefault((st["command"], st["machine"].get("date_utc")), (st, []))[1].append(part)
        for (command, date), (st, names) in groups.items():
            rows.append((lb, ", ".join(names), date, f"`{st['source']['src']}`", st["source"].get("git_commit"),
                         st["source"].get("git_dirty_files"), describe_machine(st["machine"]),
                         st["machine"].get("load_average"), f"`{command}`"))
    parts.append("## Runs\n\n" + md_table(("label", "parts", "date (UTC)", "source tree", "commit",
                                           "uncommitted files", "machine", "load average", "command"), rows))
    rows = []
    for lb in labels:
        b = runs[lb]["bundle"]
        par = b.get("parity") or {}
        rows.append((lb, b.get("path"), f"{b.get('model')} {b.get('version')}",
                     f"{b.get('input_height')}x{b.get('input_width')}", b.get("quantize"), b.get("valid"),
                     f"agreement {par.get('agreement'):.3f}, accuracy {par.get('float_accuracy'):.3f} -> "
                     f"{par.get('quant_accuracy'):.3f} on {par.get('n_images')} test images"
                     if par.get("agreement") is not None else None, b.get("served_with")))
    parts.append("## Bundle\n\n" + md_table(("label", "bundle", "model", "input (HxW)", "quantisation", "valid",
                                             "parity gate (int8 vs float)", "served with"), rows))
    notes = [(lb, runs[lb].get("note")) for lb in labels if runs[lb].get("note")]
    if notes:
        parts.append("\n".join(f"- **{lb}**: {n}" for lb, n in notes))

    # 1. sweep
    sweeps = {lb: {row["id"]: row for row in runs[lb].get("sweep") or []} for lb in labels}
    ids = []
    for lb in labels:
        ids += [i for i in sweeps[lb] if i not in ids]
    if ids:
        head = ["upload", "pixels", "file size"]
        for lb in labels:
            head += [f"{lb}: status", f"{lb}: message", f"{lb}: ms"]
        rows = []
        for i in ids:
            ref = next(sweeps[lb][i] for lb in labels if i in sweeps[lb])
            row = [f"{i} ({ref['format']})", f"{ref['width']}x{ref['height']} ({ref['megapixels']:g} MP)",
                   fmt_bytes(ref["bytes"])]
            for lb in labels:
                s = sweeps[lb].get(i)
                if s is None:
                    row += [None, None, None]
                    continue
                statuses = sorted(set(s["statuses"]), key=s["statuses"].index)
                row += ["/".join(str(x) for x in statuses), _short(s["message"]) if s["message"] else
                        (f"ok: {s.get('server_latency_ms_median')} ms in the server, preprocess "
                         f"{s.get('server_preprocess_ms_median')} ms" if s.get("server_latency_ms_median") else "ok"),
                        f"{s['latency_ms_median']:.0f}"]
            rows.append(row)
        reps = {lb: len(next(iter(sweeps[lb].values()))["statuses"]) for lb in labels if sweeps[lb]}
        parts.append("## 1. Upload size sweep: `POST /api/classify`, field `image`\n\n"
                     "Smear-like content: mosaics of BCCD smear fields, upscaled, flipped and recoloured per tile, "
                     "with Gaussian sensor noise added (JPEG quality and noise searched until the file is within "
                     "5 % of its size; sizes in MB = 10^6 bytes). `ms` is the client's wall time for the whole "
                     "request (upload + answer), the median of "
                     + ", ".join(f"{n} ({lb})" for lb, n in reps.items()) + " tries; the status column lists every "
                     "distinct status seen.\n\n" + md_table(head, rows))
        th = [(lb, runs[lb].get("threshold")) for lb in labels if runs[lb].get("threshold")]
        if th:
            parts[-1] += ("\n\nLargest upload not refused with 413, for one fixed seeded stream of random bytes "
                          "bisected to 1 KiB (below it the app reads the file and answers 400 \"not an image\"; where "
                          "the limit falls can depend on the bytes, so the JPEG rows above are a second sample): "
                          + "; ".join(
                              f"**{lb}** {fmt_bytes(t['largest_not_413_bytes']) if t.get('largest_not_413_bytes') is not None else t.get('note')}"
                              for lb, t in th) + ".")

    # 2. fuzz
    fz = {lb: runs[lb].get("fuzz") for lb in labels if runs[lb].get("fuzz")}
    if fz:
        keys = [("uploads", lambda f: f["n"]), ("of which hand-picked first", lambda f: f["directed_cases"]),
                ("2xx (classified)", lambda f: f["counts"]["2xx"]), ("4xx (refused with a message)",
                                                                     lambda f: f["counts"]["4xx"]),
                ("5xx (server error)", lambda f: f["counts"]["5xx"]),
                ("no response (timeout or reset)", lambda f: f["counts"]["no response"]),
                ("server crashes (restarted)", lambda f: f["crash_count"]),
                ("distinct 5xx causes", lambda f: len(f["5xx_causes"])),
                ("server healthy afterwards", lambda f: f["server_healthy_after"]),
                ("server RSS afterwards (MiB)", lambda f: f["server_rss_after_mib"]),
                ("wall time (s)", lambda f: f["wall_s"])]
        rows = [(name, *[fn(fz[lb]) if lb in fz else None for lb in labels]) for name, fn in keys]
        any_f = next(iter(fz.values()))
        text = ("## 2. Fuzz: mutated uploads to `POST /api/classify`\n\n"
                f"Seed {any_f['seed']}; {len(any_f['bases'])} small valid base images (96x72 smear crops: "
                + ", ".join(b["name"] for b in any_f["bases"]) + "), mutated 1-3 times each by bit flips, byte "
                "sets, truncation, insertion, deletion, copies, splices, and format-aware edits (TIFF tags removed "
                "or changed on any page, next-IFD pointers; PNG chunk lengths, IHDR fields, dropped / cut / "
                "inserted chunks; JPEG SOF fields, segment lengths, cut scans, EXIF; GIF and BMP header fields). "
                "The first cases are hand-picked (e.g. ImageWidth removed on the second TIFF page). Reproduce any "
                "case with `python benchmarks/uploads.py --reproduce-fuzz N --out FILE` (same seed).\n\n"
                + md_table(("", *labels), rows))
        for lb in labels:
            f = fz.get(lb)
            if not f:
                continue
            if f["5xx_causes"]:
                crow = [(c["count"], _short(c["exception"], 110), c["raised_at"], c["leukoedge_frame"],
                         f"{c['first_case']}: " + _short("; ".join(c.get("first_mutations") or []), 90),
                         ", ".join(f"{b} ({n})" for b, n in list(c["bases"].items())[:4])) for c in f["5xx_causes"]]
                text += (f"\n\n**5xx causes ({lb})**, from the tracebacks the server logged (`A -> B`: B raised "
                         "while handling A):\n\n"
                         + md_table(("count", "exception", "raised at", "last leukoedge frame",
                                     "first case: mutations", "base images (cases)"), crow))
            if f["5xx_examples"]:
                erow = [(e["case"], e["base"], _short("; ".join(e["mutations"]), 120), e["bytes"],
                         e["sha256"][:12]) for e in f["5xx_examples"]]
                text += (f"\n\n**5xx cases kept ({lb})**: the first {min(8, len(f['5xx_examples']))}, then the first "
                         "of each further cause (payloads base64 in the JSON when small):\n\n"
                         + md_table(("case", "base", "mutations", "bytes", "sha256"), erow))
            if f["4xx_types"]:
                text += f"\n\n4xx answers ({lb}): " + ", ".join(f"{k}: {v}" for k, v in f["4xx_types"].items()) + "."
            if f["hang_count"] or f["crash_count"]:
                text += f"\n\nNo-response cases ({lb}): {f['hang_count']} timeouts/resets, {f['crash_count']} crashes."
        parts.append(text)

    # 2b. form
    forms = {lb: runs[lb].get("form") for lb in labels if runs[lb].get("form")}
    if forms:
        names = []
        for lb in labels:
            names += [r["batch"] for r in forms.get(lb, []) if r["batch"] not in names]
        rows = []
        for n in names:
            row = [n]
            for lb in labels:
                r = next((x for x in forms.get(lb, []) if x["batch"] == n), None)
                if r is None:
                    row.append(None)
                    continue
                if r["status"] == 200 and (r["classified"] or r["failures"]):
                    ans = f"200: {r['classified']} classified, per-file failures: " + (
                        "; ".join(f"{a}: {_short(b, 70)}" for a, b in r["failures"]) or "none")
                elif r["status"] == 303:
                    ans = "303 to the one result"
                else:
                    ans = f"{r['status']}: {_short(r['error_message'], 110)}"
                    if r.get("server_cause"):
                        ans += f" (server: {_short(r['server_cause']['exception'], 80)})"
                row.append(ans)
            rows.append(row)
        parts.append("## 2b. Browser form `POST /upload` (field `images`, CSRF token from `GET /upload`)\n\n"
                     "Does a batch with one bad file answer per file, or fail as a whole?\n\n"
                     + md_table(("batch", *labels), rows))

    # 3. rss
    rs = {lb: runs[lb].get("rss") for lb in labels if runs[lb].get("rss")}
    if rs:
        phases = []
        for lb in labels:
            phases += [p["phase"] for p in (rs.get(lb) or {}).get("phases", []) if p["phase"] not in phases]
        rows = [["idle (after one 224 px upload)", *[f"{rs[lb]['idle']['rss_mib']}" if lb in rs else None
                                                    for lb in labels]]]
        for ph in phases:
            row = [ph]
            for lb in labels:
                p = next((x for x in rs.get(lb, {}).get("phases", []) if x["phase"] == ph), None)
                if p is None:
                    row.append(None)
                    continue
                st = "/".join(str(s) for s in p["statuses"])
                row.append(f"peak {p['peak_mib']} (+{p['peak_over_before_mib']}), 1 s after {p['rss_1s_after_mib']}; "
                           f"HTTP {st}" + (f" ({_short(p['messages'][0], 60)})" if p["messages"] else ""))
            rows.append(row)
        rows.append(["resident after all requests (5 s settle)",
                     *[f"{rs[lb]['resident_after']['rss_mib']}" if lb in rs else None for lb in labels]])
        imgs = next(iter(rs.values()))["images"]
        parts.append("## 3. Server memory (RSS, MiB)\n\n"
                     f"A fresh server process per label. Method: {next(iter(rs.values()))['method']}. `peak` is the "
                     "highest resident size during the request(s) and `+` its rise over the RSS just before; "
                     "\"two at once\" starts two client threads at a barrier. Images: "
                     + "; ".join(f"`{k}` = {v['description']}, {fmt_bytes(v['bytes'])}" for k, v in imgs.items())
                     + ".\n\n" + md_table(("phase", *labels), rows))

    # 4. latency
    lt = {lb: runs[lb].get("latency") for lb in labels if runs[lb].get("latency")}
    if lt:
        keys = [("classify p50 (ms)", lambda x: x["classify_ms"]["p50"]),
                ("classify p90 (ms)", lambda x: x["classify_ms"]["p90"]),
                ("preprocess p50 (ms)", lambda x: x["preprocess_ms"]["p50"]),
                ("invoke p50 (ms)", lambda x: x["invoke_ms"]["p50"]),
                ("postprocess p50 (ms)", lambda x: x["postprocess_ms"]["p50"]),
                ("preprocess share of classify", lambda x: f"{100 * x['preprocess_share']:.0f} %"),
                ("baseline: draft decode + resize p50 (ms)", lambda x: x["draft_baseline_ms"]["p50"]),
                ("classify / baseline", lambda x: f"{x['ratio_classify_to_draft']:.2f}x"),
                ("reference: full decode + resize p50 (ms)", lambda x: x["full_decode_resize_ms"]["p50"]),
                ("goal: classify p50 <= 20 ms", lambda x: "met" if x["meets_goal"] else "not met")]
        rows = [(name, *[fn(lt[lb]) if lb in lt else None for lb in labels]) for name, fn in keys]
        one = next(iter(lt.values()))
        parts.append("## 4. Classify a 12 MP JPEG in-process, 1 interpreter thread\n\n"
                     f"`Classifier(bundle, num_threads=1).classify(jpeg_bytes)` on {one['image']['description']} "
                     f"({fmt_bytes(one['image']['bytes'])}), model input {one['input'][0]}x{one['input'][1]}, "
                     f"{one['runs']} runs after {one['warmup']} warm-up, in a child process importing leukoedge from "
                     "the source tree under test. Split from `pred.timings`. Baseline, interleaved in the same "
                     "process: Pillow `Image.draft('RGB', (w//8, h//8))` (DCT-domain 1/8 decode, "
                     f"{one['draft_decoded_size'][0]}x{one['draft_decoded_size'][1]}) + bilinear resize to the "
                     "model input. The full-size decode + resize is shown for reference.\n\n"
                     + md_table(("", *labels), rows))
    return "\n\n".join(parts)


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------

def git_facts(src: Path) -> dict:
    def git(*a):
        p = subprocess.run(["git", "-C", str(src), *a], capture_output=True, text=True)
        return p.stdout.strip() if p.returncode == 0 else None

    dirty = git("status", "--porcelain", "--", ".")
    return {"git_commit": git("rev-parse", "--short", "HEAD"), "git_toplevel": git("rev-parse", "--show-toplevel"),
            "git_dirty_files": None if dirty is None else len([x for x in dirty.splitlines() if x.strip()])}


def bundle_facts(bundle: Path) -> dict:
    meta = {}
    try:
        meta = json.loads((bundle / "bundle.json").read_text())
    except (OSError, ValueError):
        pass
    spec = meta.get("preprocessing") or meta.get("spec") or {}
    model = meta.get("model") or {}
    return {"path": str(bundle), "model": model.get("name") if isinstance(model, dict) else model,
            "version": model.get("version") if isinstance(model, dict) else None,
            "input_height": spec.get("height"), "input_width": spec.get("width"), "colour": spec.get("colour"),
            "quantize": meta.get("quantize"), "valid": meta.get("valid"), "invalid_reason": meta.get("invalid_reason"),
            "parity": {k: (meta.get("parity") or {}).get(k) for k in ("agreement", "delta_accuracy", "float_accuracy",
                                                                     "quant_accuracy", "n_images", "passed")}}


def reproduce(args) -> int:
    sources, _ = load_sources(args.content)
    bases = fuzz_bases(sources, args.seed)
    base, ops, payload = fuzz_case(args.reproduce_fuzz, args.seed, bases, directed_cases(dict(bases)))
    out = args.out or Path(f"fuzz-case-{args.reproduce_fuzz}.bin")
    out.write_bytes(payload)
    print(f"case {args.reproduce_fuzz}: base {base}; {'; '.join(ops)}; {len(payload)} bytes, sha256 "
          f"{hashlib.sha256(payload).hexdigest()} -> {out}")
    return 0


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == LATENCY_WORKER:
        return classify_worker(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
    from _common import RESULTS, leukoedge_cmd, main_guard, write_results  # noqa: F401 - driver side only
    from leukoedge.bench.machine import machine_info

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--label", help="name of this measurement, e.g. before / after (merged into the JSON)")
    parser.add_argument("--src", type=Path, default=REPO / "src", help="source tree with the leukoedge package to "
                        "serve and classify with (default: this checkout's src/)")
    parser.add_argument("--bundle", type=Path, help="bundle directory to serve")
    parser.add_argument("--force-invalid-bundle", action="store_true", help="serve a bundle whose parity gate failed")
    parser.add_argument("--python", default=sys.executable, help="interpreter for the server (default: this one)")
    parser.add_argument("--parts", default="sweep,fuzz,form,rss,latency")
    parser.add_argument("--fuzz-n", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=13)
    parser.add_argument("--repeats", type=int, default=3, help="tries per sweep image")
    parser.add_argument("--latency-runs", type=int, default=20)
    parser.add_argument("--latency-warmup", type=int, default=3)
    parser.add_argument("--limit-mb", type=float, default=32.0, help="server upload limit in MiB (the default)")
    parser.add_argument("--content", type=Path, default=DEFAULT_CONTENT, help="folder of smear fields")
    parser.add_argument("--images-dir", type=Path, default=Path(tempfile.gettempdir()) / "leukoedge-uploads-images")
    parser.add_argument("--work-dir", type=Path, help="keep server logs, data and 5xx payloads here (default: temp)")
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    parser.add_argument("--note", help="free text recorded with this label (e.g. how the bundle was made)")
    parser.add_argument("--replace", action="store_true", help="drop this label's earlier figures for the parts "
                        "not measured now (default: keep them)")
    parser.add_argument("--quick", action="store_true", help="smoke test: small counts, written as uploads_quick.*")
    parser.add_argument("--report", action="store_true", help="only re-render the Markdown from the JSON")
    parser.add_argument("--reproduce-fuzz", type=int, metavar="N", help="write fuzz case N's payload and exit")
    parser.add_argument("--out", type=Path, help="with --reproduce-fuzz: where to write it")
    args = parser.parse_args()
    if args.reproduce_fuzz is not None:
        return reproduce(args)
    name = NAME + ("_quick" if args.quick else "")
    json_path = args.out_dir / f"{name}.json"
    existing = json.loads(json_path.read_text()) if json_path.is_file() else {"runs": {}}
    title = "Uploads of real camera images (issue 13 part 2)"
    if args.report:
        write_results(name, existing, render(existing), title, args.out_dir)
        return 0
    if not args.label or not args.bundle:
        parser.error("--label and --bundle are needed for a measurement (or use --report)")
    if args.quick:
        args.fuzz_n, args.repeats, args.latency_runs = min(args.fuzz_n, 150), 1, 5
    parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    unknown = parts - {"sweep", "fuzz", "form", "rss", "latency"}
    if unknown:
        parser.error(f"unknown parts {sorted(unknown)}")
    src = args.src.resolve()
    bundle = args.bundle.resolve()
    work = Path(tempfile.mkdtemp(prefix="leukoedge-uploads-", dir=None)) if args.work_dir is None else args.work_dir
    work.mkdir(parents=True, exist_ok=True)
    source = {"src": str(args.src), "resolved": str(src), **check_source(args.python, src, work), **git_facts(src)}
    print(f"serving leukoedge {source['version']} from {source['leukoedge_file']} (commit {source['git_commit']}, "
          f"{source['git_dirty_files']} uncommitted files)", file=sys.stderr, flush=True)
    sources, content_desc = load_sources(args.content)
    cache = ImageCache(args.images_dir, sources, args.seed)
    limit = int(args.limit_mb * MiB)
    cmd_prefix = leukoedge_cmd("serve", args.python)
    bfacts = bundle_facts(bundle)
    bfacts["served_with"] = "--force-invalid-bundle" if args.force_invalid_bundle else "as is"
    if args.force_invalid_bundle:
        cmd_prefix = [*cmd_prefix, "--force-invalid-bundle"]
    run: dict = {"label": args.label, "command": None, "machine": machine_info(), "source": source, "bundle": bfacts,
                 "note": args.note, "content": content_desc, "images_dir": str(args.images_dir), "seed": args.seed,
                 "server_command": "leukoedge serve --bundle B --host 127.0.0.1 --port P --camera none "
                                   "--data-dir TMP" + (" --force-invalid-bundle" if args.force_invalid_bundle else "")}
    from _common import command_line
    run["command"] = command_line()
    t0 = time.perf_counter()
    try:
        if parts & {"sweep", "fuzz", "form"}:
            server = Server(args.python, src, bundle, work, "main", cmd_prefix)
            server.start()
            print(f"server pid {server.pid} on port {server.port}", file=sys.stderr, flush=True)
            try:
                if "sweep" in parts:
                    print("sweep:", file=sys.stderr)
                    run["sweep"] = part_sweep(server, cache, args.repeats)
                    run["threshold"] = part_threshold(server, limit)
                    print(f"  413 threshold: {run['threshold']}", file=sys.stderr, flush=True)
                if "fuzz" in parts:
                    print("fuzz:", file=sys.stderr)
                    run["fuzz"] = part_fuzz(server, sources, args.seed, args.fuzz_n, work / "fuzz-5xx")
                if "form" in parts:
                    print("form:", file=sys.stderr)
                    run["form"] = part_form(server, cache, sources, args.seed, run.get("fuzz"))
            finally:
                server.stop()
        if "rss" in parts:
            print("rss (fresh server):", file=sys.stderr)
            server = Server(args.python, src, bundle, work, "rss", cmd_prefix)
            server.start()
            try:
                run["rss"] = part_rss(server, cache, limit - 64 * 1024)
            finally:
                server.stop()
        if "latency" in parts:
            print("latency:", file=sys.stderr)
            run["latency"] = part_latency(args.python, src, bundle, cache, work, args.latency_runs, args.latency_warmup)
    finally:
        print(f"work folder (server logs, 5xx payloads): {work}", file=sys.stderr)
    run["wall_s"] = round(time.perf_counter() - t0, 1)
    run["work_dir"] = str(work)
    # Re-read: another label may have been merged meanwhile. Parts not measured now keep their old figures
    # (unless --replace); parts_runs says which command and machine produced each part.
    existing = json.loads(json_path.read_text()) if json_path.is_file() else {"runs": {}}
    old = {} if args.replace else dict(existing.setdefault("runs", {}).get(args.label) or {})
    stamp = {"command": run["command"], "machine": run["machine"], "source": source, "bundle": bfacts["path"]}
    run["parts_runs"] = {**(old.get("parts_runs") or {}), **{p: stamp for p in sorted(parts)}}
    if run.get("note") is None:
        run.pop("note")  # keep an earlier part's note
    existing.setdefault("runs", {})[args.label] = {**old, **run}
    existing["runs"] = {lb: existing["runs"][lb] for lb in ordered_labels(existing["runs"])}
    existing.pop("command", None)
    existing["machine"] = run["machine"]
    write_results(name, existing, render(existing), title, args.out_dir)
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == LATENCY_WORKER:
        sys.exit(main())
    sys.path.insert(0, str(HERE))
    from _common import main_guard

    main_guard(main)
