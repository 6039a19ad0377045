"""The station's scale (issue 15): calibration page + API, persistence, results that record their scale,
the tile map, retakes, the live focus score, the stage-micrometer estimator and the storage migration.

Real parts throughout: the session's tiny bundle on a real LiteRT interpreter (once as shipped, with no
training scale, and once told its training images were 0.5 um/px so captures are tiled), real images
of camera size where they are uploaded, the Flask app with its real security layer.
"""
from __future__ import annotations

import csv
import io
import json
import logging
import math
import sqlite3
import time

import numpy as np
import pytest
from PIL import Image

from app_helpers import CLASSES, csrf_from, jpeg_bytes, png_bytes
from bundle_factory import draw_cell, scaled_bundle_copy

pytest_plugins = ["app_fixtures"]  # shared fixtures, registered once per session

TOKEN = "scale-test-token-0123456789"
#: The tiny bundle's training images are 64 px draw_cell fields; told they are 0.5 um/px, one model
#: input (32 px) covers 32 um, so a capture at 0.25 um/px is cut into tiles of 128 capture pixels.
TRAIN_UM = 0.5


# -- images -------------------------------------------------------------------------------------
def ruling(width: int, height: int, period: float, angle_deg: float = 0.0, *, seed: int = 0,
           noise: float = 6.0) -> np.ndarray:
    """A stage micrometer image: dark lines ``period`` px apart at ``angle_deg`` (0 = horizontal lines),
    longer ticks every 5th and 10th division, vignetting, sensor noise. uint8 RGB."""
    rng = np.random.default_rng(seed)
    th = math.radians(angle_deg)
    xs = np.arange(width, dtype=np.float32)[None, :]
    ys = np.arange(height, dtype=np.float32)[:, None]
    across = xs * np.float32(-math.sin(th)) + ys * np.float32(math.cos(th))  # along the lines' normal
    along = xs * np.float32(math.cos(th)) + ys * np.float32(math.sin(th))
    k = np.round(across / period)
    line = np.exp(-0.5 * ((across - k * period) / 1.3) ** 2)
    half = np.where(k % 10 == 0, 0.45, np.where(k % 5 == 0, 0.35, 0.25)) * min(width, height)
    line *= np.abs(along - float(along.mean())) < half
    img = 235.0 - 170.0 * line
    img *= 1 - 0.25 * (((xs - width / 2) / width) ** 2 + ((ys - height / 2) / height) ** 2)
    img += rng.normal(0, noise, img.shape).astype(np.float32)
    grey = np.clip(img, 0, 255).astype(np.uint8)
    return np.repeat(grey[:, :, None], 3, axis=2)


def mosaic(seed: int = 3, side: int = 256) -> np.ndarray:
    """Four training-style fields (one per class) as one 2x2 capture, resized to ``side`` px.

    At ``side`` = 256 it is 0.25 um/px for the scaled classifier (each field 128 px = 32 um).
    """
    rng = np.random.default_rng(seed)
    cells = [draw_cell(label, rng, 64) for label in CLASSES]
    grid = np.vstack([np.hstack(cells[:2]), np.hstack(cells[2:])])
    return np.asarray(Image.fromarray(grid).resize((side, side), Image.Resampling.BILINEAR))


def _json(client, method: str, path: str, body=None, **kw):
    data = body if isinstance(body, (str, bytes)) else json.dumps(body)
    return client.open(path, method=method, data=data, content_type="application/json", **kw)


def _upload_scale(client, image: bytes, name: str = "ruler.jpg", **fields):
    data = {k: str(v) for k, v in fields.items()}
    data["image"] = (io.BytesIO(image), name)
    return client.post("/api/scale", data=data, content_type="multipart/form-data")


def _classify(client, data: bytes, name: str = "field.png", **fields):
    form = {k: str(v) for k, v in fields.items()}
    form["image"] = (io.BytesIO(data), name)
    return client.post("/api/classify", data=form, content_type="multipart/form-data")


def _scale_file(app):
    return app.extensions["leukoedge"].config.data_dir / "scale.json"


# -- fixtures -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def scaled_bundle(tiny_bundle, tmp_path_factory):
    """A copy of the tiny bundle whose spec says its 64 px training fields were 0.5 um/px.

    Its quality thresholds are stated here, not the ones convert fitted on the session's tiny
    training images: those move with the training seed, and at LEUKOEDGE_TEST_SEED=1 the
    fitted focus limit (14.6) sat above this file's 2x2 mosaic (14.0-14.7), so a sharp capture
    came back "out of focus". A featureless field scores ~0 and still fails this limit.
    """
    quality = {"min_focus": 5.0, "max_clipped_high": 0.5, "max_clipped_low": 0.25, "min_white_cell_fraction": 0.0,
               "min_brightness": 0.52, "field_size": [32, 32], "n_images": 64}
    return scaled_bundle_copy(tiny_bundle, tmp_path_factory.mktemp("scaled") / "bundle", TRAIN_UM, (64, 64),
                              extra={"quality": quality})


@pytest.fixture(scope="module")
def scaled_classifier(scaled_bundle):
    from leukoedge.runtime import Classifier, load_bundle

    return Classifier(load_bundle(scaled_bundle), num_threads=1, edgetpu="off")


@pytest.fixture
def make_scaled_app(tmp_path, scaled_classifier, scaled_bundle):
    from leukoedge.edge_app import AppConfig, create_app
    from leukoedge.edge_app.camera import open_camera

    apps = []

    def factory(camera: str = "none", **overrides):
        overrides.setdefault("data_dir", tmp_path / "scaled-data")
        config = AppConfig(bundle=scaled_bundle, camera=camera, secret_key=b"y" * 32, **overrides)
        cam, status = open_camera(camera)
        app = create_app(config, classifier=scaled_classifier, camera=cam, camera_status=status)
        apps.append(app)
        return app

    yield factory
    for app in apps:
        app.extensions["leukoedge"].close()


# -- the micrometer estimator ----------------------------------------------------------------------
@pytest.mark.parametrize("size,period,angle", [
    ((640, 480), 23.7, 0.0),
    ((640, 480), 23.7, 3.5),
    ((640, 480), 11.1, 88.0),      # vertical lines, nearly
    ((640, 480), 6.3, -2.0),       # fine lines: the 2nd harmonic is nearly as strong as the division
    ((1014, 760), 61.9, -4.0),     # coarse: 12 divisions in view
])
def test_micrometer_spacing_and_angle_are_measured(size, period, angle):
    from leukoedge.edge_app.micrometer import measure_ruling

    m = measure_ruling(ruling(*size, period, angle))
    assert m.period_px == pytest.approx(period, rel=0.005)
    assert abs((m.angle_deg - angle + 90) % 180 - 90) < 0.6
    assert m.divisions > 4 and m.regularity > 0.25


@pytest.mark.parametrize("case", ["noise", "blank", "smear", "edge", "two-lines"])
def test_images_without_a_ruling_are_refused(case):
    from leukoedge.edge_app.micrometer import measure_ruling
    from leukoedge.errors import ScaleError

    rng = np.random.default_rng(5)
    images = {
        "noise": lambda: rng.integers(0, 256, (480, 640, 3), dtype=np.uint8),
        "blank": lambda: np.full((480, 640, 3), 210, np.uint8),
        "smear": lambda: np.asarray(Image.fromarray(mosaic()).resize((640, 480))),
        "edge": lambda: np.repeat(np.where(np.arange(640) > 300, 200, 60).astype(np.uint8)[None, :, None],
                                  480, 0).repeat(3, 2),
        "two-lines": lambda: ruling(640, 480, 400.0),  # spacing wider than the view allows
    }
    with pytest.raises(ScaleError) as err:
        measure_ruling(images[case]())
    assert "ruling" in err.value.message or "contrast" in err.value.message or "divisions" in err.value.message


# -- calibration API round-trips ----------------------------------------------------------------------
def test_typed_scale_round_trip_header_health_and_restart(make_app, caplog):
    app = make_app()
    client = app.test_client()
    assert client.get("/api/scale").json["calibrated"] is False
    assert "Scale: not calibrated — estimated per capture" in client.get("/").get_data(as_text=True)

    r = _json(client, "POST", "/api/scale", {"um_per_px": 0.08})
    assert r.status_code == 201, r.json
    assert r.json["um_per_px"] == 0.08 and r.json["method"] == "typed" and r.json["calibrated"] is True
    today = time.strftime("%Y-%m-%d", time.gmtime())
    assert r.json["description"] == f"Scale: 0.08 um/px (typed in on {today})"
    assert client.get("/api/health").json["scale"]["um_per_px"] == 0.08
    for path in ("/", "/upload", "/history", "/scale"):
        assert f"Scale: 0.08 um/px (typed in on {today})" in client.get(path).get_data(as_text=True), path
    saved = json.loads(_scale_file(app).read_text())
    assert saved["um_per_px"] == 0.08 and saved["method"] == "typed"

    app.extensions["leukoedge"].close()
    with caplog.at_level(logging.INFO, logger="leukoedge.edge_app.calibration"):
        again = make_app().test_client()  # same data folder: a restart
    assert "re-applied" in caplog.text and "0.08" in caplog.text
    assert again.get("/api/scale").json["um_per_px"] == 0.08

    r = again.delete("/api/scale")
    assert r.status_code == 200 and r.json["forgotten"] is True and r.json["calibrated"] is False
    assert not _scale_file(app).exists()
    assert make_app().test_client().get("/api/scale").json["calibrated"] is False


def test_micrometer_upload_of_a_rotated_12mp_frame(make_app):
    """A Pi HQ frame (4056x3040 JPEG) of a 10 um ruling, 3.5 degrees off, at 0.0797 um/px."""
    app = make_app()
    period = 125.4  # 10 um divisions at 0.0797 um/px
    half = ruling(2028, 1520, period / 2, 3.5, seed=2)  # drawn at half size (fast), then scaled up exactly 2x
    data = jpeg_bytes(np.asarray(Image.fromarray(half).resize((4056, 3040), Image.Resampling.BILINEAR)), quality=90)
    assert len(data) > 1_000_000
    r = _upload_scale(app.test_client(), data, method="micrometer", division_um=10)
    assert r.status_code == 201, r.json
    cal = r.json["calibration"]
    assert cal["um_per_px"] == pytest.approx(10 / period, rel=0.005)
    assert cal["method"] == "micrometer" and cal["details"]["source"] == "upload"
    assert cal["details"]["division_px"] == pytest.approx(period, rel=0.005)
    assert (cal["details"]["width"], cal["details"]["height"]) == (4056, 3040)
    assert cal["details"]["measured_width"] < 4056  # decoded reduced, measured in full-resolution pixels
    assert abs(cal["details"]["angle_deg"] - 3.5) < 0.6
    assert "calibrated from a stage micrometer on" in r.json["description"]


def test_micrometer_from_the_camera(make_app, tmp_path):
    """No file: the camera's still is measured (a replay camera showing a 1014x760 ruling PNG)."""
    folder = tmp_path / "ruler"
    folder.mkdir()
    Image.fromarray(ruling(1014, 760, 23.7, -1.5)).save(folder / "ruler.png")
    client = make_app(camera=f"replay:{folder}").test_client()
    r = _json(client, "POST", "/api/scale", {"method": "micrometer", "division_um": 2})
    assert r.status_code == 201, r.json
    assert r.json["um_per_px"] == pytest.approx(2 / 23.7, rel=0.005)
    assert r.json["calibration"]["details"]["source"] == "camera"


def test_field_calibration_from_red_cells_of_a_12mp_frame(make_app):
    """Method "field": a 4056x3040 JPEG with ~90 px red cells, decoded at half size for the measurement,
    gives what the estimator gives on the full frame, in full-resolution pixels."""
    scale = pytest.importorskip("leukoedge.scale", reason="leukoedge.scale (red-cell estimator) not present")
    half = _red_cell_field(np.random.default_rng(4), 2028, 1520, diameter_px=45.0)
    field = np.asarray(Image.fromarray(half).resize((4056, 3040), Image.Resampling.BILINEAR))
    data = jpeg_bytes(field, 90)
    expected = scale.estimate_scale(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")), rbc_um=7.5)
    client = make_app().test_client()
    r = _upload_scale(client, data, "field.jpg", method="field", rbc_um=7.5)
    assert r.status_code == 201, r.json
    assert r.json["um_per_px"] == pytest.approx(expected.um_per_px, rel=0.03)
    assert r.json["um_per_px"] == pytest.approx(7.5 / 90.0, rel=0.15)  # the drawn cells, within the estimator's model
    details = r.json["calibration"]["details"]
    assert details["measured_width"] == 2028 and details["width"] == 4056
    assert details["rbc_diameter_px"] == pytest.approx(expected.rbc_diameter_px, rel=0.03)
    assert details["n_cells"] >= 5 and details["rbc_um"] == 7.5
    assert "calibrated from the red cells of a field" in r.json["description"]


def test_field_calibration_without_red_cells_stores_nothing(make_app):
    pytest.importorskip("leukoedge.scale", reason="leukoedge.scale (red-cell estimator) not present")
    app = make_app()
    r = _upload_scale(app.test_client(), png_bytes(np.full((760, 1014, 3), 228, np.uint8)), "blank.png",
                      method="field")
    assert r.status_code == 422 and r.json["error"]["message"]
    assert not _scale_file(app).exists()


def _red_cell_field(rng, width: int, height: int, diameter_px: float) -> np.ndarray:
    """A thin smear: red cells (tapering rim, central pallor) on a jittered hexagonal grid, not touching."""
    img = np.empty((height, width, 3), np.float32)
    img[...] = (238, 228, 232)
    r = diameter_px / 2
    pad = int(r + 4)
    yy, xx = np.mgrid[-pad:pad + 1, -pad:pad + 1].astype(np.float32)
    dist = np.hypot(yy, xx)
    cell = np.clip((r - dist) / (0.12 * r), 0, 1)[..., None]           # rim tapering over ~12 % of the radius
    pallor = np.clip((0.4 * r - dist) / (0.15 * r), 0, 1)[..., None]
    colour = np.array([205, 120, 130], np.float32) * (1 - pallor) + np.array([224, 172, 178], np.float32) * pallor
    step = 2.5 * r
    for row, y in enumerate(np.arange(pad, height - pad, step * 0.87)):
        for x in np.arange(pad + (step / 2 if row % 2 else 0), width - pad, step):
            if rng.random() < 0.15:
                continue  # gaps, as in a real smear
            cy, cx = (int(round(v + rng.uniform(-0.12, 0.12) * r)) for v in (y, x))
            cy, cx = min(max(cy, pad), height - pad - 1), min(max(cx, pad), width - pad - 1)
            patch = img[cy - pad:cy + pad + 1, cx - pad:cx + pad + 1]
            patch[...] = patch * (1 - cell) + colour * cell
    img += rng.normal(0, 3, img.shape).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


# -- bad input stores nothing -----------------------------------------------------------------------
BAD_JSON = {
    "negative": ({"um_per_px": -0.1}, 422),
    "zero": ({"um_per_px": 0}, 422),
    "absurd": ({"um_per_px": 5000}, 422),
    "text": ({"um_per_px": "a lot"}, 422),
    "boolean": ({"um_per_px": True}, 422),
    "nan": ('{"um_per_px": NaN}', 422),
    "not-an-object": ("[0.08]", 400),
    "broken-json": ('{"um_per_px": ', 400),
    "unknown-field": ({"um_per_px": 0.08, "zoom": 2}, 400),
    "unknown-method": ({"method": "guess"}, 400),
    "micrometer-without-division": ({"method": "micrometer"}, 400),
    "absurd-division": ({"method": "micrometer", "division_um": -10}, 422),
    "typed-and-method": ({"method": "field", "um_per_px": 0.1}, 400),
    "field-without-camera": ({"method": "field"}, 503),
    "upload-without-file": ({"method": "micrometer", "division_um": 10, "source": "upload"}, 400),
}


@pytest.mark.parametrize("case", sorted(BAD_JSON))
def test_bad_calibration_requests_are_clear_4xx_and_keep_the_old_one(make_app, case):
    app = make_app()
    client = app.test_client()
    assert _json(client, "POST", "/api/scale", {"um_per_px": 0.1}).status_code == 201
    before = _scale_file(app).read_bytes()
    body, status = BAD_JSON[case]
    r = _json(client, "POST", "/api/scale", body)
    assert r.status_code == status, r.json
    assert r.json["error"]["message"]
    assert _scale_file(app).read_bytes() == before
    assert client.get("/api/scale").json["um_per_px"] == 0.1


@pytest.mark.parametrize("case", ["smear", "corrupt", "blank"])
def test_bad_calibration_images_store_nothing(make_app, case):
    app = make_app()
    client = app.test_client()
    images = {
        "smear": (jpeg_bytes(np.asarray(Image.fromarray(mosaic()).resize((1014, 760)))), 422, "ruling"),
        "corrupt": (b"\xff\xd8\xff\xe0 not a JPEG at all", 400, ""),
        "blank": (png_bytes(np.full((760, 1014, 3), 200, np.uint8)), 422, "contrast"),
    }
    data, status, words = images[case]
    r = _upload_scale(client, data, method="micrometer", division_um=10)
    assert r.status_code == status, r.json
    assert words in r.json["error"]["message"]
    assert not _scale_file(app).exists()
    assert client.get("/api/scale").json["calibrated"] is False


def test_an_implausible_measurement_is_refused(make_app):
    """A real ruling, but a division length that makes no camera's pixel size: nothing saved."""
    app = make_app()
    r = _upload_scale(app.test_client(), png_bytes(ruling(640, 480, 8.0)), method="micrometer", division_um=900)
    assert r.status_code == 422 and "no microscope camera" in r.json["error"]["message"]
    assert not _scale_file(app).exists()


def test_oversized_calibration_upload_is_413(make_app):
    app = make_app(max_upload_bytes=64 * 1024)
    data = png_bytes(np.random.default_rng(0).integers(0, 256, (400, 400, 3), dtype=np.uint8))
    assert len(data) > 64 * 1024
    r = _upload_scale(app.test_client(), data, method="micrometer", division_um=10)
    assert r.status_code == 413 and not _scale_file(app).exists()


def test_damaged_calibration_file_is_logged_and_the_station_runs_uncalibrated(make_app, tmp_path, caplog):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "scale.json").write_text('{"version": 1, "um_per_px": -3, "method": "typed"}')
    with caplog.at_level(logging.ERROR, logger="leukoedge.edge_app.calibration"):
        client = make_app().test_client()
    assert "could not be read" in caplog.text
    body = client.get("/api/scale").json
    assert body["calibrated"] is False and "could not be read" in body["load_error"]
    assert "could not be read" in client.get("/scale").get_data(as_text=True)


# -- security ---------------------------------------------------------------------------------------
def test_scale_api_and_forms_follow_the_token_csrf_origin_and_host_rules(make_app):
    app = make_app(host="0.0.0.0", token=TOKEN)
    client = app.test_client()
    auth = {"Authorization": f"Bearer {TOKEN}"}
    assert _json(client, "POST", "/api/scale", {"um_per_px": 0.08}).status_code == 401
    assert client.get("/api/scale").status_code == 401
    assert client.delete("/api/scale").status_code == 401
    assert client.get("/scale").status_code == 302  # to the login page
    assert not _scale_file(app).exists()
    assert _json(client, "POST", "/api/scale", {"um_per_px": 0.08}, headers=auth).status_code == 201

    client.get(f"/scale?token={TOKEN}")  # log in: session cookie
    page = client.get("/scale")
    token = csrf_from(page.data)
    # cookie-authenticated API calls need the CSRF header; forms need the field; foreign origins never pass
    assert _json(client, "POST", "/api/scale", {"um_per_px": 0.2}).status_code == 403
    assert client.delete("/api/scale").status_code == 403
    assert client.post("/scale", data={"method": "typed", "um_per_px": "0.2"}).status_code == 403
    assert client.post("/scale", data={"method": "typed", "um_per_px": "0.2", "csrf_token": token},
                       headers={"Origin": "http://evil.example"}).status_code == 403
    assert client.post("/scale/forget", data={}).status_code == 403
    assert client.get("/api/scale").json["um_per_px"] == 0.08
    r = client.post("/scale", data={"method": "typed", "um_per_px": "0.2", "csrf_token": token})
    assert r.status_code == 303 and client.get("/api/scale").json["um_per_px"] == 0.2
    r = _json(client, "POST", "/api/scale", {"um_per_px": 0.3}, headers={"X-CSRF-Token": token})
    assert r.status_code == 201
    # DNS rebinding: another site's name pointed at this station gets nothing
    r = client.get("/api/scale", headers={**auth, "Host": "evil.example"})
    assert r.status_code == 403


def test_scale_page_forms_save_and_forget(make_app):
    client = make_app().test_client()
    page = client.get("/scale")
    assert page.status_code == 200 and b"Not calibrated" in page.data
    token = csrf_from(page.data)
    r = client.post("/scale", data={"method": "typed", "um_per_px": "0.35", "csrf_token": token})
    assert r.status_code == 303 and r.headers["Location"].endswith("/scale?saved=1")
    page = client.get("/scale?saved=1").get_data(as_text=True)
    assert 'id="scale-value">0.35<' in page and "Calibration saved" in page
    bad = client.post("/scale", data={"method": "typed", "um_per_px": "-1", "csrf_token": token})
    assert bad.status_code == 422 and b"Nothing was stored" in bad.data and b"back-to-scale" in bad.data
    r = client.post("/scale", data={"method": "micrometer", "division_um": "10", "csrf_token": token,
                                    "image": (io.BytesIO(png_bytes(ruling(640, 480, 20.0, 2.0))), "r.png"),
                                    "source": "upload"}, content_type="multipart/form-data")
    assert r.status_code == 303
    assert client.get("/api/scale").json["um_per_px"] == pytest.approx(0.5, rel=0.005)
    assert client.post("/scale/forget", data={"csrf_token": token}).status_code == 303
    assert client.get("/api/scale").json["calibrated"] is False


# -- results record their scale -----------------------------------------------------------------------
def test_results_of_a_model_without_training_scale_say_so(make_app, classifier):
    """The shipped tiny bundle records no scale: whole frame stretched, one tile, and the result says it."""
    app = make_app()
    client = app.test_client()
    assert _json(client, "POST", "/api/scale", {"um_per_px": 0.08}).status_code == 201
    data = png_bytes(draw_cell("Early", np.random.default_rng(1), 64))
    r = _classify(client, data)
    assert r.status_code == 201, r.json
    body = r.json
    expected = classifier.classify(data, um_per_px=0.08).to_dict()
    assert body["scale_source"] == expected["scale_source"] == "bundle-unknown"
    assert body["um_per_px"] is None
    assert "0.08 um/px was not used" in body["scale_message"]
    assert "0.08 um/px came from the station's calibration (typed in on" in body["scale_message"]
    assert [t["box"] for t in body["tiles"]] == [[0, 0, 64, 64]] and body["tiles"][0]["used"] is True
    assert body["aggregation"] == expected["aggregation"]
    assert body["predicted"] == expected["predicted"]
    page = client.get(body["urls"]["page"]).get_data(as_text=True)
    assert "does not record its training scale" in page
    assert "this model has no training scale" in client.get("/").get_data(as_text=True)


@pytest.mark.parametrize("how", ["calibration", "request"])
def test_a_scaled_model_tiles_at_the_given_scale_and_stores_the_boxes(make_scaled_app, scaled_classifier, how):
    """A 1024x1024 JPEG at 0.0625 um/px: decoded reduced, tiled 2x2, boxes stored in full-resolution pixels."""
    app = make_scaled_app()
    client = app.test_client()
    data = jpeg_bytes(mosaic(side=1024), quality=92)
    if how == "calibration":
        assert _json(client, "POST", "/api/scale", {"um_per_px": 0.0625}).status_code == 201
        r = _classify(client, data, "field.jpg")
    else:
        assert _json(client, "POST", "/api/scale", {"um_per_px": 0.5}).status_code == 201  # overridden below
        r = _classify(client, data, "field.jpg", um_per_px=0.0625)
    assert r.status_code == 201, r.json
    body = r.json
    expected = scaled_classifier.classify(data, um_per_px=0.0625).to_dict()
    assert body["scale_source"] == "given" and body["um_per_px"] == pytest.approx(0.0625)
    assert [t["box"] for t in body["tiles"]] == [t["box"] for t in expected["tiles"]] == [
        [0, 0, 512, 512], [512, 0, 512, 512], [0, 512, 512, 512], [512, 512, 512, 512]]
    assert [t["used"] for t in body["tiles"]] == [t["used"] for t in expected["tiles"]]
    assert body["probabilities"] == pytest.approx(expected["probabilities"])
    assert body["predicted"] == expected["predicted"] and body["retake"] == expected["retake"]
    said = "the station's calibration (typed in on" if how == "calibration" else "the request's um_per_px"
    assert body["scale_message"].startswith("from " + said)
    stored = client.get(body["urls"]["self"]).json
    assert stored["tiles"] == body["tiles"] and stored["scale_source"] == "given"
    exported = json.loads(client.get("/export.json").data)["results"][0]
    assert exported["um_per_px"] == pytest.approx(0.0625) and len(exported["tiles"]) == 4
    header, row = client.get("/export.csv").get_data(as_text=True).splitlines()[:2]
    cols = dict(zip(header.split(","), row.split(",")))
    assert cols["scale_source"] == "given" and cols["tiles"] == "4" and float(cols["um_per_px"]) == 0.0625


def test_captures_and_form_uploads_use_the_station_calibration(make_scaled_app, scaled_classifier, tmp_path):
    folder = tmp_path / "replay"
    folder.mkdir()
    field = mosaic()
    Image.fromarray(field).save(folder / "field.png")
    app = make_scaled_app(camera=f"replay:{folder}")
    client = app.test_client()
    assert _json(client, "POST", "/api/scale", {"um_per_px": 0.25}).status_code == 201
    captured = client.post("/api/capture")
    assert captured.status_code == 201, captured.json
    expected = scaled_classifier.classify(field, um_per_px=0.25).to_dict()
    assert captured.json["scale_source"] == "given" and captured.json["um_per_px"] == 0.25
    assert [t["box"] for t in captured.json["tiles"]] == [t["box"] for t in expected["tiles"]]
    assert captured.json["probabilities"] == pytest.approx(expected["probabilities"])
    token = csrf_from(client.get("/upload").data)
    r = client.post("/upload", data={"csrf_token": token, "images": (io.BytesIO(png_bytes(field)), "f.png")},
                    content_type="multipart/form-data")
    assert r.status_code == 303
    stored = app.extensions["leukoedge"].store.page(limit=1)[0]
    assert (stored.scale_source, stored.um_per_px, len(stored.tiles)) == ("given", 0.25, 4)
    assert stored.scale_message.startswith("from the station's calibration (typed in on")


def test_bad_um_per_px_on_classify_is_422_and_stores_nothing(make_scaled_app):
    app = make_scaled_app()
    client = app.test_client()
    data = png_bytes(mosaic())
    for bad in ("-1", "zero", "1e9"):
        r = _classify(client, data, um_per_px=bad)
        assert r.status_code == 422, (bad, r.json)
    r = _classify(client, data, um_per_px=9.0)  # plausible, but this 256 px capture would be >4096 px tiled
    assert r.status_code == 422 and "pixel size" in r.json["error"]["message"]
    assert app.extensions["leukoedge"].store.count() == 0


def test_without_calibration_the_scale_is_estimated_and_says_how(make_scaled_app, scaled_classifier):
    client = make_scaled_app().test_client()
    data = png_bytes(mosaic())
    r = _classify(client, data)
    assert r.status_code == 201, r.json
    expected = scaled_classifier.classify(data).to_dict()
    assert r.json["scale_source"] == expected["scale_source"]
    assert r.json["scale_source"] in ("estimated", "estimate-failed")
    assert r.json["scale_message"] == expected["scale_message"] and r.json["scale_message"]


def test_the_result_page_draws_the_tile_map_and_the_scale(make_scaled_app):
    client = make_scaled_app().test_client()
    r = _classify(client, png_bytes(mosaic()), um_per_px=0.25)
    body = r.json
    page = client.get(body["urls"]["page"]).get_data(as_text=True)
    assert 'id="tile-map" viewBox="0 0 256 256"' in page
    used = sum(t["used"] for t in body["tiles"])
    assert page.count('<rect class="tile used"') == used >= 1
    assert page.count('<rect class="tile unused"') == 4 - used
    assert 'x="128" y="128" width="128" height="128"' in page
    assert "0.25 µm/px, given" in page and 'id="tile-table"' in page
    assert f"{used} of 4 used" in page


def test_retakes_are_stored_as_such_and_filtered(make_scaled_app):
    """An empty, featureless field (no white cell, nothing in focus): retake, no label, its reasons stored,
    its own history filter."""
    app = make_scaled_app()
    client = app.test_client()
    empty = png_bytes(np.full((256, 256, 3), (236, 222, 228), np.uint8))
    r = _classify(client, empty, um_per_px=0.25)
    assert r.status_code == 201, r.json
    body = r.json
    assert body["retake"] is True and body["label"] is None and body["outcome"] == "retake"
    assert body["predicted"] in CLASSES
    reasons = body["quality"]["reasons"]
    assert reasons and set(reasons) <= {"out_of_focus", "no_white_cell", "too_dark", "too_bright"}
    assert body["retake_message"] == body["quality"]["message"] and body["retake_message"].startswith("retake:")
    labelled = _classify(client, png_bytes(mosaic()), um_per_px=0.25).json
    assert labelled["retake"] is False
    store = app.extensions["leukoedge"].store
    assert [x.id for x in store.page(label="retake")] == [body["id"]]
    assert body["id"] not in [x.id for x in store.page(label=body["predicted"])]
    assert (body["id"] in [x.id for x in store.page(label="abstained")]) == body["abstained"]
    listed = client.get("/api/results?label=retake").json
    assert listed["total"] == 1 and listed["items"][0]["retake"] is True
    page = client.get(body["urls"]["page"]).get_data(as_text=True)
    assert "Retake." in page and "no label is given" in page
    history = client.get("/history?label=retake").get_data(as_text=True)
    assert f'class="retake-tag">{body["retake_message"]}<' in history and "1 result(s)" in history
    assert 'value="retake" selected' in history
    rows = list(csv.DictReader(io.StringIO(client.get("/export.csv?label=retake").get_data(as_text=True))))
    assert len(rows) == 1 and rows[0]["retake"] == "1" and rows[0]["label"] == ""
    assert rows[0]["quality_reasons"].split(";") == reasons


# -- storage migration --------------------------------------------------------------------------------
V1_SCHEMA = """
CREATE TABLE results (
    id TEXT PRIMARY KEY, created_at REAL NOT NULL, source TEXT NOT NULL, filename TEXT NOT NULL,
    label TEXT NOT NULL, confidence REAL NOT NULL, abstained INTEGER NOT NULL, ood_score REAL,
    probabilities TEXT NOT NULL, latency_ms REAL NOT NULL, timings TEXT NOT NULL, model_name TEXT NOT NULL,
    model_version TEXT NOT NULL, width INTEGER NOT NULL, height INTEGER NOT NULL, original_ext TEXT NOT NULL,
    has_heatmap INTEGER NOT NULL);
CREATE INDEX results_created ON results (created_at DESC);
CREATE INDEX results_label ON results (label, created_at DESC);
PRAGMA user_version = 1;
"""


def _v1_data_dir(root, n: int = 3) -> list[str]:
    """A data folder as the first release wrote it: schema 1, rows and their image files."""
    images = root / "images"
    images.mkdir(parents=True)
    conn = sqlite3.connect(root / "results.sqlite3")
    conn.executescript(V1_SCHEMA)
    ids = []
    for i in range(n):
        rid = f"{i:032x}"
        ids.append(rid)
        conn.execute("INSERT INTO results VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                     (rid, 1_700_000_000.0 + i, "upload", f"old-{i}.jpg", CLASSES[i % 4], 0.9, int(i == 2), 0.1,
                      json.dumps({c: 0.25 for c in CLASSES}), 5.0, "{}", "tiny", "1", 64, 64, ".jpg", 0))
        jpeg = jpeg_bytes(draw_cell(CLASSES[i % 4], np.random.default_rng(i), 64))
        (images / f"{rid}.jpg").write_bytes(jpeg)
        (images / f"{rid}.thumb.jpg").write_bytes(jpeg)
    conn.commit()
    conn.close()
    return ids


def test_a_schema_1_data_folder_is_migrated_keeping_every_result(tmp_path, caplog):
    from leukoedge.edge_app.storage import SCHEMA_VERSION, ResultStore

    ids = _v1_data_dir(tmp_path)
    with caplog.at_level(logging.INFO, logger="leukoedge.edge_app.storage"):
        store = ResultStore(tmp_path)
    assert f"migrated from schema 1 to {SCHEMA_VERSION} (3 results kept)" in caplog.text
    assert store.recover() == {"tmp_files": 0, "orphan_files": 0, "rows_missing_files": 0}
    conn = sqlite3.connect(tmp_path / "results.sqlite3")
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION >= 2
    conn.close()
    old = store.get(ids[0])
    assert (old.um_per_px, old.scale_source, old.tiles, old.quality, old.retake) == (None, None, (), None, False)
    assert old.to_dict()["label"] == CLASSES[0] and old.to_dict()["outcome"] == "labelled"
    assert store.count(label="abstained") == 1 and store.count() == 3
    new = store.add({"source": "camera", "filename": "new.jpg", "label": "Pro", "confidence": 0.7, "abstained": False,
                     "probabilities": {c: 0.25 for c in CLASSES}, "latency_ms": 1.0, "model_name": "tiny",
                     "model_version": "1", "width": 64, "height": 64, "original_ext": ".jpg", "um_per_px": 0.08,
                     "scale_source": "given", "tiles": [{"box": [0, 0, 64, 64], "used": True}], "retake": True,
                     "quality": {"ok": False, "reasons": ["out_of_focus"], "message": "retake: out of focus"}},
                    {"original": jpeg_bytes(np.zeros((8, 8, 3), np.uint8)), "thumbnail": b"x"})
    again = ResultStore(tmp_path)  # re-opening a migrated folder changes nothing
    assert again.get(new.id) == new and again.get(new.id).retake_message == "retake: out of focus"
    assert again.count() == 4 and again.count(label="retake") == 1
    store.close()
    again.close()


def test_the_app_opens_an_old_data_folder_and_shows_old_results(make_app, tmp_path):
    ids = _v1_data_dir(tmp_path / "data")
    client = make_app().test_client()
    assert client.get("/api/results").json["total"] == 3
    page = client.get(f"/results/{ids[0]}").get_data(as_text=True)
    assert "not recorded (classified before scale was tracked)" in page and 'id="tile-map"' not in page
    assert client.get("/history").status_code == 200


def test_a_database_from_a_newer_version_is_refused(tmp_path):
    from leukoedge.edge_app.storage import ResultStore, StorageError

    _v1_data_dir(tmp_path, n=1)
    conn = sqlite3.connect(tmp_path / "results.sqlite3")
    conn.execute("PRAGMA user_version = 99")
    conn.close()
    with pytest.raises(StorageError, match="newer leukoedge"):
        ResultStore(tmp_path)


# -- live focus score ---------------------------------------------------------------------------------
def test_live_focus_score_falls_when_the_view_blurs_and_is_rate_limited(make_app, tmp_path):
    from PIL import ImageFilter

    folder = tmp_path / "focus"
    folder.mkdir()
    sharp = Image.fromarray(mosaic(side=640))
    sharp.save(folder / "0-sharp.png")
    sharp.filter(ImageFilter.GaussianBlur(4)).save(folder / "1-blurred.png")
    app = make_app(camera=f"replay:{folder}")
    client = app.test_client()
    meter = app.extensions["leukoedge"].focus
    first = client.get("/api/focus")
    assert first.status_code == 200 and first.json["focus"] > 0
    assert max(first.json["frame"]) <= 2 * 320  # scored on a reduced decode of the preview frame
    assert client.get("/api/focus").json["focus"] == first.json["focus"]
    assert meter.computed == 1  # two polls inside the interval: one computation
    assert client.post("/api/capture").status_code == 201  # the replay camera moves on to the blurred view
    time.sleep(0.3)
    blurred = client.get("/api/focus").json
    assert blurred["focus"] < 0.5 * first.json["focus"]
    assert blurred["best_recent"] == first.json["focus"]
    live = client.get("/").get_data(as_text=True)
    assert 'id="focus"' in live and 'data-url="/api/focus"' in live


def test_focus_without_a_camera_is_503(make_app):
    r = make_app().test_client().get("/api/focus")
    assert r.status_code == 503 and r.is_json
