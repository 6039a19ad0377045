"""The camera interface every backend implements, and what the app knows about it.

A camera is three methods: :meth:`Camera.capture` (a full-resolution still as
uint8 RGB, what gets classified), :meth:`Camera.preview_jpeg` (a small JPEG
frame for the live MJPEG preview) and :meth:`Camera.close`. Backends are
thread-safe (one lock around the device) because the preview producer thread
and capture requests share one camera, created once per process.

A real camera also implements :class:`LockableCamera` (fixed exposure and white
balance, see :mod:`.lock`); one that cannot, like the replay camera, raises
:class:`CameraSettingsUnsupportedError` from those methods so the user reads why.
"""
from __future__ import annotations

import io
import threading
import time
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np
from PIL import Image

from ...errors import CameraError

#: Longest side of preview frames; small keeps the MJPEG stream light on a Pi.
PREVIEW_MAX_SIDE = 640


@runtime_checkable
class Camera(Protocol):
    """What the app needs from a camera backend."""

    name: str

    def capture(self) -> np.ndarray:
        """A full-resolution still, uint8 HxWx3 RGB. Raises CameraError."""

    def preview_jpeg(self) -> bytes:
        """A small JPEG frame for the live preview. Raises CameraError."""

    def close(self) -> None:
        """Release the device; safe to call twice."""


class CameraSettingsUnsupportedError(CameraError):
    """This camera cannot fix its exposure or white balance (replay folder, a USB camera without the controls).

    409, not CameraError's 503: the camera works, the request does not fit it, and retrying will not help.
    """

    http_status = 409


@runtime_checkable
class LockableCamera(Protocol):
    """A camera whose automatic exposure and white balance can be switched off and on.

    ``settings`` are backend-specific, JSON-ready dicts (picamera2: libcamera control
    names; OpenCV: the ``CAP_PROP_*`` values) so that what :meth:`lock_exposure`
    returns can be stored and given back to :meth:`apply_settings` after a restart.
    """

    def lock_exposure(self) -> dict:
        """Read the current automatic exposure / gain / white balance, fix them, return them."""

    def unlock(self) -> None:
        """Switch automatic exposure and white balance back on."""

    def apply_settings(self, settings: dict) -> None:
        """Fix exposure and white balance at ``settings`` (what :meth:`lock_exposure` returned)."""


@dataclass(frozen=True)
class CameraStatus:
    """Which backend is in use, and why others were not.

    Attributes:
        requested: the ``--camera`` spec as given.
        backend: the backend in use, or ``"none"`` (upload mode).
        attempts: ``(backend, reason)`` for every backend tried that failed.
        detail: human description of the working camera (e.g. the replay folder).
    """

    requested: str
    backend: str
    attempts: tuple[tuple[str, str], ...] = field(default_factory=tuple)
    detail: str = ""

    @property
    def available(self) -> bool:
        return self.backend != "none"

    @property
    def reason(self) -> str:
        """Why the app is in upload mode ('' when a camera works)."""
        if self.available:
            return ""
        if not self.attempts:
            return "no camera requested (--camera none)"
        return "; ".join(f"{name}: {why}" for name, why in self.attempts)

    def to_dict(self) -> dict:
        return {
            "requested": self.requested,
            "backend": self.backend,
            "available": self.available,
            "mode": "camera" if self.available else "upload",
            "detail": self.detail,
            "fallback_reason": self.reason,
            "attempts": [{"backend": n, "reason": r} for n, r in self.attempts],
        }


class CameraHealth:
    """The camera's CURRENT state, updated by every capture and preview frame (thread-safe).

    :class:`CameraStatus` says what was opened at start-up; this says whether it
    works now. A failure sets ``state = "failing"`` with its message; the next
    success clears it (the message stays as ``last_error`` with its time), so
    health never reports a recovered camera as broken, nor a broken one as fine.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._state = "idle"  # no capture or preview frame yet
        self._error: str | None = None
        self._last_error: str | None = None
        self._last_error_at: float | None = None
        self._last_ok_at: float | None = None
        self._failures = 0

    def ok(self) -> None:
        with self._lock:
            self._state, self._error, self._failures = "ok", None, 0
            self._last_ok_at = time.time()

    def failed(self, message: str) -> None:
        with self._lock:
            self._state, self._error = "failing", message
            self._last_error, self._last_error_at = message, time.time()
            self._failures += 1

    @property
    def failing(self) -> bool:
        with self._lock:
            return self._state == "failing"

    def to_dict(self) -> dict:
        with self._lock:
            return {
                "state": self._state,
                "error": self._error,
                "consecutive_failures": self._failures,
                "last_ok_at": self._last_ok_at,
                "last_error": self._last_error,
                "last_error_at": self._last_error_at,
            }


def encode_jpeg(rgb: np.ndarray, *, max_side: int | None = PREVIEW_MAX_SIDE, quality: int = 75) -> bytes:
    """JPEG bytes of a uint8 RGB frame, shrunk so its longest side is ``max_side``."""
    img = Image.fromarray(np.ascontiguousarray(rgb[:, :, :3]), mode="RGB")
    if max_side is not None and max(img.size) > max_side:
        img.thumbnail((max_side, max_side), Image.Resampling.BILINEAR)
    out = io.BytesIO()
    img.save(out, format="JPEG", quality=quality)
    return out.getvalue()


def as_rgb(frame: np.ndarray, *, source: str) -> np.ndarray:
    """Validate a backend frame: uint8 HxWx3, or HxWx4 with the 4th byte dropped."""
    arr = np.asarray(frame)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] not in (3, 4) or arr.size == 0:
        raise CameraError(f"{source} returned an unusable frame ({arr.dtype} {arr.shape})")
    return np.ascontiguousarray(arr[:, :, :3])
