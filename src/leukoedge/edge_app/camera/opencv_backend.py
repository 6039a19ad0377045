"""USB / V4L2 microscope cameras through OpenCV's ``VideoCapture``.

OpenCV is optional and imported lazily; when it is missing the backend says so
and ``--camera auto`` moves on to upload mode. Frames arrive BGR and are
flipped to RGB here, the only place that knows about OpenCV's channel order.

What can fail, as :class:`~leukoedge.errors.CameraError`: cv2 missing, the
device not opening, a read returning no frame.
"""
from __future__ import annotations

import threading
from typing import Any

import numpy as np

from ...errors import CameraError
from .base import PREVIEW_MAX_SIDE, as_rgb, encode_jpeg


class OpenCVCamera:
    """One opened ``cv2.VideoCapture`` (a device index or a /dev/video path)."""

    name = "opencv"

    def __init__(self, device: int | str = 0, *, still_size: tuple[int, int] | None = None) -> None:
        try:
            import cv2
        except ImportError as err:
            raise CameraError(
                f"OpenCV (cv2) is not installed ({err})",
                hint="install python3-opencv (apt) or opencv-python-headless (pip) for USB cameras",
            ) from None
        self._cv2: Any = cv2
        self._lock = threading.Lock()
        self._cap = cv2.VideoCapture(device)
        if not self._cap.isOpened():
            self._cap.release()
            raise CameraError(f"no USB/V4L2 camera at {device!r}", hint="list devices with: v4l2-ctl --list-devices")
        if still_size is not None:
            self._cap.set(cv2.CAP_PROP_FRAME_WIDTH, still_size[0])
            self._cap.set(cv2.CAP_PROP_FRAME_HEIGHT, still_size[1])
        self.detail = f"device {device!r}"
        self._closed = False

    def __enter__(self) -> "OpenCVCamera":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def capture(self) -> np.ndarray:
        with self._lock:
            if self._closed:
                raise CameraError("the camera is closed")
            ok, frame = self._cap.read()
        if not ok or frame is None:
            raise CameraError("the USB camera returned no frame (unplugged?)")
        return as_rgb(np.asarray(frame)[:, :, ::-1], source="opencv")

    def preview_jpeg(self) -> bytes:
        return encode_jpeg(self.capture(), max_side=PREVIEW_MAX_SIDE)

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                self._cap.release()
