"""Stain and colour operations on uint8 RGB images: deconvolution, augmentation, normalisation.

Why this module exists: on the Taleqani set a model can score ~99 % by reading
the stain batch and the capture (background tint, brightness) instead of the
cells (issue 7). These functions let training *augment* colour away (HED
jitter, grayscale), let the ONE preprocessing path *normalise* colour to a fixed
reference (Reinhard, Macenko; numpy only, so the device does exactly the same),
and let the shortcut audit *perturb* colour while keeping morphology.

Conventions (every public function):

- input is a uint8 ``HxWx3`` RGB array (anything else raises
  :class:`~leukoedge.errors.InvalidImageError`), output is a new uint8 array of
  the same shape; the input is never modified;
- randomness only through an explicit ``numpy.random.Generator`` argument, so a
  seeded generator gives bit-identical output (and ``tf.numpy_function`` can
  call these with a per-element seed);
- no NaN or inf for any input, including blank white or black frames.

Optical density (OD) is ``-ln((I + 1) / 256)`` per channel: the +1 keeps black
pixels finite and maps every uint8 value to a distinct OD, so
``od_to_rgb(rgb_to_od(x)) == x`` exactly.

Reference values (all documented at their definition):

- HED matrix: Ruifrok & Johnston (2001), the values used by
  ``skimage.color.rgb2hed``. Wright-Giemsa is not H&E, but its azure/methylene
  blue (nuclei) and eosin (cytoplasm, red cells) separate along similar axes, and
  jitter in this space produces plausible stain-batch variation.
- Reinhard / Macenko / per-image targets: measured on the team's Taleqani ALL
  images (every 40th file of each class, all four classes pooled, 68 images) with
  :func:`fit_reinhard_target` / :func:`fit_macenko_target` / channel statistics.
  Pooling the classes matters: a target from one class would re-plant the colour
  shortcut. Training may fit its own target on its training split and store it in
  the bundle via ``to_dict``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
from PIL import Image, ImageFilter

from .errors import InvalidImageError, UsageError

# --- colour deconvolution ---------------------------------------------------------------

#: Rows: OD colour of haematoxylin, eosin and DAB (Ruifrok & Johnston 2001; as in skimage).
RGB_FROM_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
#: Its inverse: ``hed = od @ HED_FROM_RGB``.
HED_FROM_RGB = np.linalg.inv(RGB_FROM_HED)


def check_rgb(rgb: np.ndarray, what: str = "image") -> np.ndarray:
    """Return ``rgb`` as an ndarray if it is uint8 HxWx3, else raise InvalidImageError."""
    arr = np.asarray(rgb)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise InvalidImageError(f"{what}: expected a uint8 HxWx3 RGB array, got {arr.dtype} {arr.shape}")
    return arr


def _check_rng(rng: np.random.Generator) -> None:
    if not isinstance(rng, np.random.Generator):
        raise UsageError(f"expected a numpy.random.Generator (np.random.default_rng(seed)), got {type(rng).__name__}")


def _to_uint8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(np.nan_to_num(x, nan=0.0, posinf=255.0, neginf=0.0)), 0, 255).astype(np.uint8)


def rgb_to_od(rgb: np.ndarray) -> np.ndarray:
    """Optical density ``-ln((I + 1) / 256)``, float64 HxWx3, in [0, ln 256]."""
    return -np.log((check_rgb(rgb).astype(np.float64) + 1.0) / 256.0)


def od_to_rgb(od: np.ndarray) -> np.ndarray:
    """Inverse of :func:`rgb_to_od`, rounded and clipped to uint8."""
    return _to_uint8(256.0 * np.exp(-np.asarray(od, dtype=np.float64)) - 1.0)


def rgb_to_hed(rgb: np.ndarray) -> np.ndarray:
    """Stain concentrations (haematoxylin, eosin, DAB) in OD units, float64 HxWx3.

    Not clipped at zero (unlike skimage), so :func:`hed_to_rgb` inverts it exactly.
    """
    return rgb_to_od(rgb) @ HED_FROM_RGB


def hed_to_rgb(hed: np.ndarray) -> np.ndarray:
    """Recombine stain concentrations into a uint8 RGB image."""
    return od_to_rgb(np.asarray(hed, dtype=np.float64) @ RGB_FROM_HED)


def hed_jitter(rgb: np.ndarray, rng: np.random.Generator, sigma: float = 0.05, bias: float = 0.05) -> np.ndarray:
    """Random stain variation (Tellez et al. 2018): ``c' = c * U(1-sigma, 1+sigma) + U(-bias, bias)``.

    One scale and one shift per stain channel, per image (a stain batch changes a
    whole slide, not single pixels). ``sigma=bias=0.05`` is Tellez's "light"
    setting, 0.2 is "strong". ``bias`` is in natural-log OD units. Raises
    UsageError for negative or absurd (>= 1) strengths.
    """
    _check_rng(rng)
    if not (0.0 <= sigma < 1.0) or not (0.0 <= bias < 1.0):
        raise UsageError(f"HED jitter strengths must be in [0, 1), got sigma={sigma}, bias={bias}")
    hed = rgb_to_hed(rgb)
    alpha = rng.uniform(1.0 - sigma, 1.0 + sigma, size=3)
    beta = rng.uniform(-bias, bias, size=3)
    return hed_to_rgb(hed * alpha + beta)


# --- simple colour operations --------------------------------------------------------------

#: ITU-R BT.601 luma weights, the same as Pillow's ``convert("L")``.
LUMA = np.array([0.299, 0.587, 0.114])


def grayscale(rgb: np.ndarray) -> np.ndarray:
    """BT.601 luma replicated to three channels (the model keeps its RGB input shape)."""
    y = _to_uint8(check_rgb(rgb).astype(np.float64) @ LUMA)
    return np.repeat(y[:, :, None], 3, axis=2)


def adjust_brightness(rgb: np.ndarray, factor: float) -> np.ndarray:
    """Multiply every channel by ``factor`` (lamp brightness / exposure change)."""
    if not (0.0 < factor < 10.0):
        raise UsageError(f"brightness factor must be in (0, 10), got {factor}")
    return _to_uint8(check_rgb(rgb).astype(np.float64) * factor)


def white_balance(rgb: np.ndarray, gains: Sequence[float]) -> np.ndarray:
    """Multiply channels by per-channel ``gains`` (R, G, B): a camera white-balance change."""
    g = np.asarray(gains, dtype=np.float64)
    if g.shape != (3,) or not np.all((g > 0) & (g < 10)):
        raise UsageError(f"white-balance gains must be three numbers in (0, 10), got {gains!r}")
    return _to_uint8(check_rgb(rgb).astype(np.float64) * g)


def gaussian_blur(rgb: np.ndarray, radius: float) -> np.ndarray:
    """Pillow Gaussian blur with standard deviation ``radius`` pixels (a defocused objective)."""
    if not (0.0 <= radius <= 50.0):
        raise UsageError(f"blur radius must be in [0, 50] pixels, got {radius}")
    img = Image.fromarray(check_rgb(rgb), mode="RGB")
    return np.asarray(img.filter(ImageFilter.GaussianBlur(radius)), dtype=np.uint8)


#: Per-channel mean / std of the Taleqani sample (see module docstring), rounded.
#: Normalising to these keeps images looking like smears while removing each
#: image's own tint and contrast.
COLOUR_MEAN = (213.0, 220.0, 239.0)
COLOUR_STD = (33.0, 36.0, 13.0)


def per_image_colour_normalize(
    rgb: np.ndarray, mean: Sequence[float] = COLOUR_MEAN, std: Sequence[float] = COLOUR_STD
) -> np.ndarray:
    """Map each channel to a fixed mean and standard deviation (the audit's colour-removal test).

    A flat channel (std < 1e-6, e.g. a blank frame) is only shifted to the target
    mean, never divided by zero.
    """
    m, s = np.asarray(mean, dtype=np.float64), np.asarray(std, dtype=np.float64)
    if m.shape != (3,) or s.shape != (3,) or np.any(s < 0):
        raise UsageError("mean and std must be three numbers each (std >= 0)")
    x = check_rgb(rgb).astype(np.float64)
    mu, sd = x.mean(axis=(0, 1)), x.std(axis=(0, 1))
    scale = np.where(sd > 1e-6, s / np.maximum(sd, 1e-6), 1.0)
    return _to_uint8((x - mu) * scale + m)


# --- CIELAB (sRGB, D65) ------------------------------------------------------------------

_XYZ_FROM_RGB = np.array(
    [[0.4124564, 0.3575761, 0.1804375], [0.2126729, 0.7151522, 0.0721750], [0.0193339, 0.1191920, 0.9503041]]
)
_RGB_FROM_XYZ = np.linalg.inv(_XYZ_FROM_RGB)
_D65 = np.array([0.95047, 1.0, 1.08883])
_EPS = (6.0 / 29.0) ** 3


def rgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """uint8 sRGB to CIELAB (D65), float64 HxWx3: L in [0, 100], a/b roughly [-128, 127]."""
    c = check_rgb(rgb).astype(np.float64) / 255.0
    lin = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    t = (lin @ _XYZ_FROM_RGB.T) / _D65
    f = np.where(t > _EPS, np.cbrt(t), t / (3 * (6.0 / 29.0) ** 2) + 4.0 / 29.0)
    return np.stack([116.0 * f[..., 1] - 16.0, 500.0 * (f[..., 0] - f[..., 1]), 200.0 * (f[..., 1] - f[..., 2])], -1)


def lab_to_rgb(lab: np.ndarray) -> np.ndarray:
    """CIELAB (D65) to uint8 sRGB; out-of-gamut colours are clipped."""
    lab = np.asarray(lab, dtype=np.float64)
    fy = (lab[..., 0] + 16.0) / 116.0
    f = np.stack([fy + lab[..., 1] / 500.0, fy, fy - lab[..., 2] / 200.0], -1)
    t = np.where(f > 6.0 / 29.0, f**3, 3 * (6.0 / 29.0) ** 2 * (f - 4.0 / 29.0))
    lin = np.clip((t * _D65) @ _RGB_FROM_XYZ.T, 0.0, 1.0)
    c = np.where(lin <= 0.0031308, 12.92 * lin, 1.055 * lin ** (1 / 2.4) - 0.055)
    return _to_uint8(c * 255.0)


# --- Reinhard ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReinhardTarget:
    """Reference LAB statistics: each image's L, a, b channels are mapped to these mean/std."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def __post_init__(self) -> None:
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise UsageError(f"Reinhard target needs three means and three positive stds, got {self}")
        if not all(np.isfinite(v) for v in (*self.mean, *self.std)):
            raise UsageError("Reinhard target values must be finite")

    def to_dict(self) -> dict:
        return {"mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, d: dict) -> "ReinhardTarget":
        try:
            return cls(mean=tuple(float(v) for v in d["mean"]), std=tuple(float(v) for v in d["std"]))
        except (KeyError, TypeError, ValueError) as err:
            raise UsageError(f"malformed Reinhard target {d!r} ({err})") from None


#: Taleqani sample (see module docstring), classes pooled, via fit_reinhard_target.
DEFAULT_REINHARD_TARGET = ReinhardTarget(mean=(87.68, 2.03, -10.28), std=(11.56, 9.99, 14.53))


def _lab_stats(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    lab = rgb_to_lab(rgb).reshape(-1, 3)
    return lab.mean(axis=0), lab.std(axis=0)


def fit_reinhard_target(images: Iterable[np.ndarray]) -> ReinhardTarget:
    """Average per-image LAB mean and std over ``images`` (e.g. a training split)."""
    stats = [_lab_stats(im) for im in images]
    if not stats:
        raise UsageError("fit_reinhard_target needs at least one image")
    means = np.mean([m for m, _ in stats], axis=0)
    stds = np.maximum(np.mean([s for _, s in stats], axis=0), 1e-3)
    return ReinhardTarget(mean=tuple(float(v) for v in means), std=tuple(float(v) for v in stds))


def reinhard_normalize(rgb: np.ndarray, target: ReinhardTarget = DEFAULT_REINHARD_TARGET) -> np.ndarray:
    """Reinhard et al. (2001) colour transfer in CIELAB: per-channel mean/std to ``target``.

    A flat channel (blank frame) is only shifted to the target mean.
    """
    lab = rgb_to_lab(rgb)
    mu, sd = lab.reshape(-1, 3).mean(axis=0), lab.reshape(-1, 3).std(axis=0)
    tm, ts = np.asarray(target.mean), np.asarray(target.std)
    scale = np.where(sd > 1e-6, ts / np.maximum(sd, 1e-6), 1.0)
    return lab_to_rgb((lab - mu) * scale + tm)


# --- Macenko ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class MacenkoTarget:
    """Reference stain matrix (3x2, unit OD columns: stain 1 = nuclear, stain 2 = eosin)
    and the 99th-percentile concentration of each stain."""

    stain_matrix: tuple[tuple[float, float], tuple[float, float], tuple[float, float]]
    max_concentrations: tuple[float, float]

    def __post_init__(self) -> None:
        m = np.asarray(self.stain_matrix, dtype=np.float64)
        c = np.asarray(self.max_concentrations, dtype=np.float64)
        if m.shape != (3, 2) or c.shape != (2,) or not np.all(np.isfinite(m)) or not np.all(c > 0):
            raise UsageError("Macenko target needs a finite 3x2 stain matrix and two positive max concentrations")
        if np.linalg.matrix_rank(m) < 2:
            raise UsageError("Macenko target stain vectors must not be parallel")

    @property
    def matrix(self) -> np.ndarray:
        return np.asarray(self.stain_matrix, dtype=np.float64)

    def to_dict(self) -> dict:
        return {"stain_matrix": [list(r) for r in self.stain_matrix], "max_concentrations": list(self.max_concentrations)}

    @classmethod
    def from_dict(cls, d: dict) -> "MacenkoTarget":
        try:
            m = tuple(tuple(float(v) for v in row) for row in d["stain_matrix"])
            return cls(stain_matrix=m, max_concentrations=tuple(float(v) for v in d["max_concentrations"]))
        except (KeyError, TypeError, ValueError) as err:
            raise UsageError(f"malformed Macenko target {d!r} ({err})") from None


#: Taleqani sample (see module docstring), classes pooled, via fit_macenko_target.
#: On Wright-Giemsa the first vector is the violet nuclear stain; the second comes
#: out close to neutral density (pale cytoplasm and erythrocytes), so Macenko's
#: two-stain model is an approximation here, good enough to fix batch-level colour.
DEFAULT_MACENKO_TARGET = MacenkoTarget(
    stain_matrix=((0.7226, 0.5678), (0.6723, 0.5881), (0.1605, 0.5760)), max_concentrations=(1.1320, 0.2796)
)

#: Pixels whose OD is below this in any channel count as background (Macenko et al. 2009).
MACENKO_BETA = 0.15
#: Robust extreme angles: the alpha-th and (100-alpha)-th percentiles.
MACENKO_ALPHA = 1.0
#: Fewer stained pixels than this and the image is returned unchanged (blank field).
MACENKO_MIN_PIXELS = 64


def _macenko_from_od(od: np.ndarray, beta: float, alpha: float) -> np.ndarray | None:
    """Stain matrix (3x2) from an (N, 3) OD array, or None if the pixels cannot define two stains."""
    tissue = od[np.all(od > beta, axis=1)]
    if tissue.shape[0] < MACENKO_MIN_PIXELS:
        return None
    # The two leading eigenvectors of the OD covariance span the stain plane.
    _, vecs = np.linalg.eigh(np.cov(tissue, rowvar=False))
    plane = vecs[:, [2, 1]]
    plane *= np.where(plane.sum(axis=0) < 0, -1.0, 1.0)  # OD vectors are positive; fix the eigenvector sign
    proj = tissue @ plane
    phi = np.arctan2(proj[:, 1], proj[:, 0])
    lo, hi = np.percentile(phi, [alpha, 100.0 - alpha])
    if hi - lo < 1e-3:  # one colour only: no second stain to separate
        return None
    v1 = plane @ np.array([np.cos(lo), np.sin(lo)])
    v2 = plane @ np.array([np.cos(hi), np.sin(hi)])
    # Nuclear stain first: it absorbs more red than eosin does (Macenko's heuristic).
    stains = np.stack([v1, v2], axis=1) if v1[0] > v2[0] else np.stack([v2, v1], axis=1)
    stains /= np.linalg.norm(stains, axis=0, keepdims=True)
    if np.linalg.cond(stains) > 1e6:
        return None
    return stains


def macenko_stains(
    rgb: np.ndarray, beta: float = MACENKO_BETA, alpha: float = MACENKO_ALPHA
) -> tuple[np.ndarray, np.ndarray] | None:
    """Estimate (stain matrix 3x2, 99th-percentile concentrations (2,)) of one image, or None if blank."""
    od = rgb_to_od(rgb).reshape(-1, 3)
    stains = _macenko_from_od(od, beta, alpha)
    if stains is None:
        return None
    conc = np.linalg.lstsq(stains, od.T, rcond=None)[0]
    return stains, np.percentile(conc, 99, axis=1)


def fit_macenko_target(
    images: Iterable[np.ndarray], beta: float = MACENKO_BETA, alpha: float = MACENKO_ALPHA, max_pixels: int = 200_000
) -> MacenkoTarget:
    """One stain matrix from the pooled pixels of ``images`` and the median per-image max concentration.

    Pixels are subsampled with a fixed stride to at most ``max_pixels`` (deterministic).
    Raises UsageError if the images hold no stained pixels.
    """
    ods = [rgb_to_od(im).reshape(-1, 3) for im in images]
    if not ods:
        raise UsageError("fit_macenko_target needs at least one image")
    od = np.concatenate(ods)
    od = od[:: max(1, od.shape[0] // max_pixels)]
    stains = _macenko_from_od(od, beta, alpha)
    if stains is None:
        raise UsageError("the images have too few stained pixels to estimate a stain matrix")
    maxc = np.median([np.percentile(np.linalg.lstsq(stains, o.T, rcond=None)[0], 99, axis=1) for o in ods], axis=0)
    maxc = np.maximum(maxc, 1e-3)
    return MacenkoTarget(
        stain_matrix=tuple(tuple(float(v) for v in row) for row in stains),
        max_concentrations=tuple(float(v) for v in maxc),
    )


def macenko_normalize(
    rgb: np.ndarray,
    target: MacenkoTarget = DEFAULT_MACENKO_TARGET,
    beta: float = MACENKO_BETA,
    alpha: float = MACENKO_ALPHA,
) -> np.ndarray:
    """Macenko et al. (2009) stain normalisation to a fixed reference stain matrix.

    Steps: OD; the stain plane from the SVD (eigenvectors of the OD covariance) of
    stained pixels; robust extreme angles (``alpha`` percentiles) give the image's
    two stain vectors; concentrations by least squares; each stain's 99th
    percentile is scaled to the target's; recombined with the target matrix.

    An image with fewer than ``MACENKO_MIN_PIXELS`` stained pixels, or with only
    one colour (a blank white or black frame), has no stains to estimate and is
    returned unchanged (a copy) instead of producing NaNs.
    """
    arr = check_rgb(rgb)
    od = rgb_to_od(arr).reshape(-1, 3)
    stains = _macenko_from_od(od, beta, alpha)
    if stains is None:
        return arr.copy()
    conc = np.linalg.lstsq(stains, od.T, rcond=None)[0]
    maxc = np.maximum(np.percentile(conc, 99, axis=1), 1e-6)
    conc *= (np.asarray(target.max_concentrations) / maxc)[:, None]
    out_od = (target.matrix @ conc).T.reshape(arr.shape)
    return od_to_rgb(out_od)
