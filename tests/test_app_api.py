"""JSON API against a real bundle and a real LiteRT interpreter (Flask test client).

Also: bad input of every kind gives a clear 4xx, stores nothing and the app
keeps serving; property-based fuzzing of the upload endpoint (zero 5xx); and N
concurrent clients on a real waitress server all get the serial answers.
"""
from __future__ import annotations

import csv
import io
import json
import re
import threading
import urllib.error
import urllib.request
import uuid

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from leukoedge.edge_app.server import BackgroundServer
from leukoedge.preprocess import load_image

from app_helpers import CLASSES, jpeg_bytes, png_bytes
from bundle_factory import draw_cell

pytest_plugins = ["app_fixtures"]  # shared fixtures, registered once per session


def _cell(label: str = "Early", seed: int = 0, size: int = 64) -> np.ndarray:
    return draw_cell(label, np.random.default_rng(seed), size)


def _post_image(client, data: bytes, name: str = "cell.png", field: str = "image"):
    return client.post("/api/classify", data={field: (io.BytesIO(data), name)}, content_type="multipart/form-data")


def _stored(app) -> tuple[int, int]:
    store = app.extensions["leukoedge"].store
    return store.count(), len(list(store.images_dir.iterdir()))


# -- happy path ---------------------------------------------------------------
def test_classify_matches_the_runtime_and_is_stored(app, client, classifier):
    data = png_bytes(_cell("Pro", 1))
    r = _post_image(client, data)
    assert r.status_code == 201, r.json
    body = r.json
    expected = classifier.classify(data)
    assert body["predicted"] == expected.label
    assert body["label"] == expected.to_dict()["label"]  # None when abstained or a retake
    assert body["retake"] == expected.retake
    assert body["probabilities"] == pytest.approx(expected.probabilities)
    assert body["abstained"] == expected.abstained and body["confidence"] == pytest.approx(expected.confidence)
    assert set(body["probabilities"]) == set(CLASSES)
    assert body["latency_ms"] > 0 and uuid.UUID(hex=body["id"])
    assert body["model"] == {"name": classifier.info()["model"], "version": classifier.info()["version"]}
    # stored: JSON, original bytes verbatim (PNG kept), heatmap + thumbnail decodable
    assert client.get(body["urls"]["self"]).json["predicted"] == body["predicted"]
    assert client.get(body["urls"]["original"]).data == data
    for kind in ("heatmap", "thumbnail"):
        img = client.get(body["urls"][kind])
        assert img.status_code == 200 and img.mimetype == "image/jpeg"
        assert Image.open(io.BytesIO(img.data)).format == "JPEG"


@pytest.mark.parametrize("mode", ["RGBA", "L", "I;16", "LA", "P", "CMYK"])
def test_unusual_but_valid_modes_classify(client, classifier, mode):
    rgb = _cell("Pre", 2)
    if mode == "I;16":
        img = Image.fromarray(rgb[..., 0].astype(np.uint16) * 257)
        assert img.mode == "I;16"
    elif mode == "CMYK":
        img = Image.fromarray(rgb).convert("CMYK")
    else:
        img = Image.fromarray(rgb).convert(mode)
    buf = io.BytesIO()
    img.save(buf, format="TIFF" if mode == "CMYK" else "PNG")
    r = _post_image(client, buf.getvalue(), name=f"x.{mode}")
    assert r.status_code == 201, r.json
    assert r.json["predicted"] == classifier.classify(buf.getvalue()).label


def test_jpeg_and_tiff_uploads(client):
    assert _post_image(client, jpeg_bytes(_cell()), "a.jpg").status_code == 201
    buf = io.BytesIO()
    Image.fromarray(_cell()).save(buf, format="TIFF")
    r = _post_image(client, buf.getvalue(), "a.tif")
    assert r.status_code == 201
    original = client.get(r.json["urls"]["original"])
    assert original.mimetype == "image/png"  # non-JPEG/PNG originals are normalised to PNG


# -- bad input ------------------------------------------------------------------
def _bomb() -> bytes:
    buf = io.BytesIO()
    Image.new("1", (20_000, 20_000)).save(buf, format="PNG")  # ~50 kB file, 400 MP when decoded
    return buf.getvalue()


def _huge_side() -> bytes:
    buf = io.BytesIO()
    Image.new("L", (30_000, 2)).save(buf, format="PNG")
    return buf.getvalue()


BAD_UPLOADS = {
    "empty": (b"", 400, "empty"),
    "text": (b"hello, I am not an image", 400, "not an image"),
    "html": (b"<html><script>alert(1)</script></html>", 400, "not an image"),
    "truncated-png": (png_bytes(_cell())[:200], 400, "truncated"),
    "truncated-jpeg": (jpeg_bytes(_cell())[:300], 400, "truncated"),
    "corrupt-header": (b"\x89PNG\r\n\x1a\n" + b"\x00" * 64, 400, ""),
    "bomb": (_bomb(), 413, "decompression bomb"),
    "huge-side": (_huge_side(), 413, "too large"),
}


@pytest.mark.parametrize("case", sorted(BAD_UPLOADS))
def test_bad_uploads_are_clear_4xx_and_store_nothing(app, client, case):
    data, status, text = BAD_UPLOADS[case]
    before = _stored(app)
    r = _post_image(client, data)
    assert r.status_code == status, r.json
    err = r.json["error"]
    assert err["status"] == status and text in err["message"].lower()
    assert "Traceback" not in r.get_data(as_text=True)
    assert _stored(app) == before
    assert _post_image(client, png_bytes(_cell())).status_code == 201  # still serving


def test_upload_over_the_size_limit_is_413(make_app):
    app = make_app(max_upload_bytes=4096)
    client = app.test_client()
    r = _post_image(client, b"\xff" * 10_000)
    assert r.status_code == 413 and r.json["error"]["type"] == "UploadTooLarge"
    assert _stored(app) == (0, 0)


@pytest.mark.parametrize("case", ["wrong-field", "no-fields", "text-not-file"])
def test_wrong_or_missing_field_is_400_naming_the_field(app, client, case):
    data = {
        "wrong-field": {"img": (io.BytesIO(png_bytes(_cell())), "x.png")},
        "no-fields": {},
        "text-not-file": {"image": "just text"},
    }[case]
    r = client.post("/api/classify", data=data, content_type="multipart/form-data")
    assert r.status_code == 400
    assert "'image'" in r.json["error"]["message"]
    if case == "wrong-field":
        assert "['img']" in r.json["error"]["message"]
    assert _stored(app) == (0, 0)


def test_not_multipart_is_400(client):
    r = client.post("/api/classify", data=png_bytes(_cell()), content_type="image/png")
    assert r.status_code == 400 and r.is_json


# -- results --------------------------------------------------------------------
def test_results_pagination_filter_get_delete(app, client, classifier):
    ids, labels = [], []
    for i, label in enumerate(CLASSES * 2):
        r = _post_image(client, png_bytes(_cell(label, 10 + i)))
        ids.append(r.json["id"])
        labels.append(r.json["label"])  # None when abstained: the label filter skips those
    page = client.get("/api/results?limit=3").json
    assert page["total"] == 8 and len(page["items"]) == 3 and page["next_offset"] == 3
    assert [i["id"] for i in page["items"]] == ids[::-1][:3]  # newest first
    last = client.get("/api/results?limit=3&offset=6").json
    assert len(last["items"]) == 2 and last["next_offset"] is None
    some = next(label for label in labels if label is not None)
    filtered = client.get(f"/api/results?label={some}").json
    assert filtered["total"] == labels.count(some) and all(i["label"] == some for i in filtered["items"])
    for bad in ("limit=0", "limit=abc", "offset=-1", "limit=100000"):
        assert client.get(f"/api/results?{bad}").status_code == 400
    assert client.delete(f"/api/results/{ids[0]}").status_code == 204
    assert client.get(f"/api/results/{ids[0]}").status_code == 404
    assert client.delete(f"/api/results/{ids[0]}").status_code == 404
    assert client.get("/api/results").json["total"] == 7


@pytest.mark.parametrize("path", [
    "/api/results/../../secret_key", "/api/results/..%2f..%2fsecret_key", "/results/%2e%2e/original",
    "/results/" + "0" * 32 + "/original", "/results/" + "0" * 32 + "/..%2fresults.sqlite3",
    "/results/../results.sqlite3/original", "/results/secret_key/original",
])
def test_no_path_traversal_through_image_routes(client, path):
    r = client.get(path)
    assert r.status_code == 404
    assert b"SQLite" not in r.data and len(r.data) < 20_000


def test_capture_api_uses_the_camera(client, replay_dir, classifier):
    first = sorted(replay_dir.iterdir())[0]
    r = client.post("/api/capture")
    assert r.status_code == 201 and r.json["source"] == "camera"
    assert r.json["predicted"] == classifier.classify(load_image(first)).label


def test_capture_without_camera_is_503_and_upload_still_works(make_app):
    client = make_app(camera="none").test_client()
    r = client.post("/api/capture")
    assert r.status_code == 503 and "upload mode" in r.json["error"]["message"]
    assert _post_image(client, png_bytes(_cell())).status_code == 201


def test_failing_camera_keeps_the_app_serving(make_app):
    class BrokenCamera:
        name = "broken"

        def capture(self):
            from leukoedge.errors import CameraError
            raise CameraError("the camera failed to capture a still (unplugged?)")

        preview_jpeg = capture

        def close(self):
            pass

    client = make_app(camera=BrokenCamera()).test_client()
    r = client.post("/api/capture")
    assert r.status_code == 503 and "unplugged" in r.json["error"]["message"]
    assert client.get("/api/health").status_code == 200


class FlakyCamera:
    """Fails while ``broken`` is set (a loose cable), works otherwise."""

    name = "flaky"

    def __init__(self) -> None:
        self.broken = True

    def capture(self):
        from leukoedge.errors import CameraError

        if self.broken:
            raise CameraError("the camera failed to capture a still (cable loose?)")
        return _cell("Pro", 9, 64)

    def preview_jpeg(self):
        return jpeg_bytes(self.capture())

    def close(self):
        pass


def test_an_abstained_result_has_no_label_anywhere(make_app, classifier):
    """A script reading ``label`` must never act on a class the model refused to give (issue 14)."""
    client = make_app().test_client()
    noise = png_bytes(np.random.default_rng(5).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    expected = classifier.classify(noise)
    assert expected.abstained, "pure noise is not like the training images"
    body = _post_image(client, noise).json
    assert body["abstained"] is True and body["label"] is None and body["predicted"] == expected.label
    assert client.get(body["urls"]["self"]).json["label"] is None
    listed = client.get("/api/results").json["items"]
    assert listed[0]["label"] is None and listed[0]["predicted"] == expected.label
    assert client.get(f"/api/results?label={expected.label}").json["total"] == 0
    assert client.get("/api/results?label=abstained").json["total"] == 1
    assert expected.to_dict()["label"] is None and expected.to_dict()["predicted"] == expected.label
    rows = list(csv.DictReader(io.StringIO(client.get("/export.csv").get_data(as_text=True))))
    assert rows[0]["label"] == "" and rows[0]["predicted"] == expected.label and rows[0]["abstained"] == "1"
    exported = json.loads(client.get("/export.json").data)["results"][0]
    assert exported["label"] is None and exported["predicted"] == expected.label


def test_health_follows_the_cameras_current_state(make_app):
    """Health used to keep saying "available" while captures failed, and stale errors after recovery."""
    camera = FlakyCamera()
    client = make_app(camera=camera).test_client()
    assert client.get("/api/health").json["camera"]["state"] == "idle"
    assert client.post("/api/capture").status_code == 503
    health = client.get("/api/health").json
    cam = health["camera"]
    assert cam["available"] is False and cam["opened"] is True and cam["state"] == "failing"
    assert "cable loose" in cam["error"] and health["status"] == "degraded"
    assert "leukoedge_camera_available 0" in client.get("/metrics").get_data(as_text=True)
    camera.broken = False
    assert client.post("/api/capture").status_code == 201
    cam = client.get("/api/health").json["camera"]
    assert cam["available"] is True and cam["state"] == "ok" and cam["error"] is None
    assert "cable loose" in cam["last_error"]  # history kept, not reported as current
    assert "leukoedge_camera_available 1" in client.get("/metrics").get_data(as_text=True)


def test_live_preview_failures_and_recovery_reach_health(make_app):
    import time

    camera = FlakyCamera()
    app = make_app(camera=camera, preview_fps=10)
    client = app.test_client()
    stream = app.extensions["leukoedge"].broadcaster.mjpeg()  # a viewer starts the producer
    try:
        deadline = time.monotonic() + 10
        while client.get("/api/health").json["camera"]["state"] != "failing" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert client.get("/api/health").json["camera"]["available"] is False
        camera.broken = False
        assert next(stream).startswith(b"--frame")
        assert client.get("/api/health").json["camera"]["state"] == "ok"
    finally:
        stream.close()


def test_health_does_not_reveal_server_paths(make_app, tiny_bundle):
    health = make_app().test_client().get("/api/health")
    text = health.get_data(as_text=True)
    assert str(tiny_bundle) not in text and str(tiny_bundle.parent) not in text
    model = health.json["model"]
    assert model["bundle_name"] == tiny_bundle.name and len(model["bundle_sha256"]) == 64


def test_health_reports_model_runtime_and_camera(make_app, classifier):
    client = make_app(camera="replay:/definitely/missing").test_client()
    health = client.get("/api/health").json
    assert health["status"] == "ok"
    assert health["model"]["model"] == classifier.info()["model"]
    assert health["model"]["runtime"] and health["model"]["delegate"] == "cpu"
    cam = health["camera"]
    assert cam["mode"] == "upload" and "does not exist" in cam["fallback_reason"]
    assert "not a diagnos" in health["research_notice"]


def test_metrics_count_requests_latency_and_errors(client):
    _post_image(client, png_bytes(_cell()))
    _post_image(client, b"nope")
    text = client.get("/metrics").get_data(as_text=True)
    assert 'leukoedge_http_requests_total{endpoint="api.classify",method="POST",status="201"} 1' in text
    assert 'leukoedge_http_requests_total{endpoint="api.classify",method="POST",status="400"} 1' in text
    assert 'leukoedge_errors_total{type="InvalidImageError"} 1' in text
    assert "leukoedge_classify_latency_seconds_count 1" in text
    assert 'leukoedge_classify_latency_seconds_bucket{le="+Inf"} 1' in text
    assert "leukoedge_results_stored 1" in text


def test_unknown_routes_and_methods_are_json_4xx(client):
    assert client.get("/api/nope").status_code == 404 and client.get("/api/nope").is_json
    r = client.get("/api/classify")
    assert r.status_code == 405 and r.is_json and "POST" in r.headers["Allow"]


# -- fuzzing ----------------------------------------------------------------------
def _valid_seeds() -> list[bytes]:
    """Valid files of every format a lab may send, multi-page and 16-bit TIFF included (issue 13)."""
    from real_images import encode, gray16, two_page_tiff

    rgb = _cell("Benign", 3, 32)
    return [png_bytes(rgb), jpeg_bytes(rgb), encode(rgb, "TIFF"), two_page_tiff(rgb, rgb[::-1]),
            encode(gray16(rgb), "TIFF"), encode(rgb, "BMP"), encode(Image.fromarray(rgb).convert("P"), "GIF")]


_VALID_SEEDS = _valid_seeds()


@st.composite
def _mutated_image(draw) -> bytes:
    data = bytearray(draw(st.sampled_from(_VALID_SEEDS)))
    for _ in range(draw(st.integers(1, 8))):
        pos = draw(st.integers(0, len(data) - 1))
        data[pos] = draw(st.integers(0, 255))
    if draw(st.booleans()):
        data = data[: draw(st.integers(0, len(data)))]
    return bytes(data)


@pytest.fixture
def fuzz_client(make_app):
    app = make_app(max_upload_bytes=256 * 1024)
    return app, app.test_client()


@pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow warns about the damage it skips over
@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(payload=st.one_of(st.binary(max_size=2048), _mutated_image()),
       field=st.one_of(st.just("image"), st.text(min_size=0, max_size=12)),
       name=st.text(max_size=40))
def test_fuzzed_uploads_never_5xx(fuzz_client, payload, field, name):
    app, client = fuzz_client
    before = app.extensions["leukoedge"].store.count()
    r = client.post("/api/classify", data={field: (io.BytesIO(payload), name or "f")},
                    content_type="multipart/form-data")
    assert r.status_code < 500, r.get_data(as_text=True)
    assert r.is_json
    if r.status_code != 201:
        assert app.extensions["leukoedge"].store.count() == before


# -- a real server, many clients ----------------------------------------------------
def _multipart(data: bytes, field: str = "image") -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{field}\"; filename=\"c.png\"\r\n"
            f"Content-Type: image/png\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def test_concurrent_clients_get_the_serial_answers(make_app, classifier):
    images = [png_bytes(_cell(label, 100 + i)) for i, label in enumerate(CLASSES * 3)]
    serial = [classifier.classify(img) for img in images]
    app = make_app(threads=6, max_streams=2)
    answers: dict[int, dict] = {}
    errors: list[str] = []

    with BackgroundServer(app, app.extensions["leukoedge"].config) as server:
        def client(index: int) -> None:
            body, ctype = _multipart(images[index])
            req = urllib.request.Request(f"{server.url}/api/classify", data=body, method="POST",
                                         headers={"Content-Type": ctype})
            try:
                with urllib.request.urlopen(req, timeout=60) as resp:
                    answers[index] = json.load(resp)
            except Exception as err:  # noqa: BLE001 - collected, asserted below
                errors.append(f"{index}: {err}")

        threads = [threading.Thread(target=client, args=(i,)) for i in range(len(images))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        with urllib.request.urlopen(f"{server.url}/api/results?limit=100", timeout=30) as resp:
            listed = json.load(resp)

    assert not errors
    assert len(answers) == len(images)
    for i, expected in enumerate(serial):
        assert answers[i]["predicted"] == expected.label
        assert answers[i]["probabilities"] == pytest.approx(expected.probabilities)
    assert listed["total"] == len(images)
    assert {item["id"] for item in listed["items"]} == {a["id"] for a in answers.values()}


def _read_mjpeg_frames(resp, n: int) -> list[bytes]:
    """The first ``n`` JPEG payloads of a multipart/x-mixed-replace stream."""
    frames, buf = [], b""
    while len(frames) < n:
        chunk = resp.read1(65536)
        assert chunk, "stream ended early"
        buf += chunk
        while True:
            head = buf.find(b"--frame\r\n")
            sep = buf.find(b"\r\n\r\n", head)
            if head < 0 or sep < 0:
                break
            length = int(re.search(rb"Content-Length: (\d+)", buf[head:sep]).group(1))
            if len(buf) < sep + 4 + length:
                break
            frames.append(buf[sep + 4: sep + 4 + length])
            buf = buf[sep + 4 + length:]
    return frames[:n]


def test_live_stream_serves_several_viewers_and_caps_them(make_app, replay_dir):
    app = make_app(camera=f"replay:{replay_dir}", threads=6, max_streams=2)
    with BackgroundServer(app, app.extensions["leukoedge"].config) as server:
        viewers = [urllib.request.urlopen(f"{server.url}/stream.mjpg", timeout=30) for _ in range(2)]
        try:
            for resp in viewers:
                assert resp.headers["Content-Type"].startswith("multipart/x-mixed-replace")
                for frame in _read_mjpeg_frames(resp, 2):
                    assert Image.open(io.BytesIO(frame)).format == "JPEG"
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(f"{server.url}/stream.mjpg", timeout=30)
            assert refused.value.code == 503
            # viewers hold worker threads, yet classification is still served
            body, ctype = _multipart(png_bytes(_cell()))
            req = urllib.request.Request(f"{server.url}/api/classify", data=body, method="POST",
                                         headers={"Content-Type": ctype})
            with urllib.request.urlopen(req, timeout=60) as resp:
                assert resp.status == 201
            with urllib.request.urlopen(f"{server.url}/api/health", timeout=30) as resp:
                assert json.load(resp)["camera"]["viewers"] == 2
        finally:
            for resp in viewers:
                resp.close()
