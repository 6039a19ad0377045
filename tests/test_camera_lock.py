"""Locked exposure and white balance: the backends, the saved lock, the API and its access rules, the live page.

picamera2 and cv2 are the fakes of ``camera_fakes`` (the only mocks); the
backends, the lock manager, the app, its security and a real HTTP server driven
by headless Chromium run for real.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import pytest

from leukoedge.edge_app.camera import CameraSettingsUnsupportedError
from leukoedge.edge_app.camera.lock import LOCK_FILE
from leukoedge.edge_app.camera.opencv_backend import OpenCVCamera
from leukoedge.edge_app.camera.picamera2_backend import Picamera2Camera
from leukoedge.edge_app.server import BackgroundServer
from leukoedge.errors import CameraError

from app_helpers import csrf_from
from camera_fakes import (AUTO_COLOUR_GAINS, AUTO_EXPOSURE_US, AUTO_GAIN, CAP_PROP_AUTO_EXPOSURE, CAP_PROP_AUTO_WB,
                          CAP_PROP_EXPOSURE, CAP_PROP_GAIN, CAP_PROP_WB_TEMPERATURE, EXPOSURE_STEP,
                          install_fake_cv2, install_fake_picamera2)

pytest_plugins = ["app_fixtures"]  # shared fixtures, registered once per session

TOKEN = "camera-lock-token-0123456789"
LOCKED = {"AeEnable": False, "AwbEnable": False, "ExposureTime": AUTO_EXPOSURE_US, "AnalogueGain": AUTO_GAIN,
          "ColourGains": AUTO_COLOUR_GAINS}
SUMMARY = f"exposure {AUTO_EXPOSURE_US} us, gain 2.00, colour gains 1.80/1.50"


@pytest.fixture
def fake_picamera2(monkeypatch):
    return install_fake_picamera2(monkeypatch)


@pytest.fixture
def fake_cv2(monkeypatch):
    return install_fake_cv2(monkeypatch)


def _set_controls(fake) -> list[dict]:
    return [c[1] for c in fake.calls if c[0] == "set_controls"]


# -- picamera2 ----------------------------------------------------------------
def test_picamera2_lock_reads_the_metadata_and_fixes_preview_and_still(fake_picamera2):
    with Picamera2Camera(preview_size=(160, 120)) as cam:
        fake = fake_picamera2.instances[0]
        cam.capture()
        assert fake.still_controls[-1] == {}  # automatic: nothing fixed
        settings = cam.lock_exposure()
        assert settings == {"ExposureTime": AUTO_EXPOSURE_US, "AnalogueGain": AUTO_GAIN,
                            "ColourGains": list(AUTO_COLOUR_GAINS)}
        assert ("capture_metadata",) in fake.calls
        assert _set_controls(fake) == [LOCKED]
        # The still is taken in another configuration, whose controls replace the running ones: it must carry them.
        cam.capture()
        assert fake.still_controls[-1] == LOCKED
        assert fake.controls == LOCKED  # and back in the preview
        assert [fake.capture_metadata()["ExposureTime"] for _ in range(2)] == [AUTO_EXPOSURE_US] * 2

        cam.unlock()
        assert _set_controls(fake)[-1] == {"AeEnable": True, "AwbEnable": True}
        cam.capture()
        assert fake.still_controls[-1] == {"AeEnable": True, "AwbEnable": True}
        drifting = [fake.capture_metadata()["ExposureTime"] for _ in range(2)]
        assert drifting[1] - drifting[0] == EXPOSURE_STEP  # AE runs again


def test_picamera2_apply_settings_validates_and_failures_are_camera_errors(fake_picamera2):
    cam = Picamera2Camera(preview_size=(160, 120))
    fake = fake_picamera2.instances[0]
    cam.apply_settings({"ExposureTime": 5000, "AnalogueGain": 1.5, "ColourGains": [2.0, 1.25]})
    assert _set_controls(fake)[-1] == {**LOCKED, "ExposureTime": 5000, "AnalogueGain": 1.5, "ColourGains": (2.0, 1.25)}
    for bad in ({"ExposureTime": 0, "AnalogueGain": 1.5, "ColourGains": [2.0, 1.25]},
                {"ExposureTime": 5000, "AnalogueGain": 1.5}, {"ExposureTime": "x"}):
        with pytest.raises(CameraError, match="unusable Raspberry Pi camera settings"):
            cam.apply_settings(bad)
    fake_picamera2.advertised = fake_picamera2.advertised - {"ColourGains"}  # a monochrome sensor
    with pytest.raises(CameraError, match="no ColourGains") as info:
        cam.lock_exposure()
    assert "monochrome" in info.value.hint
    with pytest.raises(CameraError, match="not advertised"):
        cam.apply_settings({"ExposureTime": 5000, "AnalogueGain": 1.5, "ColourGains": [2.0, 1.25]})
    cam.close()
    with pytest.raises(CameraError, match="closed"):
        cam.lock_exposure()


# -- OpenCV (V4L2) --------------------------------------------------------------
def test_opencv_lock_switches_to_manual_then_sets_the_values_read(fake_cv2):
    cam = OpenCVCamera(0)
    fake = fake_cv2.instances[0]
    cam.capture(), cam.capture()
    exposure, temperature = fake.props[CAP_PROP_EXPOSURE], fake.props[CAP_PROP_WB_TEMPERATURE]
    fake.sets.clear()
    settings = cam.lock_exposure()
    assert settings == {"exposure": exposure, "gain": 32.0, "wb_temperature": temperature, "api": "V4L2"}
    assert fake.sets == [(CAP_PROP_AUTO_EXPOSURE, 1.0), (CAP_PROP_EXPOSURE, exposure), (CAP_PROP_GAIN, 32.0),
                         (CAP_PROP_AUTO_WB, 0.0), (CAP_PROP_WB_TEMPERATURE, temperature)]
    first, second = cam.capture(), cam.capture()
    assert (first == second).all() and fake.props[CAP_PROP_EXPOSURE] == exposure  # no drift while locked

    cam.unlock()
    assert fake.props[CAP_PROP_AUTO_EXPOSURE] == 3 and fake.props[CAP_PROP_AUTO_WB] == 1  # 3: the UVC "auto"
    cam.capture()
    assert fake.props[CAP_PROP_EXPOSURE] == exposure + 1
    cam.apply_settings(settings)  # what a restart does with the saved lock
    assert (fake.props[CAP_PROP_AUTO_EXPOSURE], fake.props[CAP_PROP_EXPOSURE]) == (1, exposure)
    cam.close()


def test_opencv_without_the_controls_is_unsupported_and_a_refusal_leaves_it_automatic(fake_cv2):
    fake_cv2.missing = frozenset({CAP_PROP_WB_TEMPERATURE})
    cam = OpenCVCamera(0)
    with pytest.raises(CameraSettingsUnsupportedError, match="no white-balance temperature control"):
        cam.lock_exposure()
    assert fake_cv2.instances[0].sets == []  # nothing touched
    cam.close()

    fake_cv2.missing, fake_cv2.refuse = frozenset({CAP_PROP_GAIN}), frozenset({CAP_PROP_AUTO_WB})
    cam = OpenCVCamera(1)
    fake = fake_cv2.instances[1]
    with pytest.raises(CameraError, match="refused manual white balance") as info:
        cam.lock_exposure()
    assert not isinstance(info.value, CameraSettingsUnsupportedError)
    assert fake.props[CAP_PROP_AUTO_EXPOSURE] == 3  # not left half locked
    assert CAP_PROP_GAIN not in [prop for prop, _ in fake.sets]  # a camera without gain: not set
    cam.close()


# -- the saved lock, through the app -----------------------------------------------
def test_lock_is_saved_and_reapplied_by_the_next_app_then_unlock_forgets_it(make_app, fake_picamera2, tmp_path,
                                                                             caplog):
    first = make_app(camera=Picamera2Camera(preview_size=(160, 120)))
    client = first.test_client()
    assert client.get("/api/camera/settings").json == {
        "supported": True, "locked": False, "saved": False, "backend": "picamera2", "settings": None, "summary": None,
        "locked_at": None, "message": None}
    body = client.post("/api/camera/lock").json
    assert body["locked"] and body["saved"] and body["summary"] == SUMMARY
    saved = json.loads((tmp_path / "data" / LOCK_FILE).read_text())
    assert saved["backend"] == "picamera2" and saved["settings"] == body["settings"]
    assert client.get("/api/health").json["camera"]["lock"]["summary"] == SUMMARY

    caplog.set_level(logging.INFO, logger="leukoedge.edge_app.camera.lock")
    second = make_app(camera=Picamera2Camera(preview_size=(160, 120)))  # a restart: same data folder
    fake = fake_picamera2.instances[1]
    assert _set_controls(fake) == [LOCKED] and ("capture_metadata",) not in fake.calls  # stored values, not new ones
    assert any("re-applied" in r.getMessage() and SUMMARY in r.getMessage() for r in caplog.records)
    client = second.test_client()
    state = client.get("/api/camera/settings").json
    assert state["locked"] and state["settings"] == body["settings"] and state["locked_at"] == saved["locked_at"]

    assert client.post("/api/camera/unlock").json["locked"] is False
    assert _set_controls(fake)[-1] == {"AeEnable": True, "AwbEnable": True}
    assert not (tmp_path / "data" / LOCK_FILE).exists()
    third = make_app(camera=Picamera2Camera(preview_size=(160, 120)))
    assert _set_controls(fake_picamera2.instances[2]) == []
    assert third.test_client().get("/api/health").json["camera"]["lock"]["locked"] is False


def test_a_saved_lock_that_cannot_be_reapplied_is_reported_not_fatal(make_app, replay_dir, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / LOCK_FILE).write_text(json.dumps({
        "format": "leukoedge-camera-lock", "version": 1, "backend": "picamera2", "locked_at": "2026-12-01T10:00:00Z",
        "settings": {"ExposureTime": 8000, "AnalogueGain": 1.0, "ColourGains": [1.9, 1.4]}}))
    client = make_app(camera=f"replay:{replay_dir}").test_client()
    state = client.get("/api/camera/settings").json
    assert not state["locked"] and not state["supported"]
    assert "exposure 8000 us" in state["message"] and "replay camera" in state["message"]
    page = client.get("/").get_data(as_text=True)
    assert "Lock again, or unlock" in page and "camera-forget-button" in page
    assert client.post("/camera/unlock", data={"csrf_token": csrf_from(page)}).status_code == 303
    assert not (data / LOCK_FILE).exists()
    assert "camera-forget-button" not in client.get("/").get_data(as_text=True)

    (data / LOCK_FILE).write_text("{ half a file")
    state = make_app(camera="none").test_client().get("/api/camera/settings").json
    assert "could not be read" in state["message"]


def test_cameras_that_cannot_lock_say_why(make_app, replay_dir):
    client = make_app(camera=f"replay:{replay_dir}").test_client()
    r = client.post("/api/camera/lock")
    assert r.status_code == 409 and r.json["error"]["type"] == "CameraSettingsUnsupportedError"
    assert "stored images" in r.json["error"]["message"]
    page = client.get("/").get_data(as_text=True)
    assert 'id="camera-lock-message"' in page and "stored images" in page
    assert "camera-lock-button" not in page
    r = client.post("/camera/lock", data={"csrf_token": csrf_from(page)})  # the form, if posted anyway
    assert r.status_code == 409 and "stored images" in r.get_data(as_text=True)

    r = make_app(camera="none").test_client().post("/api/camera/lock")
    assert r.status_code == 503 and "upload mode" in r.json["error"]["message"]


def test_lock_endpoints_follow_the_apps_access_rules(make_app, fake_picamera2):
    app = make_app(camera=Picamera2Camera(preview_size=(160, 120)), host="0.0.0.0", token=TOKEN)
    client = app.test_client()
    for method, path in (("post", "/api/camera/lock"), ("post", "/api/camera/unlock"), ("get", "/api/camera/settings")):
        assert getattr(client, method)(path).status_code == 401, path
    assert client.post("/camera/lock").status_code == 401
    assert _set_controls(fake_picamera2.instances[0]) == []  # nothing reached the camera

    bearer = {"Authorization": f"Bearer {TOKEN}"}
    assert client.post("/api/camera/lock", headers=bearer).json["locked"]
    assert client.post("/api/camera/unlock", headers=bearer).json["locked"] is False

    client.get(f"/?token={TOKEN}")  # a browser session (cookie)
    assert client.post("/api/camera/lock").status_code == 403  # no X-CSRF-Token
    csrf = csrf_from(client.get("/").data)
    assert client.post("/api/camera/lock", headers={"X-CSRF-Token": csrf}).status_code == 200
    assert client.post("/camera/unlock", data={}).status_code == 403  # form without its CSRF field
    assert client.post("/camera/unlock", data={"csrf_token": csrf},
                       headers={"Origin": "http://evil.example"}).status_code == 403
    r = client.post("/camera/unlock", data={"csrf_token": csrf})
    assert r.status_code == 303 and r.headers["Location"] == "/"
    assert client.get("/api/camera/settings").json["locked"] is False


# -- the live page in Chromium ---------------------------------------------------------
@pytest.mark.browser
def test_live_page_locks_and_unlocks_in_chromium(make_app, fake_picamera2):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("Debian chromium is not installed")
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
    from test_browser import CHROMIUM_ARGS

    app = make_app(camera=Picamera2Camera(preview_size=(160, 120)))
    with BackgroundServer(app, app.extensions["leukoedge"].config) as srv, sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS, headless=True)
        page = browser.new_page()
        page.goto(srv.url + "/")
        page.get_by_role("button", name="Lock exposure and white balance").click()
        state = page.locator("#camera-lock-state")
        state.wait_for(timeout=20_000)
        assert state.inner_text() == f"Exposure and white balance locked ({SUMMARY})"
        assert fake_picamera2.instances[0].controls == LOCKED
        if os.environ.get("LEUKOEDGE_SCREENSHOT_DIR"):
            page.screenshot(path=str(Path(os.environ["LEUKOEDGE_SCREENSHOT_DIR"]) / "live-locked.png"), full_page=True)
        page.get_by_role("button", name="Unlock").click()
        page.locator("#camera-lock-button").wait_for(timeout=20_000)
        assert app.extensions["leukoedge.camera_lock"].state()["locked"] is False
        browser.close()
