"""USB / V4L2 microscope cameras through OpenCV's ``VideoCapture``.

OpenCV is optional and imported lazily; when it is missing the backend says so
and ``--camera auto`` moves on to upload mode. Frames arrive BGR and are
flipped to RGB here, the only place that knows about OpenCV's channel order.

Exposure and white balance lock (:meth:`OpenCVCamera.lock_exposure`), read
against OpenCV's V4L2 backend (``modules/videoio/src/cap_v4l.cpp``), where the
``CAP_PROP_*`` values go to the driver's controls as they are, unscaled (unless
``OPENCV_VIDEOIO_V4L_RANGE_NORMALIZED`` is set, which leukoedge does not support):

==========================  ====================================  =====================================
OpenCV property             V4L2 control                          values
==========================  ====================================  =====================================
CAP_PROP_AUTO_EXPOSURE      exposure_auto                         0 auto, **1 manual**, 2 shutter
                                                                  priority, **3 aperture priority**
                                                                  (what UVC cameras call auto)
CAP_PROP_EXPOSURE           exposure_time_absolute                units of 100 us
CAP_PROP_GAIN               gain                                  the driver's own units
CAP_PROP_AUTO_WB            white_balance_automatic               0 off, 1 on
CAP_PROP_WB_TEMPERATURE     white_balance_temperature             kelvin
==========================  ====================================  =====================================

So: lock = read exposure, gain and white-balance temperature while the camera
runs automatically, then auto exposure 1 (manual) and auto WB 0, then the values
read (UVC cameras ignore a manual value while the automatic mode is on, so the
modes go first). Unlock = auto exposure 3 (UVC cameras refuse 0: their
exposure_auto menu holds only 1 and 3), falling back to 0 for drivers that
offer full auto, and auto WB 1. ``get`` answers -1 for a control the camera
lacks; ``set`` answers False when the driver refuses, and a driver may clamp
silently, so the modes are read back. A camera without manual exposure or
white-balance temperature cannot be locked (:class:`CameraSettingsUnsupportedError`);
one refusing a step midway is put back on automatic before the error is raised,
so it is never left half locked. Some UVC firmware does not report the
automatically chosen exposure while in auto mode; the lock then fixes the last
manual value, which the preview shows at once.

What can fail, as :class:`~leukoedge.errors.CameraError`: cv2 missing, the
device not opening, a read returning no frame, a control refused.
"""
from __future__ import annotations

import threading
from typing import Any

import numpy as np

from ...errors import CameraError
from .base import PREVIEW_MAX_SIDE, CameraSettingsUnsupportedError, as_rgb, encode_jpeg

#: V4L2 exposure_auto menu values (see the module docstring).
V4L2_EXPOSURE_MANUAL = 1
V4L2_EXPOSURE_APERTURE_PRIORITY = 3  # "auto" on UVC cameras
V4L2_EXPOSURE_AUTO = 0
#: What ``get`` returns for a control the camera does not have.
UNSUPPORTED = -1.0


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

    def lock_exposure(self) -> dict:
        """Read exposure, gain and white-balance temperature, switch both automatics off, set them back."""
        cv2 = self._cv2
        with self._lock:
            self._check_open()
            exposure = float(self._cap.get(cv2.CAP_PROP_EXPOSURE))
            gain = float(self._cap.get(cv2.CAP_PROP_GAIN))
            temperature = float(self._cap.get(cv2.CAP_PROP_WB_TEMPERATURE))
            if exposure == UNSUPPORTED:
                raise CameraSettingsUnsupportedError(
                    f"this USB camera ({self.detail}) has no manual exposure control, so its exposure cannot be locked",
                    hint="check what it offers with: v4l2-ctl -d /dev/video0 --list-ctrls")
            if temperature <= 0:
                raise CameraSettingsUnsupportedError(
                    f"this USB camera ({self.detail}) has no white-balance temperature control, "
                    "so its white balance cannot be locked",
                    hint="check what it offers with: v4l2-ctl -d /dev/video0 --list-ctrls")
            settings = {"exposure": exposure, "gain": None if gain == UNSUPPORTED else gain,
                        "wb_temperature": temperature, "api": self.api}
            self._set_fixed(settings)
        return settings

    def apply_settings(self, settings: dict) -> None:
        """Fix exposure and white balance at stored ``settings`` (from :meth:`lock_exposure`)."""
        settings = validate_settings(settings)
        with self._lock:
            self._check_open()
            self._set_fixed(settings)

    def unlock(self) -> None:
        """Both automatics back on (auto exposure 3, or 0 where the driver has no aperture priority)."""
        with self._lock:
            self._check_open()
            failed = self._set_auto()
        if failed:
            raise CameraError(f"the USB camera refused to switch {' and '.join(failed)} back on")

    @property
    def api(self) -> str:
        """OpenCV's name for the capture API in use (``"V4L2"`` on Linux), which decides the units."""
        try:
            return str(self._cap.getBackendName())
        except Exception:  # noqa: BLE001 - older OpenCV or a backend that cannot say; only a label
            return "unknown"

    def _set_fixed(self, settings: dict) -> None:
        """Caller holds the lock. Modes first, then values; any refusal puts the automatics back."""
        cv2 = self._cv2
        steps = [(cv2.CAP_PROP_AUTO_EXPOSURE, V4L2_EXPOSURE_MANUAL, "manual exposure"),
                 (cv2.CAP_PROP_EXPOSURE, settings["exposure"], f"exposure {settings['exposure']:g}"),
                 (cv2.CAP_PROP_AUTO_WB, 0, "manual white balance"),
                 (cv2.CAP_PROP_WB_TEMPERATURE, settings["wb_temperature"],
                  f"white balance {settings['wb_temperature']:g} K")]
        if settings.get("gain") is not None:
            steps.insert(2, (cv2.CAP_PROP_GAIN, settings["gain"], f"gain {settings['gain']:g}"))
        for prop, value, what in steps:
            if not self._cap.set(prop, float(value)):
                self._set_auto()
                raise CameraError(f"the USB camera refused {what}, so it was left on automatic exposure and "
                                  "white balance", hint="check its controls with: v4l2-ctl --list-ctrls")
        modes = (float(self._cap.get(cv2.CAP_PROP_AUTO_EXPOSURE)), float(self._cap.get(cv2.CAP_PROP_AUTO_WB)))
        if modes != (V4L2_EXPOSURE_MANUAL, 0.0):
            self._set_auto()
            raise CameraError(f"the USB camera accepted manual exposure and white balance but still reports "
                              f"auto-exposure mode {modes[0]:g} and auto white balance {modes[1]:g}; "
                              "it was left on automatic",
                              hint="is OPENCV_VIDEOIO_V4L_RANGE_NORMALIZED set? leukoedge needs OpenCV's raw "
                              "V4L2 values")

    def _set_auto(self) -> list[str]:
        """Caller holds the lock. Both automatics on; returns what the driver refused."""
        cv2 = self._cv2
        failed = []
        if not (self._cap.set(cv2.CAP_PROP_AUTO_EXPOSURE, V4L2_EXPOSURE_APERTURE_PRIORITY)
                or self._cap.set(cv2.CAP_PROP_AUTO_EXPOSURE, V4L2_EXPOSURE_AUTO)):
            failed.append("automatic exposure")
        if not self._cap.set(cv2.CAP_PROP_AUTO_WB, 1):
            failed.append("automatic white balance")
        return failed

    def _check_open(self) -> None:
        if self._closed:
            raise CameraError("the camera is closed")


def validate_settings(settings) -> dict:
    """``{"exposure", "gain" (or None), "wb_temperature", "api"}`` with finite numbers, or CameraError."""
    try:
        exposure = float(settings["exposure"])
        gain = None if settings.get("gain") is None else float(settings["gain"])
        temperature = float(settings["wb_temperature"])
        api = str(settings.get("api", "unknown"))
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise CameraError(f"unusable USB camera settings {settings!r:.200} ({type(err).__name__}: {err})") from None
    if not all(np.isfinite(v) for v in (exposure, temperature) + ((gain,) if gain is not None else ())) \
            or temperature <= 0:
        raise CameraError(f"unusable USB camera settings {settings!r:.200}")
    return {"exposure": exposure, "gain": gain, "wb_temperature": temperature, "api": api}


def describe_settings(settings: dict) -> str:
    """``exposure 15600 us, gain 32, white balance 4600 K`` (us only where the V4L2 unit, 100 us, is known)."""
    exposure = settings["exposure"]
    text = (f"exposure {exposure * 100:g} us" if settings.get("api") == "V4L2"
            else f"exposure {exposure:g} (in the {settings.get('api', 'unknown')} driver's units)")
    if settings.get("gain") is not None:
        text += f", gain {settings['gain']:g}"
    return text + f", white balance {settings['wb_temperature']:g} K"
