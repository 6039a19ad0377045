"""Synthetic Wright-Giemsa-like smear fields: the embedded default dataset.

Why synthetic: the demo and the tests must run on a fresh machine without any
patient data. The generator mimics the four Taleqani ALL classes closely
enough that a compact CNN has to read *morphology* to tell them apart:

- pale pink background, many biconcave red cells (pale centre), sometimes
  overlapping;
- one white cell per field (occasionally a second, smaller lymphocyte-like
  distractor), whose morphology depends on the class:

  ===============  ==========  ======  ===========  ===========  ============
  class            cell size   N:C     contour      chromatin    nucleoli
  ===============  ==========  ======  ===========  ===========  ============
  Benign           small       high    round        coarse dark  rarely
  Early Pre-B      medium      high    slightly irr fine         1-2
  Pre-B            medium-big  medium  irregular    fine         1-3
  Pro-B            big         lower   very irr.    fine, pale   2-4
  ===============  ==========  ======  ===========  ===========  ============

  The parameter ranges overlap on purpose, so a good model lands clearly
  below 100 %.
- stain hue and strength, illumination, focus and noise vary per image but are
  drawn from the SAME distribution for every class: colour carries no label
  information (unlike the real Taleqani set, where it nearly solves the task).

Deterministic: image ``k`` of class ``c`` depends only on ``(seed, c, k)``,
so the same seed gives the same bytes whatever ``n`` is. Vectorised numpy on
small crops keeps it well above 100 images/s at 224 px on one core.

Magnification (``magnification=M``, ``data synth --magnification M``): every
length in the field (cell sizes, their soft edges, chromatin texture, focus
blur, the margin cells may stick out by) is M times larger, the image size is
not, and there are 1/M^2 as many red cells: the field a microscope would show at
M times its magnification. The draws that size the cells come first and are the
same for every M, so image ``k`` at M=2 has red cells exactly twice as large as at
M=1 (its layout differs). M=1 gives exactly the bytes it always did. Red cells are
:data:`RBC_DIAMETER_FRACTION` of the image side across on average at M=1, so a field
has :func:`synthetic_um_per_px` um per pixel for 7.5 um red cells (224 px: ~0.30).
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from ..errors import DatasetError, UsageError
from ..files import atomic_write_bytes

#: (folder, file-name stem, canonical label), in the published Taleqani naming.
CLASSES = (
    ("Benign", "WBC-Benign", "Benign"),
    ("Early", "WBC-Malignant-Early", "Early Pre-B"),
    ("Pre", "WBC-Malignant-Pre", "Pre-B"),
    ("Pro", "WBC-Malignant-Pro", "Pro-B"),
)
JPEG_QUALITY = 92
#: Mean red-cell diameter / image side at magnification 1 (radii are drawn from 0.045-0.065 of the side).
RBC_DIAMETER_FRACTION = 0.11
#: Magnifications the generator accepts (cells of 0.25x .. 4x the default size).
MAGNIFICATION_RANGE = (0.25, 4.0)


def synthetic_um_per_px(size: int, magnification: float = 1.0, rbc_um: float = 7.5) -> float:
    """um per pixel of a generated field of ``size`` px, if its red cells are ``rbc_um`` across."""
    return rbc_um / (RBC_DIAMETER_FRACTION * size * magnification)


def check_magnification(magnification: float) -> float:
    """``magnification`` as a float in :data:`MAGNIFICATION_RANGE`, else UsageError."""
    try:
        m = float(magnification)
    except (TypeError, ValueError):
        raise UsageError(f"--magnification must be a number, got {magnification!r}") from None
    lo, hi = MAGNIFICATION_RANGE
    if not lo <= m <= hi:  # also false for NaN
        raise UsageError(f"--magnification must be between {lo:g} and {hi:g} (cells that many times the default "
                         f"size), got {magnification!r}")
    return m


@dataclass(frozen=True)
class WhiteCellStyle:
    """Class-dependent morphology ranges (uniform draws between lo and hi).

    Sizes are fractions of the image side; ``nc`` is nucleus radius over cell
    radius; ``irregular`` the amplitude of the contour's low-order harmonics;
    ``chromatin`` the texture scale (large = coarse clumps) and ``darkness`` the
    nuclear stain density.
    """

    radius: tuple[float, float]
    nc: tuple[float, float]
    irregular: tuple[float, float]
    chromatin: tuple[float, float]
    darkness: tuple[float, float]
    nucleoli: tuple[int, int]
    nucleolus_prob: float


STYLES = {
    "Benign": WhiteCellStyle((0.062, 0.087), (0.87, 0.96), (0.00, 0.04), (2.4, 3.6), (0.90, 1.00), (0, 1), 0.10),
    "Early Pre-B": WhiteCellStyle((0.088, 0.112), (0.79, 0.89), (0.04, 0.10), (1.0, 1.9), (0.74, 0.87), (1, 2), 0.85),
    "Pre-B": WhiteCellStyle((0.112, 0.135), (0.69, 0.79), (0.11, 0.19), (0.9, 1.7), (0.65, 0.78), (1, 3), 0.90),
    "Pro-B": WhiteCellStyle((0.134, 0.162), (0.55, 0.68), (0.20, 0.32), (0.8, 1.5), (0.55, 0.68), (2, 4), 0.95),
}


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], scale: float) -> np.ndarray:
    """Band-limited noise in [-1, 1]: coarse when ``scale`` is large."""
    h, w = shape
    ch, cw = max(2, int(h / scale)), max(2, int(w / scale))
    small = rng.standard_normal((ch, cw)).astype(np.float32)
    img = Image.fromarray(small, mode="F").resize((w, h), Image.Resampling.BICUBIC)
    arr = np.asarray(img, dtype=np.float32)
    return arr / (np.abs(arr).max() + 1e-6)


def _paint(canvas: np.ndarray, alpha: np.ndarray, colour: np.ndarray, y0: int, x0: int) -> None:
    """Alpha-blend ``colour`` (3,) or (h, w, 3) into canvas at (y0, x0), clipped."""
    h, w = alpha.shape
    H, W = canvas.shape[:2]
    ys, xs = max(0, y0), max(0, x0)
    ye, xe = min(H, y0 + h), min(W, x0 + w)
    if ye <= ys or xe <= xs:
        return
    a = alpha[ys - y0 : ye - y0, xs - x0 : xe - x0, None]
    c = colour if colour.ndim == 1 else colour[ys - y0 : ye - y0, xs - x0 : xe - x0]
    region = canvas[ys:ye, xs:xe]
    region -= a * (region - c)


def _stamp(canvas: np.ndarray, keep: np.ndarray, add: np.ndarray, y0: int, x0: int) -> None:
    """``_paint`` with ``keep = 1 - alpha`` (h, w, 1) and ``add = alpha * colour`` precomputed per sprite."""
    h, w = keep.shape[:2]
    H, W = canvas.shape[:2]
    ys, xs = max(0, y0), max(0, x0)
    ye, xe = min(H, y0 + h), min(W, x0 + w)
    if ye <= ys or xe <= xs:
        return
    region = canvas[ys:ye, xs:xe]
    region *= keep[ys - y0 : ye - y0, xs - x0 : xe - x0]
    region += add[ys - y0 : ye - y0, xs - x0 : xe - x0]


def _red_cells(canvas: np.ndarray, rng: np.random.Generator, stain: dict, magnification: float = 1.0) -> None:
    """18-33 biconcave discs (/ magnification^2), drawn from 4 per-field sprites (size/eccentricity variants)."""
    size = canvas.shape[0]
    m = magnification
    sprites = []
    for _ in range(4):
        r = size * rng.uniform(0.045, 0.065) * m
        ecc = rng.uniform(0.9, 1.1)
        half = int(r * 1.3) + 2
        ax = np.arange(-half, half + 1, dtype=np.float32)
        d = np.sqrt((ax[:, None] * ecc) ** 2 + (ax[None, :] / ecc) ** 2) / r
        body = np.clip((1.0 - d) * r / (1.2 * m), 0, 1) * 0.92  # soft edge over ~1 px (x magnification)
        pallor = (np.clip(1.0 - d / 0.55, 0, 1) * 0.55)[..., None]  # pale centre
        colour = (stain["rbc"] * (1 - pallor) + stain["background"] * pallor).astype(np.float32)
        sprites.append((half, (1.0 - body)[..., None], body[..., None] * colour))
    count = int(rng.integers(18, 34))
    if m != 1.0:
        count = max(1, round(count / (m * m)))
    choice = rng.integers(0, len(sprites), count)
    centres = rng.uniform(-0.07 * m, 1 + 0.07 * m, (count, 2)) * size
    for k, (cy, cx) in zip(choice, centres):
        half, keep, add = sprites[k]
        _stamp(canvas, keep, add, int(cy) - half, int(cx) - half)


def _contour_radius(rng: np.random.Generator, theta: np.ndarray, irregular: float) -> np.ndarray:
    """1 + low-order harmonics: round at 0, lobed / indented as it grows."""
    out = np.ones_like(theta)
    for k in (2, 3, 4, 5):
        out += irregular * rng.uniform(0.3, 1.0) / (k - 1) ** 0.5 * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    if irregular > 0.1 and rng.random() < 0.5:  # a cleft, as in cleaved nuclei
        phi = rng.uniform(0, 2 * np.pi)
        out -= irregular * 1.2 * np.exp(-(((theta - phi + np.pi) % (2 * np.pi) - np.pi) ** 2) / 0.05)
    return out


def _white_cell(canvas: np.ndarray, rng: np.random.Generator, style: WhiteCellStyle, stain: dict,
                centre: tuple[float, float], scale: float = 1.0, magnification: float = 1.0) -> None:
    size = canvas.shape[0]
    m = magnification
    R = size * rng.uniform(*style.radius) * scale * m
    nc = rng.uniform(*style.nc)
    irregular = rng.uniform(*style.irregular)
    half = int(R * 1.35) + 3
    yy, xx = np.mgrid[-half : half + 1, -half : half + 1].astype(np.float32)
    rho = np.sqrt(yy**2 + xx**2)
    theta = np.arctan2(yy, xx)
    # cytoplasm: nearly round, pale blue
    cell_edge = R * (1 + 0.04 * np.cos(2 * theta + rng.uniform(0, 6.3)))
    cyto = np.clip((cell_edge - rho) / m, 0, 1.2) / 1.2
    # nucleus: offset a little, irregular contour
    oy, ox = rng.uniform(-0.12, 0.12, 2) * R * (1 - nc) * 3
    ny, nx = yy - oy, xx - ox
    nrho = np.sqrt(ny**2 + nx**2)
    ntheta = np.arctan2(ny, nx)
    nuc_edge = R * nc * _contour_radius(rng, ntheta, irregular)
    nucleus = np.clip((nuc_edge - nrho) / m, 0, 1.2) / 1.2
    chromatin = _smooth_noise(rng, yy.shape, rng.uniform(*style.chromatin) * size / 224 * m)
    darkness = rng.uniform(*style.darkness)
    density = np.clip(darkness + 0.22 * chromatin, 0.35, 1.0)
    for _ in range(rng.integers(style.nucleoli[0], style.nucleoli[1] + 1) if rng.random() < style.nucleolus_prob else 0):
        ang, dist = rng.uniform(0, 2 * np.pi), rng.uniform(0, 0.55) * R * nc
        r_n = R * rng.uniform(0.07, 0.13)
        d = np.sqrt((ny - dist * np.sin(ang)) ** 2 + (nx - dist * np.cos(ang)) ** 2)
        density = density * (1 - 0.45 * np.clip(1 - d / r_n, 0, 1))
    nuc_colour = stain["background"] * (1 - density[..., None]) + stain["nucleus"] * density[..., None]
    y0, x0 = int(centre[0]) - half, int(centre[1]) - half
    _paint(canvas, cyto * 0.95, stain["cytoplasm"], y0, x0)
    _paint(canvas, nucleus, nuc_colour, y0, x0)


def _stain(rng: np.random.Generator) -> dict:
    """One slide's colours; the same distribution for every class (no colour shortcut)."""
    tint = rng.normal(0, 6, 3)
    return {
        "background": np.clip(np.array([236, 220, 224]) + tint + rng.normal(0, 4, 3), 0, 255),
        "rbc": np.clip(np.array([214, 142, 152]) + tint + rng.normal(0, 8, 3), 0, 255),
        "cytoplasm": np.clip(np.array([176, 182, 222]) + tint + rng.normal(0, 8, 3), 0, 255),
        "nucleus": np.clip(np.array([88, 48, 132]) + tint + rng.normal(0, 10, 3), 0, 255),
    }


def render_field(label: str, rng: np.random.Generator, size: int = 224, magnification: float = 1.0) -> np.ndarray:
    """One synthetic smear field of class ``label`` as uint8 HxWx3, cells ``magnification`` x the default size."""
    if label not in STYLES:
        raise UsageError(f"unknown synthetic class {label!r}; use one of {sorted(STYLES)}")
    m = check_magnification(magnification)
    stain = _stain(rng)
    canvas = np.empty((size, size, 3), np.float32)
    canvas[:] = stain["background"]
    _red_cells(canvas, rng, stain, m)
    if rng.random() < 0.2:  # a small mature lymphocyte as a distractor, any class
        pos = rng.uniform(0.15, 0.85, 2) * size
        _white_cell(canvas, rng, STYLES["Benign"], stain, (pos[0], pos[1]), scale=0.75, magnification=m)
    centre = size / 2 + rng.uniform(-0.12, 0.12, 2) * size
    _white_cell(canvas, rng, STYLES[label], stain, (centre[0], centre[1]), magnification=m)
    # illumination: brightness and a smooth vignette/gradient
    axis = np.arange(size, dtype=np.float32) / size - 0.5
    yy, xx = axis[:, None], axis[None, :]
    gy, gx = (np.float32(v) for v in rng.normal(0, 0.06, 2))
    gain, vignette = np.float32(rng.uniform(0.9, 1.06)), np.float32(rng.uniform(0, 0.12))
    # gain * (1 + gy*y + gx*x - vignette*(y^2 + x^2)), built from one row and one column
    light = gain * (1 + gy * yy - vignette * yy**2) + gain * (gx * xx - vignette * xx**2)
    # sensor noise, mostly luminance (as in a colour camera after demosaicing)
    noise = rng.standard_normal((size, size), dtype=np.float32)
    noise *= np.float32(rng.uniform(1.5, 5.0))
    canvas *= light[..., None]
    canvas += noise[..., None]
    np.clip(canvas, 0, 255, out=canvas)
    img = Image.fromarray(canvas.astype(np.uint8), mode="RGB")
    blur = rng.uniform(-0.4, 1.1) * size / 224 * m  # about a quarter of the fields are in sharp focus
    if blur > 0.15 * m:
        # one box pass of radius 1.2*sigma has about the spread of a Gaussian of sigma (and a
        # third of its cost, which keeps the generator above 100 images/s on one core)
        img = img.filter(ImageFilter.BoxBlur(1.2 * blur))
    return np.asarray(img)


def encode_jpeg(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb, mode="RGB").save(buf, format="JPEG", quality=JPEG_QUALITY, optimize=False)
    return buf.getvalue()


def class_counts(n: int) -> list[int]:
    """n split evenly over the four classes (the first ones take the remainder)."""
    return [n // len(CLASSES) + (1 if i < n % len(CLASSES) else 0) for i in range(len(CLASSES))]


def generate(out_dir: str | Path, n: int, size: int = 224, seed: int = 0, *, progress: bool = False,
             magnification: float = 1.0) -> list[Path]:
    """Write ``n`` fields in the Taleqani layout ``Original/<Class>/WBC-...-NNN.jpg``.

    ``magnification``: cells that many times the default size (see the module
    docstring); the fields then have :func:`synthetic_um_per_px` um per pixel.

    Files are numbered 1..n_c per class in "capture order". Returns the paths.
    Re-running with the same arguments rewrites the same bytes; a folder that
    already holds other synthetic images (e.g. from a larger ``n``) is refused
    with :class:`DatasetError` rather than silently mixed.
    """
    if n < len(CLASSES):
        raise UsageError(f"--n must be at least {len(CLASSES)} (one image per class), got {n}")
    if not 32 <= size <= 1024:
        raise UsageError(f"--size must be between 32 and 1024 px, got {size}")
    magnification = check_magnification(magnification)
    root = Path(out_dir) / "Original"
    jobs = []
    for c, ((folder, stem, label), count) in enumerate(zip(CLASSES, class_counts(n))):
        (root / folder).mkdir(parents=True, exist_ok=True)
        jobs += [(c, k, label, root / folder / f"{stem}-{k:03d}.jpg") for k in range(1, count + 1)]
    planned = {job[3] for job in jobs}
    stale = sorted(p for folder, _stem, _label in CLASSES for p in (root / folder).glob("*.jpg") if p not in planned)
    if stale:
        raise DatasetError(
            f"{out_dir}: already holds {len(stale)} image(s) this run would not write (e.g. {stale[0].name}); "
            "mixing them in would make a dataset no seed reproduces",
            hint="generate into an empty folder, or delete the old one first",
        )
    iterator = jobs
    if progress:
        from tqdm import tqdm

        iterator = tqdm(jobs, desc="synthesising", unit="img")
    paths = []
    for c, k, label, path in iterator:
        rng = np.random.default_rng([seed, c, k])
        # No fsync: a synthetic set is regenerated from its seed, never the only copy of anything.
        atomic_write_bytes(path, encode_jpeg(render_field(label, rng, size, magnification)), fsync=False)
        paths.append(path)
    return paths
