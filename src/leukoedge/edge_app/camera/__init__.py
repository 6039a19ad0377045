"""Camera backends behind one small interface, and the ``--camera`` spec parser.

    camera, status = open_camera("auto")   # camera is None in upload mode

``auto`` tries ``picamera2``, then ``opencv``, then settles for upload mode,
recording why each failed; an explicit backend that fails also falls back to
upload mode with the reason. A missing or failing camera never stops the app.

:class:`CameraLock` (``lock.py``) fixes a camera's exposure and white balance
and keeps them in the data folder across restarts.
"""
from __future__ import annotations

import logging
from pathlib import Path

from ...errors import CameraError, UsageError
from .base import Camera, CameraHealth, CameraSettingsUnsupportedError, CameraStatus, LockableCamera, encode_jpeg
from .lock import CameraLock
from .stream import FrameBroadcaster

__all__ = ["Camera", "CameraHealth", "CameraLock", "CameraSettingsUnsupportedError", "CameraStatus",
           "FrameBroadcaster", "LockableCamera", "encode_jpeg", "open_camera", "parse_camera_spec"]

log = logging.getLogger(__name__)
AUTO_ORDER = ("picamera2", "opencv")


def parse_camera_spec(spec: str) -> tuple[str, str | None]:
    """``"replay:DIR"`` -> ``("replay", "DIR")``; unknown kinds raise UsageError."""
    kind, _, arg = spec.partition(":")
    kind = kind.strip().lower()
    if kind not in ("auto", "none", "picamera2", "opencv", "replay"):
        raise UsageError(f"unknown camera {spec!r}; use auto, none, picamera2, opencv[:DEVICE] or replay:DIR")
    if kind == "replay" and not arg:
        raise UsageError("the replay camera needs a folder: --camera replay:DIR")
    if kind in ("auto", "none", "picamera2") and arg:
        raise UsageError(f"camera {kind!r} takes no argument (got {spec!r})")
    return kind, (arg or None)


def _open_one(kind: str, arg: str | None) -> Camera:
    if kind == "picamera2":
        from .picamera2_backend import Picamera2Camera

        return Picamera2Camera()
    if kind == "opencv":
        from .opencv_backend import OpenCVCamera

        device: int | str = int(arg) if arg is not None and arg.isdigit() else (arg or 0)
        return OpenCVCamera(device)
    from .replay import ReplayCamera

    return ReplayCamera(Path(arg or "."))


def open_camera(spec: str) -> tuple[Camera | None, CameraStatus]:
    """Open the requested camera, or explain why the app is in upload mode."""
    kind, arg = parse_camera_spec(spec)
    if kind == "none":
        return None, CameraStatus(requested=spec, backend="none")
    candidates = [(k, None) for k in AUTO_ORDER] if kind == "auto" else [(kind, arg)]
    attempts: list[tuple[str, str]] = []
    for name, name_arg in candidates:
        try:
            camera = _open_one(name, name_arg)
        except CameraError as err:
            reason = err.message + (f" ({err.hint})" if err.hint else "")
            attempts.append((name, reason))
            log.info("camera %s unavailable: %s", name, reason)
            continue
        return camera, CameraStatus(requested=spec, backend=camera.name, attempts=tuple(attempts),
                                    detail=getattr(camera, "detail", ""))
    status = CameraStatus(requested=spec, backend="none", attempts=tuple(attempts))
    log.warning("no camera: upload mode (%s)", status.reason)
    return None, status
