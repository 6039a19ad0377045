"""Camera backends, ``--camera`` parsing, auto fallback, and the MJPEG broadcaster.

The Raspberry Pi camera cannot exist here, so ``picamera2`` is replaced by a
fake ``Picamera2`` class injected into ``sys.modules`` (the only mock, shared with
the camera-lock tests in ``camera_fakes``); the replay backend and the
broadcaster run for real.
"""
from __future__ import annotations

import io
import sys
import threading

import numpy as np
import pytest
from PIL import Image

from leukoedge.edge_app.camera import FrameBroadcaster, open_camera, parse_camera_spec
from leukoedge.edge_app.camera.picamera2_backend import PIXEL_FORMAT, Picamera2Camera
from leukoedge.edge_app.camera.replay import ReplayCamera
from leukoedge.errors import CameraError, UsageError
from leukoedge.preprocess import load_image

from camera_fakes import SENSOR, install_fake_picamera2

pytest_plugins = ["app_fixtures"]  # shared fixtures, registered once per session


@pytest.fixture
def fake_picamera2(monkeypatch):
    return install_fake_picamera2(monkeypatch)


def _no_picamera2(monkeypatch):
    monkeypatch.setitem(sys.modules, "picamera2", None)  # import raises ImportError


# -- spec parsing -----------------------------------------------------------
@pytest.mark.parametrize("spec, expected", [
    ("auto", ("auto", None)), ("none", ("none", None)), ("picamera2", ("picamera2", None)),
    ("opencv", ("opencv", None)), ("opencv:2", ("opencv", "2")), ("replay:/x/y", ("replay", "/x/y")),
])
def test_parse_camera_spec(spec, expected):
    assert parse_camera_spec(spec) == expected


@pytest.mark.parametrize("spec", ["webcam", "replay", "replay:", "none:1", "picamera2:0"])
def test_parse_camera_spec_rejects_bad_specs(spec):
    with pytest.raises(UsageError):
        parse_camera_spec(spec)


# -- picamera2 backend against the fake -------------------------------------
def test_picamera2_configures_once_and_captures_full_resolution(fake_picamera2):
    with Picamera2Camera(preview_size=(160, 120)) as cam:
        cam.preview_jpeg()
        still = cam.capture()
        cam.preview_jpeg()
        fake = fake_picamera2.instances[0]
        assert [c for c in fake.calls if c[0] in ("configure", "start")] == [("configure", "preview"), ("start",)]
        assert ("still_config", {"size": SENSOR, "format": PIXEL_FORMAT}) in fake.calls
        assert ("preview_config", {"size": (160, 120), "format": PIXEL_FORMAT}) in fake.calls
        assert ("switch_mode_and_capture_array", "still", "main") in fake.calls
    # full sensor resolution, RGB order passed through, uint8
    assert still.shape == (SENSOR[1], SENSOR[0], 3) and still.dtype == np.uint8
    assert still[0, 0].tolist() == [200, 0, 0]
    assert fake.calls[-2:] == [("stop",), ("close",)]
    assert len(fake_picamera2.instances) == 1  # one device for the whole life of the backend


def test_picamera2_preview_is_a_small_jpeg(fake_picamera2):
    cam = Picamera2Camera(preview_size=(160, 120))
    try:
        img = Image.open(io.BytesIO(cam.preview_jpeg()))
        assert img.format == "JPEG" and img.size == (160, 120)
    finally:
        cam.close()
    cam.close()  # idempotent
    with pytest.raises(CameraError, match="closed"):
        cam.capture()


def test_picamera2_failures_are_camera_errors(fake_picamera2):
    fake_picamera2.fail_on_open = True
    with pytest.raises(CameraError, match="no Raspberry Pi camera"):
        Picamera2Camera()
    fake_picamera2.fail_on_open = False
    cam = Picamera2Camera()
    fake_picamera2.fail_on_capture = True
    with pytest.raises(CameraError, match="timed out"):
        cam.capture()
    cam.close()


def test_picamera2_missing_module_says_how_to_install(monkeypatch):
    _no_picamera2(monkeypatch)
    with pytest.raises(CameraError) as info:
        Picamera2Camera()
    assert "python3-picamera2" in info.value.user_message()


def test_auto_picks_picamera2_when_present(fake_picamera2):
    camera, status = open_camera("auto")
    try:
        assert status.backend == "picamera2" and status.available and camera is not None
    finally:
        camera.close()


def test_auto_falls_back_to_upload_mode_with_reasons(monkeypatch):
    _no_picamera2(monkeypatch)
    monkeypatch.setitem(sys.modules, "cv2", None)  # make sure: no OpenCV either
    camera, status = open_camera("auto")
    assert camera is None and not status.available
    names = [name for name, _ in status.attempts]
    assert names == ["picamera2", "opencv"]
    assert "picamera2 is not installed" in status.reason and "OpenCV (cv2) is not installed" in status.reason
    assert status.to_dict()["mode"] == "upload"


def test_explicit_backend_failure_is_upload_mode_not_a_crash(tmp_path, fake_picamera2):
    fake_picamera2.fail_on_open = True
    camera, status = open_camera("picamera2")
    assert camera is None and "no Raspberry Pi camera" in status.reason
    camera, status = open_camera(f"replay:{tmp_path}")  # empty folder
    assert camera is None and "holds no images" in status.reason
    camera, status = open_camera("none")
    assert camera is None and status.reason == "no camera requested (--camera none)"


# -- replay -----------------------------------------------------------------
def test_replay_loops_over_the_folder_through_load_image(replay_dir):
    cam = ReplayCamera(replay_dir)
    files = sorted(p for p in replay_dir.iterdir())
    frames = [cam.capture() for _ in range(len(files) + 1)]
    for frame, path in zip(frames, files):
        np.testing.assert_array_equal(frame, load_image(path))
    np.testing.assert_array_equal(frames[-1], frames[0])  # looped
    assert Image.open(io.BytesIO(cam.preview_jpeg())).format == "JPEG"


def test_replay_unreadable_image_is_a_camera_error(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    cam = ReplayCamera(tmp_path)
    with pytest.raises(CameraError, match="replay image unreadable"):
        cam.capture()


# -- broadcaster --------------------------------------------------------------
class CountingCamera:
    """A real (non-mock) tiny camera: numbered solid-colour frames, counts reads."""

    name = "counting"

    def __init__(self) -> None:
        self.reads = 0
        self.reader_threads: set[str] = set()
        self.lock = threading.Lock()

    def capture(self) -> np.ndarray:
        return np.zeros((8, 8, 3), np.uint8)

    def preview_jpeg(self) -> bytes:
        with self.lock:
            self.reads += 1
            self.reader_threads.add(threading.current_thread().name)
            n = self.reads
        out = io.BytesIO()
        Image.new("RGB", (16, 16), (n % 256, 0, 0)).save(out, format="JPEG")
        return out.getvalue()

    def close(self) -> None:
        pass


def _read_parts(stream, n: int) -> list[bytes]:
    parts = []
    for part in stream:
        header, _, body = part.partition(b"\r\n\r\n")
        assert header.startswith(b"--frame\r\nContent-Type: image/jpeg")
        parts.append(body[:-2])
        if len(parts) == n:
            break
    return parts


def test_broadcaster_serves_many_viewers_from_one_producer():
    camera = CountingCamera()
    hub = FrameBroadcaster(camera, fps=30, max_viewers=3)
    streams = [hub.mjpeg() for _ in range(3)]
    with pytest.raises(CameraError, match="too many live previews"):
        hub.mjpeg()
    results: list[list[bytes]] = [[] for _ in streams]
    threads = [threading.Thread(target=lambda i=i: results[i].extend(_read_parts(streams[i], 5))) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=20)
    assert all(len(r) == 5 for r in results)
    for frames in results:
        assert all(Image.open(io.BytesIO(f)).format == "JPEG" for f in frames)
    # Viewers never touch the camera: every read came from the one producer thread.
    assert camera.reader_threads == {"mjpeg-producer"}
    for s in streams:
        s.close()  # viewers leave: slots are freed
    assert hub.viewers == 0
    again = hub.mjpeg()
    assert len(_read_parts(again, 1)) == 1
    hub.close()
    assert list(again) == []  # closing ends open streams
