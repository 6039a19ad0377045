"""Stand-ins for the two camera libraries that cannot run here: picamera2 and OpenCV's VideoCapture.

They are the only mocks of the camera tests (DEVELOPERS.md: mock only the Pi
camera and the Edge TPU) and mirror what the backends rely on, as read in the
libraries' sources:

- picamera2 (``picamera2/picamera2.py``): configurations are dicts with a
  ``controls`` dict; ``configure`` REPLACES the running controls with the
  configuration's own (``self.controls = Controls(self, controls=config['controls'])``),
  so a control set with ``set_controls`` in preview mode is gone after
  ``switch_mode_and_capture_array`` unless the still configuration carries it too;
  ``capture_metadata`` reports what AE/AWB chose; ``set_controls`` refuses a
  control the sensor does not advertise (RuntimeError).
- OpenCV's V4L2 backend (``cap_v4l.cpp``): ``get`` returns -1 for a control the
  camera lacks, ``set`` returns False when the driver refuses; values are raw V4L2
  values (exposure in 100 us units, auto exposure 1 = manual / 3 = aperture
  priority, the only two a UVC camera offers).

Used as plain classes (``install_*`` put them in ``sys.modules``), never as fixtures.
"""
from __future__ import annotations

import sys
import types

import numpy as np

SENSOR = (400, 300)  # (width, height): small stand-in for a 4056x3040 HQ sensor

#: What the fake AE/AWB settle on; the exposure drifts by EXPOSURE_STEP per frame while AE runs.
AUTO_EXPOSURE_US = 12000
AUTO_GAIN = 2.0
AUTO_COLOUR_GAINS = (1.8, 1.5)
EXPOSURE_STEP = 100
#: Controls a colour Pi sensor advertises (of those the backend uses).
ADVERTISED = frozenset({"AeEnable", "AwbEnable", "ExposureTime", "AnalogueGain", "ColourGains",
                        "NoiseReductionMode", "FrameDurationLimits"})


class FakePicamera2:
    """Records how the backend drives picamera2; returns frames and metadata shaped like the real one.

    Mirrors the picamera2 API used by the backend: ``sensor_resolution``,
    ``create_preview_configuration``, ``create_still_configuration``,
    ``configure``, ``start``, ``capture_array``, ``switch_mode_and_capture_array``,
    ``capture_metadata``, ``set_controls``, ``stop``, ``close``. Frames are
    (height, width, 3) uint8 for the configured size. ``still_controls`` holds the
    controls in force for each still.
    """

    instances: list["FakePicamera2"] = []
    fail_on_open = False
    fail_on_capture = False
    advertised = frozenset(ADVERTISED)

    def __init__(self, camera_num: int = 0) -> None:
        if FakePicamera2.fail_on_open:
            raise IndexError("list index out of range")  # what picamera2 raises with no camera
        self.calls: list[tuple] = []
        self.sensor_resolution = SENSOR
        self.configured = None
        self.started = False
        self.controls: dict = {}
        self.still_controls: list[dict] = []
        self.frames = 0
        FakePicamera2.instances.append(self)

    def create_preview_configuration(self, main):
        self.calls.append(("preview_config", main))
        return {"kind": "preview", "main": dict(main), "controls": {}}

    def create_still_configuration(self, main):
        self.calls.append(("still_config", main))
        return {"kind": "still", "main": dict(main), "controls": {}}

    def configure(self, config):
        self.calls.append(("configure", config["kind"]))
        self.configured = config
        self.controls = dict(config["controls"])  # as picamera2 does: the configuration's controls only

    def start(self):
        self.calls.append(("start",))
        self.started = True

    def set_controls(self, controls):
        unknown = sorted(set(controls) - self.advertised)
        if unknown:
            raise RuntimeError(f"Control {unknown[0]} is not advertised by libcamera")
        self.calls.append(("set_controls", dict(controls)))
        self.controls.update(controls)

    def capture_metadata(self):
        self.calls.append(("capture_metadata",))
        return self._metadata()

    def _metadata(self) -> dict:
        """What the frame reports: fixed values when AE/AWB are off, the algorithms' (drifting) choice otherwise."""
        self.frames += 1
        auto_exposure = self.controls.get("AeEnable", True)
        auto_white = self.controls.get("AwbEnable", True)
        metadata = {
            "ExposureTime": (AUTO_EXPOSURE_US + EXPOSURE_STEP * (self.frames - 1) if auto_exposure
                             else int(self.controls["ExposureTime"])),
            "AnalogueGain": AUTO_GAIN if auto_exposure else float(self.controls["AnalogueGain"]),
            "ColourGains": AUTO_COLOUR_GAINS if auto_white else tuple(self.controls["ColourGains"]),
            "Lux": 400.0,
        }
        if "ColourGains" not in self.advertised:  # a monochrome sensor
            del metadata["ColourGains"]
        return metadata

    def _frame(self, config, value: int) -> np.ndarray:
        width, height = config["main"]["size"]
        frame = np.zeros((height, width, 3), np.uint8)
        frame[..., 0] = value  # first byte in memory = R for "BGR888"
        return frame

    def capture_array(self, stream="main"):
        self.calls.append(("capture_array", stream))
        if FakePicamera2.fail_on_capture:
            raise RuntimeError("Camera frontend has timed out!")
        return self._frame(self.configured, 10)

    def switch_mode_and_capture_array(self, config, stream="main"):
        self.calls.append(("switch_mode_and_capture_array", config["kind"], stream))
        if FakePicamera2.fail_on_capture:
            raise RuntimeError("Camera frontend has timed out!")
        self.controls = dict(config["controls"])  # configure(still): its controls replace the running ones
        self.still_controls.append(dict(self.controls))
        frame = self._frame(config, 200)
        self.controls = dict(self.configured["controls"])  # and back to the preview configuration's
        return frame

    def stop(self):
        self.calls.append(("stop",))

    def close(self):
        self.calls.append(("close",))


def install_fake_picamera2(monkeypatch) -> type[FakePicamera2]:
    """``import picamera2`` gives the fake from now until the test ends; class state reset."""
    FakePicamera2.instances = []
    FakePicamera2.fail_on_open = False
    FakePicamera2.fail_on_capture = False
    FakePicamera2.advertised = ADVERTISED
    module = types.ModuleType("picamera2")
    module.Picamera2 = FakePicamera2
    monkeypatch.setitem(sys.modules, "picamera2", module)
    return FakePicamera2


# -- OpenCV -------------------------------------------------------------------
#: OpenCV's property numbers (``cv2.CAP_PROP_*``, videoio.hpp).
CAP_PROP_FRAME_WIDTH, CAP_PROP_FRAME_HEIGHT = 3, 4
CAP_PROP_GAIN, CAP_PROP_EXPOSURE, CAP_PROP_AUTO_EXPOSURE = 14, 15, 21
CAP_PROP_AUTO_WB, CAP_PROP_WB_TEMPERATURE = 44, 45
UVC_AUTO_EXPOSURE_MENU = (1, 3)  # manual, aperture priority


class FakeVideoCapture:
    """A UVC camera behind OpenCV's V4L2 backend: raw control values, automatics that drift per frame.

    While auto exposure (3) runs, every ``read`` moves the exposure by one step;
    while auto white balance runs, the temperature follows. It refuses a manual
    value while that control's automatic mode is on (some drivers accept and
    ignore it instead: either way the modes must be switched first) and any
    ``CAP_PROP_AUTO_EXPOSURE`` outside the UVC menu. ``missing`` controls read -1
    and refuse writes; ``refuse`` controls read fine but refuse writes.
    """

    instances: list["FakeVideoCapture"] = []
    missing: frozenset[int] = frozenset()
    refuse: frozenset[int] = frozenset()

    def __init__(self, device) -> None:
        self.device = device
        self.props = {CAP_PROP_AUTO_EXPOSURE: 3.0, CAP_PROP_EXPOSURE: 156.0, CAP_PROP_GAIN: 32.0,
                      CAP_PROP_AUTO_WB: 1.0, CAP_PROP_WB_TEMPERATURE: 4600.0,
                      CAP_PROP_FRAME_WIDTH: 64.0, CAP_PROP_FRAME_HEIGHT: 48.0}
        self.sets: list[tuple[int, float]] = []
        self.released = False
        FakeVideoCapture.instances.append(self)

    def isOpened(self) -> bool:
        return not self.released

    def release(self) -> None:
        self.released = True

    def getBackendName(self) -> str:
        return "V4L2"

    def get(self, prop: int) -> float:
        return -1.0 if prop in self.missing else float(self.props.get(prop, -1.0))

    def set(self, prop: int, value: float) -> bool:
        self.sets.append((prop, float(value)))
        if prop in self.missing or prop in self.refuse:
            return False
        if prop == CAP_PROP_AUTO_EXPOSURE and value not in UVC_AUTO_EXPOSURE_MENU:
            return False
        if prop == CAP_PROP_EXPOSURE and self.props[CAP_PROP_AUTO_EXPOSURE] != 1:
            return False
        if prop == CAP_PROP_WB_TEMPERATURE and self.props[CAP_PROP_AUTO_WB] != 0:
            return False
        self.props[prop] = float(value)
        return True

    def read(self):
        if self.props[CAP_PROP_AUTO_EXPOSURE] == 3:
            self.props[CAP_PROP_EXPOSURE] += 1
        if self.props[CAP_PROP_AUTO_WB] == 1:
            self.props[CAP_PROP_WB_TEMPERATURE] += 10
        height, width = int(self.props[CAP_PROP_FRAME_HEIGHT]), int(self.props[CAP_PROP_FRAME_WIDTH])
        frame = np.zeros((height, width, 3), np.uint8)
        frame[..., 0] = int(self.props[CAP_PROP_EXPOSURE]) % 256  # BGR: blue follows the exposure
        frame[..., 2] = int(self.props[CAP_PROP_WB_TEMPERATURE] // 100) % 256
        return True, frame


def install_fake_cv2(monkeypatch) -> type[FakeVideoCapture]:
    """``import cv2`` gives a module holding FakeVideoCapture and the property numbers."""
    FakeVideoCapture.instances = []
    FakeVideoCapture.missing = frozenset()
    FakeVideoCapture.refuse = frozenset()
    module = types.ModuleType("cv2")
    module.VideoCapture = FakeVideoCapture
    for name, value in globals().items():
        if name.startswith("CAP_PROP_"):
            setattr(module, name, value)
    monkeypatch.setitem(sys.modules, "cv2", module)
    return FakeVideoCapture
