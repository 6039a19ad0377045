"""Input images for latency runs, as encoded bytes (what the app receives).

Benchmarks feed encoded files, not pre-decoded arrays, so "preprocess" includes
JPEG decoding exactly as on the device. Sources, in order of preference:

1. ``--images DIR``: up to ``limit`` image files from a folder (recursively, evenly spaced
   over the sorted names, so every class folder contributes);
2. the synthetic smear generator ``leukoedge.data.synth`` (always part of the package);
3. a fixed, seeded noise image (always available; deterministic bytes).

What can fail: an ``--images`` folder that does not exist or holds no readable
image raises :class:`~leukoedge.errors.UsageError`.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import InvalidImageError, UsageError
from ..files import IMAGE_SUFFIXES, image_files
from ..preprocess import describe_image

#: Side of generated images: the Taleqani fields the zoo is trained on are 224 x 224.
DEFAULT_SIDE = 224


@dataclass(frozen=True)
class BenchImages:
    """Encoded images plus where they came from (recorded in every report)."""

    images: tuple[bytes, ...]
    source: str          # "folder", "synthetic" or "noise"
    description: str     # e.g. "8 JPEG 224x224 from /data/x"


def from_folder(folder: str | Path, limit: int = 32) -> BenchImages:
    root = Path(folder)
    if not root.is_dir():
        raise UsageError(f"--images {root}: not a folder")
    files = image_files(root)
    # Evenly spaced over the sorted list, so a class-folder dataset gives every class.
    step = max(1, len(files) // limit)
    images: list[bytes] = []
    sizes: set[str] = set()
    for path in files[::step][:limit]:
        data = path.read_bytes()
        try:
            info = describe_image(data)
        except InvalidImageError:
            continue  # unreadable files are the data checker's business, not a benchmark's
        images.append(data)
        sizes.add(f"{info['format']} {info['width']}x{info['height']}")
    if not images:
        raise UsageError(f"--images {root}: no readable image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return BenchImages(tuple(images), "folder", f"{len(images)} images ({', '.join(sorted(sizes))}) from {root}")


def _encode_jpeg(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.asarray(rgb, dtype=np.uint8), mode="RGB").save(buf, format="JPEG", quality=92)
    return buf.getvalue()


def noise_images(n: int = 4, side: int = DEFAULT_SIDE, seed: int = 0) -> BenchImages:
    """Seeded, smooth-ish noise JPEGs: same bytes every run, realistic JPEG decode cost."""
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(n):
        coarse = rng.integers(0, 256, size=(side // 8, side // 8, 3), dtype=np.uint8)
        img = Image.fromarray(coarse, mode="RGB").resize((side, side), Image.Resampling.BILINEAR)
        fine = np.asarray(img, dtype=np.int16) + rng.integers(-12, 13, size=(side, side, 3))
        images.append(_encode_jpeg(np.clip(fine, 0, 255).astype(np.uint8)))
    return BenchImages(tuple(images), "noise", f"{n} seeded noise JPEG {side}x{side}")


def synthetic_images(n: int = 4, side: int = DEFAULT_SIDE, seed: int = 0) -> BenchImages | None:
    """Smear fields from :func:`leukoedge.data.synth.render_field`, one class after another,
    JPEG-encoded as the generator writes them; None when that module is not installed."""
    try:
        from ..data import synth
    except ImportError:
        return None
    labels = sorted(synth.STYLES)
    rng = np.random.default_rng(seed)
    images = tuple(synth.encode_jpeg(synth.render_field(labels[i % len(labels)], rng, size=side)) for i in range(n))
    return BenchImages(images, "synthetic", f"{n} synthetic smear JPEG {side}x{side} (seed {seed})")


def bench_images(folder: str | Path | None = None, n: int = 4, seed: int = 0) -> BenchImages:
    """The images a benchmark should use, by the preference order in the module doc."""
    if folder is not None:
        return from_folder(folder)
    return synthetic_images(n, seed=seed) or noise_images(n, seed=seed)
