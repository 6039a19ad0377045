"""The division spacing of a stage micrometer, in pixels, from one image of its ruling.

A stage micrometer is a slide with a ruling of parallel lines a known distance
apart (usually 10 um: 1 mm in 100 divisions). Imaged through the objective and
camera adapter the station uses, spacing in pixels / division length in um
gives the station's um/px, the most direct calibration there is (issue 15).

How (numpy only; about half a second for a 1014x760 image or a 12 MP frame, which is reduced first):

1. Grey levels, box-reduced to at most :data:`MAX_WORK_SIDE` px; a quadratic
   surface is subtracted so uneven illumination (vignetting) leaves no
   low-frequency peak.
2. The 2-D power spectrum (Hann window) of parallel lines has its strongest
   peak at the frequency vector perpendicular to them, 1/spacing long: its
   position gives the ruling's orientation and a first spacing. The peak is
   moved to half or a third of its frequency when that holds comparable power,
   so the second harmonic of thin lines is never taken for the division.
3. Refinement along the lines' normal: pixels are projected onto it (0.5 px
   bins) for angles around the first estimate, and the angle whose profile has
   the strongest periodic component wins (a rotation of a few degrees is
   found, not assumed away). The spacing is the peak of that profile's
   zero-padded spectrum, interpolated: well under 0.5 % error once about ten
   divisions are in view.
4. Checks, each a :class:`~leukoedge.errors.ScaleError` with a message for the
   user: a blank image, a spectrum without a clear peak (no ruling), a
   profile that is not regular (the profile one spacing away must agree with
   itself far better than half a spacing away), too few divisions in view,
   lines too close to resolve.

Longer ticks every 5th or 10th division and the printed numbers do not
disturb it: they add weaker components at 1/5 or 1/10 of the division
frequency, below the fundamental's power.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from ..errors import ScaleError

#: Longest side the spectrum is computed at (a 12 MP frame is box-reduced first).
MAX_WORK_SIDE = 1024
#: Closest line spacing resolved at the working size (below this the image is measured unreduced).
MIN_PERIOD_PX = 4.0
#: Fewest divisions that must be in view along the lines' normal.
MIN_DIVISIONS = 4.0
#: Least spectral peak over the median of its frequency ring: rulings give hundreds, smears ~10.
MIN_PROMINENCE = 40.0
#: Least regularity (correlation one spacing away minus half a spacing away, halved).
MIN_REGULARITY = 0.25
_BIN_PX = 0.5
_HINT = ("image the micrometer's ruling in focus, with at least 5 divisions across the field "
         "and the lines crossing the whole view")


@dataclass(frozen=True)
class RulingMeasurement:
    """What :func:`measure_ruling` saw.

    Attributes:
        period_px: spacing of neighbouring lines in pixels of the array measured.
        angle_deg: direction of the lines, degrees from the image's x axis
            (0 = horizontal lines, 90 = vertical), in (-90, 90].
        divisions: how many divisions the ruling spans along its normal in view.
        regularity: 0..1, how periodic the profile across the lines is (about
            0.5 for thin lines, 1 for a sinusoid, near 0 for anything else).
        prominence: the spectral peak over the median power at its frequency.
    """

    period_px: float
    angle_deg: float
    divisions: float
    regularity: float
    prominence: float

    def to_dict(self) -> dict:
        return {k: round(float(v), 6) for k, v in asdict(self).items()}


def measure_ruling(rgb: np.ndarray) -> RulingMeasurement:
    """The line spacing of a micrometer ruling in ``rgb`` (uint8 HxWx3 or HxW); raises ScaleError."""
    gray = _gray(rgb)
    h, w = gray.shape
    if min(h, w) < 32:
        raise ScaleError(f"the image is too small ({w}x{h} px) to measure a ruling", hint=_HINT)
    factor = max(1, math.ceil(max(h, w) / MAX_WORK_SIDE))
    result = _measure(_reduce(gray, factor))
    if factor > 1 and result is not None and result.period_px < 2 * MIN_PERIOD_PX:
        # Fine lines: measure a full-resolution crop rather than lose them to the reduction.
        cy, cx, half = h // 2, w // 2, MAX_WORK_SIDE // 2
        crop = gray[max(0, cy - half):cy + half, max(0, cx - half):cx + half]
        return _checked(_measure(crop), 1)
    return _checked(result, factor)


def _checked(result: "RulingMeasurement | _Failure", factor: int) -> RulingMeasurement:
    if isinstance(result, _Failure):
        raise ScaleError(result.message, hint=_HINT)
    return RulingMeasurement(period_px=result.period_px * factor, angle_deg=result.angle_deg,
                             divisions=result.divisions, regularity=result.regularity,
                             prominence=result.prominence)


@dataclass(frozen=True)
class _Failure:
    message: str
    period_px: float = math.inf  # never "fine lines": no full-resolution retry


def _gray(rgb: np.ndarray) -> np.ndarray:
    arr = np.asarray(rgb)
    if arr.ndim == 3 and arr.shape[2] in (3, 4):
        return arr[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    if arr.ndim == 2:
        return arr.astype(np.float32)
    raise ScaleError(f"expected an RGB or grey image, got an array of shape {arr.shape}")


def _reduce(gray: np.ndarray, factor: int) -> np.ndarray:
    """Box reduction by a whole factor: spacings shrink exactly by ``factor``."""
    if factor == 1:
        return gray
    h, w = (gray.shape[0] // factor) * factor, (gray.shape[1] // factor) * factor
    return gray[:h, :w].reshape(h // factor, factor, w // factor, factor).mean(axis=(1, 3))


def _flatten(gray: np.ndarray) -> np.ndarray:
    """``gray`` minus its least-squares quadratic surface (fitted on a subsample: cheap)."""
    h, w = gray.shape
    yy, xx = np.mgrid[0:h:4, 0:w:4].astype(np.float32)
    sub = gray[::4, ::4]

    def design(y, x):
        y, x = y / h - 0.5, x / w - 0.5
        return np.stack([np.ones_like(x), x, y, x * x, y * y, x * y], axis=-1)

    coef, *_ = np.linalg.lstsq(design(yy, xx).reshape(-1, 6), sub.reshape(-1), rcond=None)
    fy, fx = np.mgrid[0:h, 0:w].astype(np.float32)
    return gray - design(fy, fx) @ coef.astype(np.float32)


def _measure(gray: np.ndarray) -> "RulingMeasurement | _Failure":
    h, w = gray.shape
    resid = _flatten(gray)
    if float(resid.std()) < 1.0:
        return _Failure("the image has no contrast (blank, or the lamp is off): no ruling to measure")
    spectrum = np.abs(np.fft.rfft2(resid * np.outer(np.hanning(h), np.hanning(w)).astype(np.float32))) ** 2
    fy = np.fft.fftfreq(h)[:, None]
    fx = np.fft.rfftfreq(w)[None, :]
    radius = np.hypot(fx, fy)
    f_lo = MIN_DIVISIONS / min(h, w)
    band = (radius >= f_lo) & (radius <= 1.0 / MIN_PERIOD_PX)
    masked = np.where(band, spectrum, 0.0)
    iy, ix = np.unravel_index(int(np.argmax(masked)), masked.shape)
    vy, vx = float(fy[iy, 0]), float(fx[0, ix])
    vy, vx = _fundamental(masked, fy[:, 0], fx[0], vy, vx, f_lo)
    f0 = math.hypot(vx, vy)
    ring = spectrum[(radius >= 0.8 * f0) & (radius <= 1.25 * f0)]
    peak = _power_near(masked, fy[:, 0], fx[0], vy, vx)
    prominence = peak / max(float(np.median(ring)), 1e-12)
    if prominence < MIN_PROMINENCE:
        return _Failure(f"no stage micrometer ruling found: the image has no regular pattern of parallel lines "
                        f"(strongest periodic component {prominence:.0f}x its surroundings; a ruling gives "
                        f"over {MIN_PROMINENCE:.0f}x)")
    theta = math.atan2(vy, vx)  # direction of the lines' normal
    theta, freq, profile = _refine(resid, theta, f0)
    if not freq > 0:
        return _Failure("no stage micrometer ruling found: no line spacing could be measured")
    period = 1.0 / freq
    divisions = len(profile) * _BIN_PX / period
    regularity = _regularity(profile, period / _BIN_PX)
    if regularity < MIN_REGULARITY:
        return _Failure(f"no stage micrometer ruling found: the profile across the strongest lines is not "
                        f"regular (regularity {regularity:.2f}, a ruling gives over {MIN_REGULARITY})")
    if divisions < MIN_DIVISIONS:
        return _Failure(f"only {divisions:.1f} divisions of the ruling are in view; at least "
                        f"{MIN_DIVISIONS:.0f} are needed")
    angle = math.degrees(theta) + 90.0  # lines run perpendicular to their normal
    angle = (angle + 90.0) % 180.0 - 90.0
    if angle <= -90.0:
        angle += 180.0
    return RulingMeasurement(period_px=period, angle_deg=angle, divisions=divisions,
                             regularity=regularity, prominence=prominence)


def _power_near(spectrum: np.ndarray, fy: np.ndarray, fx: np.ndarray, vy: float, vx: float) -> float:
    """Largest power within one bin of the frequency (vy, vx) (vx >= 0: the rfft half-plane)."""
    if vx < 0:
        vy, vx = -vy, -vx
    iy = int(round(vy / fy[1])) % len(fy)  # fy[1] = 1/h, fx[1] = 1/w
    ix = int(round(vx / fx[1]))
    best = 0.0
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            jx = ix + dx
            if 0 <= jx < len(fx):
                best = max(best, float(spectrum[(iy + dy) % len(fy), jx]))
    return best


def _fundamental(spectrum, fy, fx, vy: float, vx: float, f_lo: float) -> tuple[float, float]:
    """Step down from a harmonic: a peak at 1/2 or 1/3 of the frequency with comparable power is the division."""
    for _ in range(4):
        here = _power_near(spectrum, fy, fx, vy, vx)
        for div in (2, 3):
            if math.hypot(vx, vy) / div < f_lo:
                continue
            if _power_near(spectrum, fy, fx, vy / div, vx / div) >= 0.25 * here:
                vy, vx = vy / div, vx / div
                break
        else:
            return vy, vx
    return vy, vx


def _profile(resid: np.ndarray, theta: float) -> np.ndarray:
    """Mean grey level per 0.5 px bin along the unit vector at ``theta``; sparse end bins trimmed."""
    h, w = resid.shape
    tx = np.arange(w, dtype=np.float32) * np.float32(math.cos(theta) / _BIN_PX)
    ty = np.arange(h, dtype=np.float32) * np.float32(math.sin(theta) / _BIN_PX)
    t = ty[:, None] + tx[None, :]
    idx = (t - t.min()).astype(np.int64).ravel()
    counts = np.bincount(idx)
    sums = np.bincount(idx, weights=resid.ravel())
    keep = np.flatnonzero(counts >= 0.2 * counts.max())
    lo, hi = keep[0], keep[-1] + 1
    return sums[lo:hi] / np.maximum(counts[lo:hi], 1)


def _spectral_peak(profile: np.ndarray, f_guess: float) -> tuple[float, float]:
    """(frequency in cycles/px, magnitude) of the profile's strongest component within 15 % of ``f_guess``."""
    x = (profile - profile.mean()) * np.hanning(len(profile))
    n_fft = 1 << int(math.ceil(math.log2(len(x) * 16)))
    mag = np.abs(np.fft.rfft(x, n_fft))
    freqs = np.fft.rfftfreq(n_fft, d=_BIN_PX)
    lo, hi = np.searchsorted(freqs, [0.85 * f_guess, 1.15 * f_guess])
    hi = max(hi, lo + 1)
    i = lo + int(np.argmax(mag[lo:hi]))
    if 0 < i < len(mag) - 1:  # parabolic interpolation between bins
        a, b, c = mag[i - 1], mag[i], mag[i + 1]
        denom = a - 2 * b + c
        shift = 0.5 * (a - c) / denom if denom != 0 else 0.0
        shift = min(0.5, max(-0.5, shift))  # at the window's edge i may not be a local maximum
        return float(freqs[i] + shift * (freqs[1] - freqs[0])), float(b)
    return float(freqs[i]), float(mag[i])


def _refine(resid: np.ndarray, theta: float, f0: float) -> tuple[float, float, np.ndarray]:
    """Best normal angle (two grid passes around ``theta``) and the spacing frequency along it."""
    width = 1.0 / max(f0 * min(resid.shape), 1.0)  # angular size of one spectrum bin at f0 (radians)
    best = (theta, *_spectral_peak(_profile(resid, theta), f0))
    for span in (2.0 * width, 0.5 * width):
        centre = best[0]
        for delta in np.linspace(-span, span, 9):
            cand = centre + float(delta)
            freq, mag = _spectral_peak(_profile(resid, cand), best[1])
            if mag > best[2]:
                best = (cand, freq, mag)
    profile = _profile(resid, best[0])
    freq, _ = _spectral_peak(profile, best[1])
    return best[0], freq, profile


def _regularity(profile: np.ndarray, lag: float) -> float:
    """(corr at one spacing - corr at half a spacing) / 2: high only for a periodic profile."""
    x = profile - profile.mean()

    def corr(shift: float) -> float:
        n = len(x) - int(math.ceil(shift)) - 1
        if n < 8:
            return 0.0
        base = np.arange(n, dtype=np.float64)
        shifted = np.interp(base + shift, np.arange(len(x)), x)
        a, b = x[:n], shifted
        denom = math.sqrt(float(a @ a) * float(b @ b))
        return float(a @ b) / denom if denom > 0 else 0.0

    return (corr(lag) - corr(lag / 2.0)) / 2.0
