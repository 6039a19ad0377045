"""The capture quality gate: is this field worth classifying, or should the user retake it?

A model trained on sharp, well-exposed fields that each hold a white cell has
nothing sensible to say about a blurred, dark, washed-out or empty capture; it
answers anyway, often confidently. So before classifying, the device checks
three things and, when one fails, says "retake: ..." instead of a label:

- **focus** (:func:`focus_score`): the noise-compensated RMS of the Laplacian of
  the luma, as a percentage of the mean luma. The Laplacian responds to the
  fine detail blur removes; dividing by the mean makes it independent of
  exposure (a darker copy scores the same); subtracting the noise floor (from
  the median absolute Laplacian, which flat background dominates) keeps sensor
  noise from passing for sharpness. On held-out Taleqani fields
  (benchmarks/quality_gate.py, 160 and 224 px) no field was refused as captured
  or with sensor noise of sd 3 added, and every copy blurred by sigma 2 px was.
  Measured while choosing: the plain variance of the Laplacian let through every
  sigma-2 copy once noise of sd 2 was added, and an edge-slope (Sobel) score,
  noise-proof but only proportional to 1/blur, let through 90 % of them.
- **exposure**: ``brightness`` (the 90th percentile of the luma / 255: in a
  bright-field smear the brightest tenth is background, whose level the
  exposure sets), ``clipped_high`` (share of pixels clipped white in all three
  channels, >= 250) and ``clipped_low`` (clipped black in all three, <= 5). An
  empty bright background is not overexposure: Taleqani fields have up to
  40 % of pixels at >= 250 in every channel, which is why the limit comes from
  the training images and not from a fixed number. Underexposure rarely clips
  (a field at 0.3x exposure has its background at ~70/255), hence ``brightness``.
- **empty field**: the share of one training field covered by white cells
  (:func:`leukoedge.cells.white_cell_mask`), in the capture's best
  field-sized window, so a wide capture with one white cell passes like a
  training field with one.

Scale: every number is computed on the pixel grid as given, which must be the
training scale (the capture already brought to the bundle's um/px, or the
frame stretched to the model input when the bundle has no scale). Resampling
to a fixed working *size* instead would shrink a wide capture and make it look
sharper than it is. Colour: pass the pixels as captured (no colour
normalisation step): the white-cell rule reads colour.

Thresholds (:func:`fit_thresholds`) come from the training images at model
input size and travel in ``bundle.json["quality"]``; the rule for each is
documented at its constant below. numpy + Pillow only (runs on the Pi).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Iterable

import numpy as np

from . import stain
from . import cells as _cells
from .errors import UsageError

__all__ = [
    "QualityThresholds", "QualityReport", "REASONS", "focus_score", "measure", "white_cells", "assess",
    "fit_thresholds", "FIT_IMAGES",
]

#: Reason code -> what the user reads after "retake: ", in this order. When the exposure fails,
#: only the exposure reasons are given: a dark or washed-out field also loses its fine detail and
#: its nucleus colour, so "out of focus" or "no white cell" would send the user to the wrong knob
#: (measured: 95 % of 0.3x-exposed Taleqani fields lose their detected white cell). The numbers
#: are still reported.
REASONS = {
    "too_dark": "too dark",
    "too_bright": "too bright (overexposed)",
    "out_of_focus": "out of focus",
    "no_white_cell": "no white cell in view",
}

#: Pixel levels counted as clipped: all three channels at or above / at or below.
HIGH_LEVEL, LOW_LEVEL = 250, 5
#: The focus score is computed on at most this many pixels (a centre crop, same scale), for the live view.
MAX_FOCUS_PIXELS = 1_000_000

#: Training images ``convert`` fits the thresholds on when no int8 calibration selection exists
#: (float modes); full-integer modes reuse the calibration images (300 by default). The 1st
#: percentile of 300 values is about the 3rd lowest: one odd training field does not set a limit.
FIT_IMAGES = 300

# Threshold rules (fit_thresholds). Quantiles are of the training images' own values.
#: min_focus = FOCUS_MARGIN x the 1st percentile of training focus scores: a capture may be
#: somewhat softer than the softest training fields, not much. Gaussian blur of sigma 1 px at
#: model size divides the median Taleqani score by ~4 (about half such copies are refused),
#: sigma 2 by ~20 (all refused).
FOCUS_QUANTILE, FOCUS_MARGIN = 0.01, 0.6
#: min_brightness = BRIGHTNESS_MARGIN x the 1st percentile of training brightness (a background
#: at 60 % of the dimmest training backgrounds is too dark: 0.5x exposure fails, 0.7x passes).
BRIGHTNESS_QUANTILE, BRIGHTNESS_MARGIN = 0.01, 0.6
#: max_clipped_* = the 99th percentile of the training share, plus HEADROOM of what remains up to
#: 1: a capture may clip more than the training fields did, but not most of what they kept
#: (Taleqani at 160 px: 0.34 -> 0.67 for highlights, where a 2.5x overexposed field clips ~0.9;
#: training fields without clipping -> 0.5 and 0.25, so half the field may be blank white glass
#: and a quarter black, e.g. the corners outside the microscope's field stop).
CLIP_QUANTILE = 0.99
CLIP_HIGH_HEADROOM, CLIP_LOW_HEADROOM = 0.5, 0.25
#: min_white_cell_fraction = WHITE_CELL_MARGIN x the 1st percentile of the training fields'
#: white-cell share. Generous because a paler stain outlines only part of a nucleus (the mask's
#: score floor is absolute): on 300 held-out Taleqani fields at 160 px, 0.3 instead of 0.5 cut
#: false "no white cell" on half-saturated copies from 7 % to about 4.5 %, while fields whose
#: white cell was removed were still caught 93 % of the time instead of 95 %. When training
#: fields often hold no detected white cell (the 1st percentile is 0), the threshold is 0 and
#: the check is off rather than wrong.
WHITE_CELL_QUANTILE, WHITE_CELL_MARGIN = 0.01, 0.3




#: Fields a quality section must hold (the others have defaults that turn nothing on).
_REQUIRED = ("min_focus", "max_clipped_high", "max_clipped_low", "min_white_cell_fraction")


# ------------------------------------------------------------------ the records
@dataclass(frozen=True)
class QualityThresholds:
    """Limits a capture must meet, fitted on the training images; stored in ``bundle.json["quality"]``.

    Attributes:
        min_focus: lowest :func:`focus_score`.
        max_clipped_high: largest share of pixels clipped white (all channels >= 250).
        max_clipped_low: largest share of pixels clipped black (all channels <= 5).
        min_white_cell_fraction: smallest share of one training field covered by white cells
            (0 turns the check off).
        min_brightness: lowest 90th percentile of the luma, / 255 (0 turns the check off).
        field_size: (height, width) of the training images the limits were fitted on (the model
            input): the window the white-cell share is measured in. None: the whole capture.
        n_images: how many training images they were fitted on (0: set by hand).
    """

    min_focus: float
    max_clipped_high: float
    max_clipped_low: float
    min_white_cell_fraction: float
    min_brightness: float = 0.0
    field_size: tuple[int, int] | None = None
    n_images: int = 0

    def __post_init__(self) -> None:
        _finite(self.min_focus, "min_focus", lo=0.0)
        for name in ("max_clipped_high", "max_clipped_low"):
            _finite(getattr(self, name), name, lo=0.0, hi=1.0, lo_open=True)
        for name in ("min_white_cell_fraction", "min_brightness"):
            _finite(getattr(self, name), name, lo=0.0, hi=1.0, hi_open=True)
        for name in ("min_focus", "max_clipped_high", "max_clipped_low", "min_white_cell_fraction", "min_brightness"):
            object.__setattr__(self, name, float(getattr(self, name)))
        if self.field_size is not None:
            size = self.field_size
            if (not isinstance(size, (list, tuple)) or len(size) != 2
                    or not all(isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 16384 for v in size)):
                raise UsageError(f"quality.field_size must be [height, width] in pixels, got {size!r}")
            object.__setattr__(self, "field_size", (int(size[0]), int(size[1])))
        if isinstance(self.n_images, bool) or not isinstance(self.n_images, int) or self.n_images < 0:
            raise UsageError(f"quality.n_images must be a whole number >= 0, got {self.n_images!r}")

    def to_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["field_size"] = list(self.field_size) if self.field_size is not None else None
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "QualityThresholds":
        """Parse ``bundle.json["quality"]``; UsageError naming the field for anything missing, unknown or out of range."""
        if not isinstance(data, dict):
            raise UsageError(f"quality must be an object, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise UsageError(f"unknown quality fields {unknown}")
        missing = [name for name in _REQUIRED if name not in data]
        if missing:
            raise UsageError(f"quality is missing field(s) {missing}")
        values = dict(data)
        if isinstance(values.get("field_size"), list):
            values["field_size"] = tuple(values["field_size"])
        return cls(**values)


@dataclass(frozen=True)
class QualityReport:
    """What :func:`assess` measured and decided for one capture.

    ``reasons`` are codes of :data:`REASONS` in that order; ``message`` is
    "retake: ..." for the user, None when ``ok``. ``thresholds`` are the limits
    used (None: nothing was checked and ``ok`` is True).
    """

    ok: bool
    reasons: tuple[str, ...]
    focus: float
    clipped_high: float
    clipped_low: float
    white_cell_fraction: float
    message: str | None
    brightness: float
    thresholds: QualityThresholds | None = None

    def to_dict(self) -> dict:
        return {
            "ok": self.ok,
            "reasons": list(self.reasons),
            "message": self.message,
            "focus": self.focus,
            "brightness": self.brightness,
            "clipped_high": self.clipped_high,
            "clipped_low": self.clipped_low,
            "white_cell_fraction": self.white_cell_fraction,
            "thresholds": self.thresholds.to_dict() if self.thresholds is not None else None,
        }


def _finite(value, name: str, *, lo: float, hi: float | None = None, lo_open: bool = False,
            hi_open: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)) or not math.isfinite(value):
        raise UsageError(f"quality.{name} is {value!r}, not a finite number")
    below = value <= lo if lo_open else value < lo
    above = hi is not None and (value >= hi if hi_open else value > hi)
    if below or above:
        span = (f"in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}" if hi is not None
                else f">= {lo:g}")
        raise UsageError(f"quality.{name} is {value!r}; it must be {span}")


# ------------------------------------------------------------------ measurements
def _luma(rgb: np.ndarray) -> np.ndarray:
    return stain.check_rgb(rgb).astype(np.float32) @ stain.LUMA.astype(np.float32)


def _centre_crop(a: np.ndarray, max_pixels: int) -> np.ndarray:
    h, w = a.shape[:2]
    if h * w <= max_pixels:
        return a
    f = math.sqrt(max_pixels / (h * w))
    ch, cw = max(3, int(h * f)), max(3, int(w * f))
    y0, x0 = (h - ch) // 2, (w - cw) // 2
    return a[y0:y0 + ch, x0:x0 + cw]


def focus_score(rgb: np.ndarray) -> float:
    """Sharpness of a capture at the training scale: higher is sharper, comparable with the training fields'.

    100 x sqrt(max(mean(L^2) - (1.4826 median|L|)^2, 0)), with L the 4-neighbour
    Laplacian of the luma divided by its mean (see the module docstring for why
    each part). At most :data:`MAX_FOCUS_PIXELS` are used (a centre crop, so the
    scale is unchanged): about 1 ms for a 160 px field, cheap enough to show live
    while the user turns the focus knob. Fields smaller than 3x3 pixels score 0.
    """
    return _focus_of_luma(_luma(rgb))


def _focus_of_luma(luma: np.ndarray) -> float:
    """:func:`focus_score` from the luma (:func:`measure` computes the luma once for all its numbers)."""
    g = _centre_crop(luma, MAX_FOCUS_PIXELS)
    mean = float(g.mean())
    if g.shape[0] < 3 or g.shape[1] < 3 or mean < 1.0:
        return 0.0
    lap = (g[1:-1, :-2] + g[1:-1, 2:] + g[:-2, 1:-1] + g[2:, 1:-1] - 4.0 * g[1:-1, 1:-1]) / mean
    energy = float(np.mean(lap * lap))
    # The median absolute Laplacian of mostly flat background is noise: 1.4826 x it estimates the noise's sd.
    noise = (1.4826 * _median(np.abs(lap).ravel())) ** 2
    return 100.0 * math.sqrt(max(energy - noise, 0.0))


def _median(values: np.ndarray) -> float:
    """``np.median`` of a 1-D array, exactly, in a tenth of its time.

    ``np.median`` of an even count partitions around two ranks at once, which
    numpy does ~10x slower than around one (3.6 ms against 0.33 ms for the
    250 k Laplacian values of a 12 MP frame at the training scale); the lower
    middle value is the largest of the lower half instead.
    """
    n = values.size
    k = n // 2
    part = np.partition(values, k)
    upper = part[k]
    if n % 2:
        return float(upper)
    return float((upper + part[:k].max()) / 2)


def white_cells(rgb: np.ndarray, field_size: tuple[int, int] | None = None) -> np.ndarray:
    """:func:`leukoedge.cells.white_cell_mask` with its size rules taken per training field.

    The mask's smallest kept component and its rim dilation are fractions of
    the image it is given; for a capture larger than one field (``field_size``,
    the training images' size) they are rescaled so a white cell is kept and
    outlined as it would be in a training field. Without ``field_size`` (or for
    a capture no larger than one field) it is ``white_cell_mask(rgb)``. The
    runtime can compute this once per capture and pass it to :func:`assess` and
    its own per-tile decisions.
    """
    rgb = stain.check_rgb(rgb)
    h, w = rgb.shape[:2]
    if field_size is None or h * w <= field_size[0] * field_size[1]:
        return _cells.white_cell_mask(rgb)
    return _cells.white_cell_mask_per_field(rgb, field_size)


def _best_window_fraction(mask: np.ndarray, field_size: tuple[int, int] | None) -> float:
    """Largest white-cell share of a field-sized window (stride half a window); the plain share without a field."""
    h, w = mask.shape
    if field_size is None:
        return float(mask.mean())
    wh, ww = min(field_size[0], h), min(field_size[1], w)
    if (wh, ww) == (h, w):
        return float(mask.mean())
    ys = _starts(h, wh)
    xs = _starts(w, ww)
    # Window sums from one running sum down the columns (its rows at the window edges give
    # each band's column sums) and one along the few bands: a full 2-D integral image costs
    # ~4x more on a 12 MP frame at the training scale.
    down = np.zeros((h + 1, w), dtype=np.int32)
    np.cumsum(mask, axis=0, dtype=np.int32, out=down[1:])
    bands = down[ys + wh] - down[ys]
    along = np.zeros((len(ys), w + 1), dtype=np.int32)
    np.cumsum(bands, axis=1, out=along[:, 1:])
    sums = along[:, xs + ww] - along[:, xs]
    return float(sums.max() / (wh * ww))


def _starts(n: int, win: int) -> np.ndarray:
    step = max(1, win // 2)
    starts = list(range(0, n - win + 1, step))
    if starts[-1] != n - win:
        starts.append(n - win)
    return np.asarray(starts)


def _percentile_level(luma: np.ndarray, q: float) -> float:
    """The ``q`` quantile of a luma image to the nearest level, from a 256-bin histogram (a full sort costs 5x more)."""
    counts = np.bincount(np.clip(np.rint(luma), 0, 255).astype(np.uint8).ravel(), minlength=256)
    return float(np.searchsorted(np.cumsum(counts), q * luma.size))


def measure(rgb: np.ndarray, field_size: tuple[int, int] | None = None, *,
            white_cell_mask: np.ndarray | None = None) -> dict[str, float]:
    """The gate's five numbers for one capture (see the module docstring); no decision."""
    rgb = stain.check_rgb(rgb)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    lo, hi = np.minimum(np.minimum(r, g), b), np.maximum(np.maximum(r, g), b)  # 10x faster than min(axis=2)
    mask = white_cells(rgb, field_size) if white_cell_mask is None else np.asarray(white_cell_mask, dtype=bool)
    if mask.shape != rgb.shape[:2]:
        raise UsageError(f"white-cell mask has shape {mask.shape}, the capture {rgb.shape[:2]}")
    luma = _luma(rgb)
    return {
        "focus": _focus_of_luma(luma),
        "brightness": _percentile_level(luma, 0.9) / 255.0,
        "clipped_high": float(np.mean(lo >= HIGH_LEVEL)),
        "clipped_low": float(np.mean(hi <= LOW_LEVEL)),
        "white_cell_fraction": _best_window_fraction(mask, field_size),
    }


# ------------------------------------------------------------------ the gate
def assess(rgb: np.ndarray, thresholds: QualityThresholds | None, *,
           white_cell_mask: np.ndarray | None = None) -> QualityReport:
    """Measure a capture (at the training scale, colours as captured) and check it against ``thresholds``.

    ``thresholds`` None (a bundle without a quality section): the numbers are
    still measured, nothing is refused. ``white_cell_mask`` lets a caller that
    already computed :func:`white_cells` for the capture share it: the mask is
    most of the cost (about 13 ms per 160 px field here, the rest about 1 ms).

    Raises:
        InvalidImageError: ``rgb`` is not a uint8 HxWx3 array.
    """
    m = measure(rgb, thresholds.field_size if thresholds else None, white_cell_mask=white_cell_mask)
    reasons: list[str] = []
    if thresholds is not None:
        failed = {
            "too_dark": m["brightness"] < thresholds.min_brightness or m["clipped_low"] > thresholds.max_clipped_low,
            "too_bright": m["clipped_high"] > thresholds.max_clipped_high,
            "out_of_focus": m["focus"] < thresholds.min_focus,
            "no_white_cell": m["white_cell_fraction"] < thresholds.min_white_cell_fraction,
        }
        reasons = [code for code in ("too_dark", "too_bright") if failed[code]]
        reasons = reasons or [code for code in ("out_of_focus", "no_white_cell") if failed[code]]
    message = "retake: " + "; ".join(REASONS[r] for r in reasons) if reasons else None
    return QualityReport(
        ok=not reasons, reasons=tuple(reasons), focus=m["focus"], clipped_high=m["clipped_high"],
        clipped_low=m["clipped_low"], white_cell_fraction=m["white_cell_fraction"], message=message,
        brightness=m["brightness"], thresholds=thresholds,
    )


def fit_thresholds(images: Iterable[np.ndarray]) -> QualityThresholds:
    """Thresholds from training images at model input size, colours as captured (rules at the constants above).

    ``images`` may be a generator or a (N, H, W, 3) array; all are measured
    once (about 15 ms per 160 px field, mostly the white-cell mask).

    Raises:
        UsageError: no images.
    """
    rows, shapes = [], []
    for img in images:
        img = stain.check_rgb(img)
        shapes.append(img.shape[:2])
        rows.append(measure(img))
    if not rows:
        raise UsageError("fitting the capture quality thresholds needs at least one training image")
    col = {k: np.array([r[k] for r in rows], dtype=np.float64) for k in rows[0]}
    q = lambda key, p: float(np.quantile(col[key], p))  # noqa: E731

    def clip_limit(key: str, headroom: float) -> float:
        top = q(key, CLIP_QUANTILE)
        return min(1.0, top + headroom * (1.0 - top))

    field = tuple(int(v) for v in np.median(np.array(shapes), axis=0))
    return QualityThresholds(
        min_focus=FOCUS_MARGIN * q("focus", FOCUS_QUANTILE),
        max_clipped_high=clip_limit("clipped_high", CLIP_HIGH_HEADROOM),
        max_clipped_low=clip_limit("clipped_low", CLIP_LOW_HEADROOM),
        min_white_cell_fraction=WHITE_CELL_MARGIN * q("white_cell_fraction", WHITE_CELL_QUANTILE),
        min_brightness=BRIGHTNESS_MARGIN * q("brightness", BRIGHTNESS_QUANTILE),
        field_size=field,
        n_images=len(rows),
    )
