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

Exposure and white balance lock (:meth:`Picamera2Camera.lock_exposure`): the
values libcamera's AE/AWB chose are read from the next frame's metadata
(``ExposureTime`` in microseconds, ``AnalogueGain``, ``ColourGains`` = red and
blue gains) and set back as fixed controls with ``AeEnable``/``AwbEnable`` off.
They go into the running camera (``set_controls``) AND into the ``controls`` of
both configurations, because picamera2 replaces its controls with the
configuration's own on every ``configure`` -- which
``switch_mode_and_capture_array`` does twice per still. Without that the still
could be taken with whatever the algorithms decide in the new mode.

What can fail, as :class:`~leukoedge.errors.CameraError`: picamera2 missing,
no camera attached, the camera busy or failing mid-capture, a control the
sensor does not advertise (a monochrome sensor has no ``ColourGains``).
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
#: The fixed values a lock holds (libcamera control names, as in the frame metadata).
LOCKED_CONTROLS = ("ExposureTime", "AnalogueGain", "ColourGains")


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

    def lock_exposure(self) -> dict:
        """Fix exposure, gain and colour gains at the values AE/AWB use now; return them."""
        with self._lock:
            self._check_open()
            metadata = self._attempt("read the frame metadata", self._cam.capture_metadata)
            settings = settings_from_metadata(metadata)
            self._set_fixed(settings)
        return settings

    def apply_settings(self, settings: dict) -> None:
        """Fix exposure and white balance at stored ``settings`` (from :meth:`lock_exposure`)."""
        settings = validate_settings(settings)
        with self._lock:
            self._check_open()
            self._set_fixed(settings)

    def unlock(self) -> None:
        """AE and AWB back on; the fixed values leave both configurations."""
        with self._lock:
            self._check_open()
            auto = {"AeEnable": True, "AwbEnable": True}
            self._attempt("switch automatic exposure back on", lambda: self._cam.set_controls(auto))
            for config in (self._preview_config, self._still_config):
                controls = config.setdefault("controls", {})
                for name in LOCKED_CONTROLS:
                    controls.pop(name, None)
                controls.update(auto)

    def _set_fixed(self, settings: dict) -> None:
        """Caller holds the lock. The running camera and both configurations get the same fixed controls."""
        controls = {"AeEnable": False, "AwbEnable": False, "ExposureTime": settings["ExposureTime"],
                    "AnalogueGain": settings["AnalogueGain"], "ColourGains": tuple(settings["ColourGains"])}
        self._attempt("fix exposure and white balance", lambda: self._cam.set_controls(controls))
        for config in (self._preview_config, self._still_config):
            config.setdefault("controls", {}).update(controls)

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                self._release()

    def _check_open(self) -> None:
        if self._closed:
            raise CameraError("the camera is closed")

    def _attempt(self, what: str, fn):
        """Caller holds the lock: ``fn()`` with libcamera's errors re-raised typed."""
        try:
            return fn()
        except Exception as err:  # noqa: BLE001 - libcamera errors vary; re-raised typed
            raise CameraError(f"the Raspberry Pi camera failed to {what} ({type(err).__name__}: {err})") from None

    def _call(self, what: str, fn) -> np.ndarray:
        with self._lock:
            self._check_open()
            return self._attempt(what, fn)

    def _release(self) -> None:
        for method in ("stop", "close"):
            try:
                getattr(self._cam, method)()
            except Exception:  # noqa: BLE001 - best effort on shutdown of a failed device
                pass


def settings_from_metadata(metadata) -> dict:
    """The lock's settings from one frame's metadata; CameraError when a value is missing."""
    missing = [name for name in LOCKED_CONTROLS if not isinstance(metadata, dict) or metadata.get(name) is None]
    if missing:
        hint = ("a monochrome sensor has no colour gains; leukoedge needs a colour camera"
                if missing == ["ColourGains"] else None)
        raise CameraError(f"the Raspberry Pi camera reported no {', '.join(missing)} in its frame metadata, "
                          "so its exposure and white balance cannot be locked", hint=hint)
    return validate_settings({name: metadata[name] for name in LOCKED_CONTROLS})


def validate_settings(settings) -> dict:
    """``{"ExposureTime": int us > 0, "AnalogueGain": float > 0, "ColourGains": [red, blue] > 0}`` or CameraError."""
    try:
        exposure = int(settings["ExposureTime"])
        gain = float(settings["AnalogueGain"])
        red, blue = (float(g) for g in settings["ColourGains"])
    except (KeyError, TypeError, ValueError) as err:
        raise CameraError(f"unusable Raspberry Pi camera settings {settings!r:.200} ({type(err).__name__}: {err})") \
            from None
    if exposure <= 0 or not all(np.isfinite(v) and v > 0 for v in (gain, red, blue)):
        raise CameraError(f"unusable Raspberry Pi camera settings {settings!r:.200}: every value must be positive")
    return {"ExposureTime": exposure, "AnalogueGain": gain, "ColourGains": [red, blue]}


def describe_settings(settings: dict) -> str:
    """What the live page and health say about a lock: ``exposure 12000 us, gain 2.00, colour gains 1.80/1.50``."""
    red, blue = settings["ColourGains"]
    return (f"exposure {settings['ExposureTime']} us, gain {settings['AnalogueGain']:.2f}, "
            f"colour gains {red:.2f}/{blue:.2f}")
