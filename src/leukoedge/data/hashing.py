"""Exact and perceptual image hashes for duplicate detection.

- Exact: SHA-256 of the file bytes (byte-identical copies; :func:`leukoedge.files.sha256_file`).
- Near: a 64-bit DCT perceptual hash (pHash) of the 32x32 grayscale image:
  the signs of the 8x8 lowest-frequency DCT coefficients against their median.
  Re-encoding, small resizes and mild colour changes keep the Hamming distance
  small; different fields land around 32 bits apart. Pairs at distance
  <= :data:`NEAR_DUPLICATE_BITS` are near-duplicate *candidates*.
- Confirmation: a 64-bit hash of a smooth smear field is dominated by the
  illumination gradient, so two different fields with the same vignette can
  collide (seen on synthetic fields). A candidate pair is reported only when
  the zero-mean, unit-norm 32x32 grayscale thumbnails also correlate at
  >= :data:`NEAR_DUPLICATE_CORRELATION`. Measured: the real Taleqani near
  pairs correlate at 0.78-1.00, colliding distinct synthetic fields at
  0.54-0.62.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

#: Hamming distance (of 64 bits) at or below which two images are near-duplicate candidates.
NEAR_DUPLICATE_BITS = 4
#: Thumbnail correlation at or above which a candidate pair is confirmed.
NEAR_DUPLICATE_CORRELATION = 0.75


def _dct_matrix(n: int) -> np.ndarray:
    k = np.arange(n)[:, None]
    i = np.arange(n)[None, :]
    m = np.cos(np.pi * (2 * i + 1) * k / (2 * n)) * np.sqrt(2.0 / n)
    m[0] /= np.sqrt(2.0)
    return m


_DCT32 = _dct_matrix(32)


def _gray32(rgb: np.ndarray) -> np.ndarray:
    gray = Image.fromarray(rgb).convert("L").resize((32, 32), Image.Resampling.BILINEAR)
    return np.asarray(gray, dtype=np.float64)


def fingerprint(rgb: np.ndarray) -> tuple[int, np.ndarray]:
    """(pHash, normalised 32x32 thumbnail as float32 of 1024) of a uint8 RGB array."""
    pixels = _gray32(rgb)
    thumb = (pixels - pixels.mean()).ravel()
    thumb /= np.linalg.norm(thumb) + 1e-9
    return _phash_of(pixels), thumb.astype(np.float32)


def phash(rgb: np.ndarray) -> int:
    """64-bit perceptual hash of a uint8 RGB array."""
    return _phash_of(_gray32(rgb))


def _phash_of(pixels: np.ndarray) -> int:
    coeffs = (_DCT32 @ pixels @ _DCT32.T)[:8, :8].ravel()
    bits = coeffs[1:] > np.median(coeffs[1:])  # skip DC: it only encodes brightness
    bits = np.concatenate([[coeffs[0] > 0], bits])
    return int(sum(1 << i for i, b in enumerate(bits) if b))


def hamming(a: int, b: int) -> int:
    return (a ^ b).bit_count()


def near_duplicate_pairs(hashes: list[int], max_bits: int = NEAR_DUPLICATE_BITS,
                         thumbs: list[np.ndarray] | None = None,
                         min_correlation: float = NEAR_DUPLICATE_CORRELATION) -> list[tuple[int, int]]:
    """Index pairs (i < j) whose hashes differ by at most ``max_bits`` and,
    when ``thumbs`` (from :func:`fingerprint`) are given, whose thumbnails
    correlate at ``min_correlation`` or more.

    Vectorised over all pairs with a popcount table: fine for tens of
    thousands of images (n^2/2 XORs of uint64).
    """
    if len(hashes) < 2:
        return []
    h = np.array(hashes, dtype=np.uint64)
    table = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)
    pairs = []
    for i in range(len(h) - 1):
        x = h[i] ^ h[i + 1 :]
        dist = table[x.view(np.uint8).reshape(-1, 8)].sum(axis=1)
        for j in np.nonzero(dist <= max_bits)[0]:
            k = i + 1 + int(j)
            if thumbs is None or float(np.dot(thumbs[i], thumbs[k])) >= min_correlation:
                pairs.append((i, k))
    return pairs


def group_pairs(n: int, pairs: list[tuple[int, int]]) -> list[list[int]]:
    """Connected components (union-find) of size >= 2, each sorted."""
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for a, b in pairs:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    groups: dict[int, list[int]] = {}
    for i in range(n):
        groups.setdefault(find(i), []).append(i)
    return sorted((sorted(g) for g in groups.values() if len(g) > 1), key=lambda g: g[0])
