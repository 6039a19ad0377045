"""The station's scale calibration: micrometres per camera pixel, kept in the data folder.

Why it exists: a model sees cells at the size its training images showed them,
and the runtime brings each capture to that size from the capture's um/px
(issue 15). Measured once per objective and camera adapter, the calibration is
better than estimating the scale from every capture's red cells (which fails
on fields with few or clumped red cells); without one, the app estimates per
capture and says so.

One JSON file, ``DATA_DIR/scale.json``, written atomically
(:func:`leukoedge.files.write_json`), read at start-up and re-applied::

    {"version": 1, "um_per_px": 0.08, "method": "micrometer", "created_at": 1764..., "details": {...}}

The um/px is always that of the camera's FULL-resolution pixels (what a
capture delivers and an uploaded camera file holds), whatever size the
measurement was made at. A damaged file never stops the app: it is logged and
the station runs uncalibrated, as the header then says.

What can fail: :class:`~leukoedge.errors.ScaleError` (422) for a number that
is not a plausible pixel size; :class:`~leukoedge.edge_app.storage.StorageError`
when the file cannot be written.
"""
from __future__ import annotations

import json
import logging
import math
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ScaleError
from ..files import fsync_dir, write_json

log = logging.getLogger(__name__)

FILE_NAME = "scale.json"
FORMAT_VERSION = 1
#: Plausible camera pixel sizes at a microscope: a 100x oil objective on a 1.55 um sensor pixel is
#: ~0.016 um/px; a 4x objective behind a 0.35x adapter on 3.45 um pixels is ~2.5 um/px.
MIN_UM_PER_PX = 0.005
MAX_UM_PER_PX = 10.0
#: Stage micrometer divisions: 10 um (1 mm in 100) is usual; 2 um and 100 um rulings exist.
MIN_DIVISION_UM = 0.5
MAX_DIVISION_UM = 1000.0
#: Red-cell diameters a user may assert (human RBCs are 7-8 um; other species differ).
MIN_RBC_UM = 3.0
MAX_RBC_UM = 15.0

#: method -> how the header says it was obtained.
METHODS = {
    "typed": "typed in",
    "micrometer": "calibrated from a stage micrometer",
    "field": "calibrated from the red cells of a field",
}


def checked_number(value, name: str, lo: float, hi: float, unit: str) -> float:
    """``value`` as a finite float within [lo, hi], or ScaleError saying what was wrong."""
    if isinstance(value, bool):
        value = None  # JSON true/false are not numbers
    try:
        out = float(str(value).strip()) if isinstance(value, str) else float(value)
    except (TypeError, ValueError):
        raise ScaleError(f"{name} must be a number, got {str(value)[:40]!r}") from None
    if not math.isfinite(out) or out <= 0:
        raise ScaleError(f"{name} must be a positive number of {unit}, got {str(value)[:40]}")
    if not lo <= out <= hi:
        raise ScaleError(f"{name} {out:g} {unit} is outside the plausible range {lo:g}-{hi:g} {unit}",
                         hint="check the unit: micrometres (um), not millimetres or nanometres")
    return out


def checked_um_per_px(value, name: str = "um_per_px") -> float:
    return checked_number(value, name, MIN_UM_PER_PX, MAX_UM_PER_PX, "um per pixel")


@dataclass(frozen=True)
class Calibration:
    """One calibration: the um/px of full-resolution camera pixels, and how it was obtained.

    Attributes:
        um_per_px: micrometres per pixel of a full-resolution capture.
        method: ``typed``, ``micrometer`` or ``field`` (see :data:`METHODS`).
        created_at: when it was made (Unix time).
        details: what the measurement saw (division length and spacing, red cells
            measured, the image's size and source), JSON-ready.
    """

    um_per_px: float
    method: str
    created_at: float = field(default_factory=time.time)
    details: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "um_per_px", checked_um_per_px(self.um_per_px))
        if self.method not in METHODS:
            raise ScaleError(f"unknown calibration method {self.method!r}; use one of {', '.join(METHODS)}")

    @property
    def date(self) -> str:
        return time.strftime("%Y-%m-%d", time.gmtime(self.created_at))

    @property
    def how(self) -> str:
        """e.g. "calibrated from a stage micrometer on 2026-12-03"."""
        return f"{METHODS[self.method]} on {self.date}"

    def describe(self) -> str:
        """The header's line: "Scale: 0.0800 um/px (calibrated from a stage micrometer on 2026-12-03)"."""
        return f"Scale: {format_um(self.um_per_px)} um/px ({self.how})"

    def to_dict(self) -> dict:
        return {
            "version": FORMAT_VERSION,
            "um_per_px": self.um_per_px,
            "method": self.method,
            "created_at": self.created_at,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.created_at)),
            "details": dict(self.details),
        }

    @classmethod
    def from_dict(cls, data: dict) -> "Calibration":
        if not isinstance(data, dict) or data.get("version") != FORMAT_VERSION:
            raise ScaleError(f"not a version-{FORMAT_VERSION} scale calibration")
        details = data.get("details") or {}
        if not isinstance(details, dict):
            raise ScaleError("the calibration's details are not an object")
        return cls(um_per_px=data.get("um_per_px"), method=str(data.get("method")),
                   created_at=float(data.get("created_at") or 0.0), details=details)


UNCALIBRATED_LINE = "Scale: not calibrated — estimated per capture"


def format_um(value: float) -> str:
    """Four significant digits: 0.08000 -> "0.08", 0.3527 -> "0.3527", 1.234 -> "1.234"."""
    return f"{value:.4g}"


class CalibrationStore:
    """The calibration file of one data folder; thread-safe, cached in memory."""

    def __init__(self, data_dir: Path) -> None:
        self.path = Path(data_dir) / FILE_NAME
        self._lock = threading.Lock()
        self._current: Calibration | None = None
        self.load_error: str | None = None

    @property
    def current(self) -> Calibration | None:
        with self._lock:
            return self._current

    def load(self) -> Calibration | None:
        """Read the file (start-up); a missing file means uncalibrated, a damaged one is logged and ignored."""
        calibration, self.load_error = None, None
        if self.path.is_file():
            try:
                calibration = Calibration.from_dict(json.loads(self.path.read_text(encoding="utf-8")))
            except (OSError, ValueError, ScaleError) as err:
                reason = err.message if isinstance(err, ScaleError) else str(err)
                self.load_error = f"{self.path} could not be read ({reason}); the station runs uncalibrated"
                log.error("scale calibration: %s; calibrate again on the Scale page", self.load_error)
        with self._lock:
            self._current = calibration
        if calibration is not None:
            log.info("scale calibration re-applied: %s", calibration.describe())
        elif self.load_error is None:
            log.info("scale: not calibrated; each capture's scale is estimated from its red cells")
        return calibration

    def save(self, calibration: Calibration) -> Calibration:
        from .storage import StorageError

        try:
            write_json(self.path, calibration.to_dict())
        except OSError as err:
            raise StorageError(f"could not save the scale calibration ({err.strerror or err})",
                               hint="is the disk full or the data folder read-only?") from None
        with self._lock:
            self._current = calibration
        self.load_error = None
        log.info("scale calibration saved: %s", calibration.describe())
        return calibration

    def clear(self) -> bool:
        """Forget the calibration; True when there was one."""
        from .storage import StorageError

        try:
            existed = self.path.is_file()
            self.path.unlink(missing_ok=True)
            if existed:
                fsync_dir(self.path.parent)  # the removal survives a power cut too
        except OSError as err:
            raise StorageError(f"could not remove {self.path.name} ({err.strerror or err})") from None
        with self._lock:
            had = self._current is not None
            self._current = None
        self.load_error = None
        if existed or had:
            log.info("scale calibration forgotten; each capture's scale is estimated from now on")
        return existed or had
