"""Raspberry Pi camera (the one on the microscope's trinocular port) via picamera2.

Configured once, the way the picamera2 examples do it: a small preview
configuration runs continuously for the live view, and a full-sensor still
configuration is switched to for each capture
(``switch_mode_and_capture_array``), so classification sees every pixel the
sensor has while the preview stays cheap. Both configurations are built once
in ``__init__``; nothing is reconfigured per frame.

picamera2 is imported lazily (it only exists on Raspberry Pi OS, installed by
apt as ``python3-picamera2``). Its ``"BGR888"`` format is, despite the name,
laid out R, G, B in memory (libcamera names formats by the little-endian
word), which is the RGB order the model wants.

What can fail, as :class:`~leukoedge.errors.CameraError`: picamera2 missing,
no camera attached, the camera busy or failing mid-capture.
"""
from __future__ import annotations

import threading
from typing import Any

import numpy as np

from ...errors import CameraError
from .base import PREVIEW_MAX_SIDE, as_rgb, encode_jpeg

#: Memory order R, G, B (see the module docstring).
PIXEL_FORMAT = "BGR888"
DEFAULT_PREVIEW_SIZE = (640, 480)


class Picamera2Camera:
    """A context manager around one configured, started ``Picamera2``."""

    name = "picamera2"

    def __init__(self, *, preview_size: tuple[int, int] = DEFAULT_PREVIEW_SIZE,
                 still_size: tuple[int, int] | None = None, camera_num: int = 0) -> None:
        try:
            from picamera2 import Picamera2
        except ImportError as err:
            raise CameraError(
                f"picamera2 is not installed ({err})",
                hint="on Raspberry Pi OS: sudo apt install python3-picamera2, and create the venv "
                "with --system-site-packages (deploy/setup-pi.sh does both)",
            ) from None
        self._lock = threading.Lock()
        self._closed = False
        try:
            cam = Picamera2(camera_num)
        except Exception as err:  # noqa: BLE001 - libcamera raises IndexError/RuntimeError/...; re-raised typed
            raise CameraError(f"no Raspberry Pi camera found ({type(err).__name__}: {err})",
                              hint="check the ribbon cable and run: rpicam-hello --list-cameras") from None
        self._cam: Any = cam
        try:
            full = tuple(still_size or cam.sensor_resolution)
            self.still_size = (int(full[0]), int(full[1]))
            self._preview_config = cam.create_preview_configuration(
                main={"size": tuple(preview_size), "format": PIXEL_FORMAT})
            self._still_config = cam.create_still_configuration(
                main={"size": self.still_size, "format": PIXEL_FORMAT})
            cam.configure(self._preview_config)
            cam.start()
        except Exception as err:  # noqa: BLE001 - any libcamera failure means no camera; re-raised typed
            self._release()
            raise CameraError(f"the Raspberry Pi camera could not be started ({type(err).__name__}: {err})",
                              hint="is another program (rpicam-*, another leukoedge) using the camera?") from None
        self.detail = f"sensor still {self.still_size[0]}x{self.still_size[1]}, preview {preview_size[0]}x{preview_size[1]}"

    def __enter__(self) -> "Picamera2Camera":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def capture(self) -> np.ndarray:
        """Full-resolution still: switch to the still mode, capture, switch back."""
        frame = self._call("capture a still", lambda: self._cam.switch_mode_and_capture_array(self._still_config, "main"))
        return as_rgb(frame, source="picamera2 still")

    def preview_jpeg(self) -> bytes:
        frame = self._call("capture a preview frame", lambda: self._cam.capture_array("main"))
        return encode_jpeg(as_rgb(frame, source="picamera2 preview"), max_side=PREVIEW_MAX_SIDE)

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                self._release()

    def _call(self, what: str, fn) -> np.ndarray:
        with self._lock:
            if self._closed:
                raise CameraError("the camera is closed")
            try:
                return fn()
            except Exception as err:  # noqa: BLE001 - libcamera errors vary; re-raised typed
                raise CameraError(f"the Raspberry Pi camera failed to {what} ({type(err).__name__}: {err})") from None

    def _release(self) -> None:
        for method in ("stop", "close"):
            try:
                getattr(self._cam, method)()
            except Exception:  # noqa: BLE001 - best effort on shutdown of a failed device
                pass
