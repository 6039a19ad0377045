"""The training images' pixel size (um/px): measured or given, recorded in the run, explained on the card.

Why: a model sees cells at the size its training images showed them, and its
accuracy collapses at another magnification (issue 15: 97 % -> 50 % at 1.5x).
The device can bring a capture to the training magnification before tiling
it only if the bundle says what that magnification was, so every run records
it in ``config.json["scale"]`` (:func:`training_scale`), the spec carries it
(:attr:`RunConfig.preprocess_spec` -> ``PreprocessSpec.with_scale``), and
``convert`` copies it into ``bundle.json["preprocessing"]``.

How it is obtained, in order of trust:

- ``given``: ``leukoedge train --um-per-px X`` (a stage micrometer, or the
  microscope's documented pixel size);
- ``measured``: :func:`leukoedge.scale.estimate_dataset` on the TRAINING
  split's images (red cells are 7-8 um across; ``--rbc-um`` overrides), the
  median over images. It is trusted only when at least
  :data:`MIN_MEASURED_FRACTION` of the images gave a diameter;
- ``unknown``: the measurement failed (no red cells, e.g. cell crops) or ran
  on too few images. Training goes on with a warning; the device then keeps
  stretching the whole frame, and ``leukoedge convert --um-per-px X`` can add
  the scale later.

``source_size`` is the median stored (height, width) of the training images:
um/px times it is the field one model input covers (``field_um``), which is
what one tile of a capture must cover on the device.

TensorFlow-free (numpy + Pillow through :mod:`leukoedge.scale`).
"""
from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..errors import ScaleError, UsageError

log = logging.getLogger(__name__)

SOURCES = ("given", "measured", "unknown")
#: The dataset median is recorded only when at least this fraction of the training images gave a diameter.
MIN_MEASURED_FRACTION = 0.5
#: Largest um/px accepted from the command line (a 1 px = 1 mm "image" is not a micrograph).
MAX_UM_PER_PX = 1000.0


def check_um_per_px(value: float | None, flag: str = "--um-per-px") -> float | None:
    """``value`` as a positive finite float below :data:`MAX_UM_PER_PX` (None passes), else a UsageError."""
    if value is None:
        return None
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise UsageError(f"{flag} must be a number of micrometres per pixel, got {value!r}") from None
    if not (0.0 < out < MAX_UM_PER_PX):  # also false for NaN
        raise UsageError(f"{flag} must be a positive number of micrometres per pixel below {MAX_UM_PER_PX:g}, "
                         f"got {value!r}", hint="a 224 px field at 40x is about 0.3-0.4 um/px")
    return out


def check_rbc_um(value: float | None) -> float | None:
    """``--rbc-um`` as a plausible red-cell diameter in micrometres (None passes)."""
    if value is None:
        return None
    out = float(value)
    if not (1.0 <= out <= 30.0):
        raise UsageError(f"--rbc-um must be a red-cell diameter in micrometres (1-30), got {value!r}",
                         hint="human red cells are 7-8 um across; the default is 7.5")
    return out


def median_size(paths: Iterable[str | Path]) -> list[int] | None:
    """Median (height, width) in pixels of the images as displayed (EXIF orientation applied), from headers only.

    Unreadable files are skipped here (training names them when it loads them);
    None when no file could be read.
    """
    sizes = []
    for path in paths:
        try:
            with Image.open(path) as img:
                w, h = img.size
                if img.getexif().get(0x0112, 1) in (5, 6, 7, 8):
                    w, h = h, w
        except (OSError, UnidentifiedImageError, ValueError, SyntaxError):
            continue
        sizes.append((h, w))
    if not sizes:
        return None
    arr = np.asarray(sizes, dtype=np.float64)
    return [round(float(np.median(arr[:, 0]))), round(float(np.median(arr[:, 1])))]


def given_scale(um_per_px: float, paths: list[Path]) -> dict:
    """The record of a scale given with ``--um-per-px``."""
    return {"um_per_px": check_um_per_px(um_per_px), "source": "given", "source_size": median_size(paths),
            "n_images": len(paths)}


def measured_scale(paths: list[Path], rbc_um: float | None = None, *, progress: bool = False) -> dict:
    """The record of the scale measured on ``paths`` (the training split); ``unknown`` when it fails.

    Never raises for a failed measurement: a run without a known scale still
    trains, and its card says what that means for the device.
    """
    from .. import scale

    rbc = float(rbc_um) if rbc_um is not None else scale.RBC_UM
    base = {"source_size": median_size(paths), "n_images": len(paths), "rbc_um": rbc,
            "method": "median red-cell diameter per training image (leukoedge.scale), median over images"}
    try:
        ds = scale.estimate_dataset([str(p) for p in paths], rbc_um=rbc, progress=progress)
    except ScaleError as err:
        return _unknown(base, f"the red-cell measurement failed: {err.message}")
    failed = len(ds.failed)
    measured = len(paths) - failed
    spread = None if ds.spread is None or not math.isfinite(float(ds.spread)) else round(float(ds.spread), 4)
    base.update(measured=measured, failed=failed, spread=spread)
    if ds.um_per_px is None or not paths or measured < MIN_MEASURED_FRACTION * len(paths):
        return _unknown(base, f"red cells were measured on only {measured} of {len(paths)} training images")
    um = float(ds.um_per_px)
    log.info("training scale: %.4g um/px measured from red cells (%.1f um) on %d of %d training images "
             "(spread %s, %d failed)", um, rbc, measured, len(paths), spread, failed)
    return {"um_per_px": um, "source": "measured", **base}


def _unknown(base: dict, reason: str) -> dict:
    log.warning("training scale unknown: %s. Training goes on; the device will stretch the whole frame to the "
                "model input. Give it with --um-per-px X (or later: leukoedge convert RUN --um-per-px X)", reason)
    return {"um_per_px": None, "source": "unknown", "reason": reason, **base}


def training_scale(paths: Iterable[str | Path], *, um_per_px: float | None = None, rbc_um: float | None = None,
                   progress: bool = False) -> dict:
    """``config.json["scale"]`` of a new run: given (``um_per_px``), else measured on ``paths``."""
    paths = [Path(p) for p in paths]
    if um_per_px is not None:
        if rbc_um is not None:
            raise UsageError("--rbc-um applies to a measured scale; --um-per-px gives it",
                             hint="drop one of them")
        return given_scale(um_per_px, paths)
    return measured_scale(paths, rbc_um, progress=progress)


# --- the model card's "Scale" section ---------------------------------------------------------------


def how_obtained(scale: dict) -> str:
    """One phrase: how the run's um/px was obtained (runs older than the field: not recorded)."""
    source = scale.get("source")
    if source == "given":
        return "given with `--um-per-px` at training"
    if source == "conversion":
        return "given with `leukoedge convert --um-per-px` (not recorded at training)"
    if source == "measured":
        spread = "n/a" if scale.get("spread") is None else f"{scale['spread']:.3f}"
        return (f"measured from red-cell diameters ({scale.get('rbc_um', 7.5):g} um assumed) on "
                f"{scale.get('measured')} of {scale.get('n_images')} training images (spread {spread}, "
                f"{scale.get('failed', 0)} failed)")
    if source == "unknown":
        return f"unknown: {scale.get('reason') or 'not measured'}"
    return "not recorded (a run made before the training scale was recorded)"


def card_section(scale: dict | None, spec, scale_jitter: float = 0.0) -> dict:
    """The card's ``scale`` entry: the um/px, how it was obtained, the field one input covers, the device rule."""
    scale = dict(scale or {})
    um = scale.get("um_per_px")
    out = {"um_per_px": um, "source": scale.get("source") or "not recorded", "how": how_obtained(scale),
           "source_size": scale.get("source_size"), "field_um": list(spec.field_um) if spec.field_um else None,
           "input_um_per_px": list(spec.input_um_per_px) if spec.input_um_per_px else None,
           "scale_jitter": float(scale_jitter or 0.0)}
    if um is not None:
        h, w = spec.field_um
        out["device"] = (f"Captures are brought to {um:.4g} um/px and tiled: each tile covers {h:.0f} x {w:.0f} um, "
                         f"the field of one training image, and is resized to the {spec.height} x {spec.width} input. "
                         "Calibrate the device once per objective and camera adapter (Scale page); without a "
                         "calibration it estimates each capture's scale from its red cells.")
    else:
        out["device"] = ("The training images' um/px is not known, so the device stretches the whole frame to the "
                         f"{spec.height} x {spec.width} input: a capture at another magnification or field size "
                         "shows the cells at another size, and accuracy drops sharply. Calibrate: measure the "
                         "training images' scale (a stage micrometer under the training microscope, or "
                         "`leukoedge data scale`) and add it with `leukoedge convert RUN_DIR --um-per-px X`.")
    return out


def card_markdown(section: dict | None) -> list[str]:
    """The "## Scale" section's lines (without the heading)."""
    if not section:
        return ["- not recorded"]
    lines = []
    um = section.get("um_per_px")
    lines.append(f"- training images: {'unknown' if um is None else f'{um:.4g} um/px'} ({section['how']})")
    size = section.get("source_size")
    if um is not None and section.get("field_um"):
        h, w = section["field_um"]
        ih, iw = section["input_um_per_px"]
        stored = f"median training image {size[0]} x {size[1]} px, " if size else ""
        lines.append(f"- one model input covers {h:.1f} x {w:.1f} um ({stored}{ih:.3g} x {iw:.3g} um per input pixel)")
    elif size:
        lines.append(f"- median training image {size[0]} x {size[1]} px")
    jitter = section.get("scale_jitter") or 0.0
    lines.append(f"- scale jitter in training: zoom by a random factor in [{1 - jitter:.2f}, {1 + jitter:.2f}] "
                 "per image, so a calibration a few percent off matters little" if jitter else
                 "- scale jitter in training: off (`--scale-jitter 0.15` trains for a calibration a few percent off)")
    device = section["device"]
    lines.append(f"- on the device: {device[:1].lower()}{device[1:]}")
    return lines
