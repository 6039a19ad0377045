"""A calibration request -> a :class:`~.calibration.Calibration`: typed in, a stage micrometer, or red cells.

The three ways a lab can tell the station its scale (issue 15), as the Scale
page and ``POST /api/scale`` accept them::

    {"um_per_px": 0.08}                                   typed in
    {"method": "micrometer", "division_um": 10}           a stage micrometer image
    {"method": "field", "rbc_um": 7.5}                    a field's red cells (7.5 um by default)

The image of the last two is an uploaded file (multipart field ``image``) or,
without one, a still from the camera (``"source": "camera"`` says so
explicitly). It is decoded at no less than ~1000 px a side, measured, and the
result converted to FULL-resolution camera pixels, which is what the station
classifies at.

Nothing is stored here and nothing is stored on failure: every bad input is a
typed 4xx (:class:`~leukoedge.errors.ScaleError` 422: no ruling, no red cells,
an implausible number; :class:`~leukoedge.errors.UsageError` 400: a malformed
request; the decoder's errors for a bad file; CameraError 503 without a camera).
"""
from __future__ import annotations

from typing import BinaryIO, Mapping

from ..errors import ScaleError, UsageError
from .calibration import (MAX_DIVISION_UM, MAX_RBC_UM, MIN_DIVISION_UM, MIN_RBC_UM, Calibration, checked_number,
                          checked_um_per_px)
from .micrometer import measure_ruling

#: Red-cell diameter assumed when the request gives none (scale.RBC_UM when that module is present).
DEFAULT_RBC_UM = 7.5
_KNOWN_KEYS = {"method", "um_per_px", "division_um", "rbc_um", "source", "csrf_token"}


def calibrate(service, params: Mapping, upload: BinaryIO | bytes | None = None) -> Calibration:
    """The calibration ``params`` ask for (not yet saved); ``upload`` is the image, if one was sent."""
    unknown = sorted(set(params) - _KNOWN_KEYS)
    if unknown:
        raise UsageError(f"unknown calibration field(s) {unknown}; use method, um_per_px, division_um, rbc_um, "
                         "source")
    method = str(params.get("method") or ("typed" if params.get("um_per_px") not in (None, "") else "")).strip()
    if method == "typed":
        if params.get("um_per_px") in (None, ""):
            raise UsageError("give the pixel size as um_per_px (micrometres per camera pixel)")
        return Calibration(checked_um_per_px(params["um_per_px"]), "typed", details={"source": "typed"})
    if params.get("um_per_px") not in (None, ""):
        raise UsageError(f"um_per_px is typed in; it cannot be combined with method {method!r}")
    if method == "micrometer":
        if params.get("division_um") in (None, ""):
            raise UsageError("give the length of one micrometer division as division_um (e.g. 10 for 1 mm / 100)")
        division = checked_number(params["division_um"], "division_um", MIN_DIVISION_UM, MAX_DIVISION_UM, "um")
        ruling, factor, info = _measure(service, params, upload, measure_ruling)
        period_full = ruling.period_px * factor
        details = {**info, "division_um": division, "division_px": round(period_full, 4),
                   **{k: v for k, v in ruling.to_dict().items() if k != "period_px"}}
        return Calibration(_plausible(division / period_full, "the measured division spacing"), "micrometer",
                           details=details)
    if method == "field":
        rbc_um = checked_number(params.get("rbc_um") or default_rbc_um(), "rbc_um", MIN_RBC_UM, MAX_RBC_UM, "um")
        estimate, factor, info = _measure(service, params, upload, lambda rgb: _estimator()(rgb, rbc_um=rbc_um))
        details = {**info, "rbc_um": rbc_um, "rbc_diameter_px": round(float(estimate.rbc_diameter_px) * factor, 3),
                   "n_cells": int(estimate.n_cells), "spread": round(float(estimate.spread), 4)}
        return Calibration(_plausible(float(estimate.um_per_px) / factor, "the red cells' size"), "field",
                           details=details)
    raise UsageError(f"unknown calibration method {method[:30]!r}; use typed (with um_per_px), micrometer "
                     "(with division_um) or field")


def _measure(service, params: Mapping, upload, measure):
    source = str(params.get("source") or ("upload" if upload is not None else "camera")).strip()
    if source == "upload":
        if upload is None:
            raise UsageError("no image was uploaded; choose a file, or measure from the camera")
        return service.measure_upload(upload, measure)
    if source == "camera":
        return service.measure_capture(measure)
    raise UsageError(f"source must be upload or camera, not {source[:30]!r}")


def _plausible(um_per_px: float, what: str) -> float:
    try:
        return checked_um_per_px(um_per_px)
    except ScaleError as err:
        raise ScaleError(f"{what} gives {um_per_px:.4g} um per pixel, which no microscope camera has; "
                         "nothing was saved", hint="check the image and the length you gave") from err


def _estimator():
    try:
        from ..scale import estimate_scale
    except ImportError:  # pragma: no cover - the module ships with this version
        raise ScaleError("this version cannot measure red cells; type the pixel size in or use a micrometer") from None
    return estimate_scale


def default_rbc_um() -> float:
    try:
        from ..scale import RBC_UM
    except ImportError:  # pragma: no cover
        return DEFAULT_RBC_UM
    return float(RBC_UM)
