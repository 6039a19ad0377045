"""Uploads of what a lab really has: 12 MP JPEG, 5 MP TIFF, 16-bit TIFF, PNG, files at the size limit (issue 13).

Before issue 13, every upload over ~130 KB was refused with 413 "larger than
the 34 MB limit" (Werkzeug 3.1 applies MAX_FORM_MEMORY_SIZE to its multipart
buffer while it streams file parts). These tests send real-size files through
the Flask app and through a real waitress server, and check the answer equals
the runtime's own for the same file, what is stored, and the limits' messages.
"""
from __future__ import annotations

import http.client
import io
import json
import uuid

import numpy as np
import pytest
from PIL import Image

from leukoedge.edge_app.server import BackgroundServer

from real_images import (FIELD_5MP, HQ_FRAME, camera_frame, encode, gray16, pad_jpeg, png_header_only,
                         tiff_without_width_on_page, two_page_tiff)

pytest_plugins = ["app_fixtures"]  # shared fixtures, registered once per session

MB = 1024 * 1024


@pytest.fixture(scope="module")
def real_files() -> dict[str, tuple[bytes, str, tuple[int, int]]]:
    """name -> (bytes, file name, (width, height)): the formats and sizes of a lab's images."""
    frame = camera_frame(HQ_FRAME, seed=4)
    field = camera_frame(FIELD_5MP, seed=5, label="Benign")
    return {
        "jpeg-12mp": (encode(frame, "JPEG", quality=92), "hq-frame.jpg", HQ_FRAME),
        "tiff-5mp": (encode(field, "TIFF"), "field.tif", FIELD_5MP),
        "tiff16-5mp": (encode(gray16(field), "TIFF"), "field16.tif", FIELD_5MP),
        "png-5mp": (encode(field, "PNG", compress_level=1), "field.png", FIELD_5MP),
    }


def _post(client, data: bytes, name: str, field: str = "image"):
    return client.post("/api/classify", data={field: (io.BytesIO(data), name)}, content_type="multipart/form-data")


@pytest.mark.parametrize("kind", ["jpeg-12mp", "tiff-5mp", "tiff16-5mp", "png-5mp"])
def test_camera_size_uploads_classify_exactly_like_the_runtime(make_app, classifier, real_files, kind):
    data, name, (width, height) = real_files[kind]
    assert len(data) > 1 * MB  # real-size files, far above the old ~130 KB ceiling
    app = make_app()
    client = app.test_client()
    r = _post(client, data, name)
    assert r.status_code == 201, r.json
    body = r.json
    expected = classifier.classify(data)  # the same file through the device runtime
    assert body["predicted"] == expected.label and body["abstained"] == expected.abstained
    assert body["probabilities"] == pytest.approx(expected.probabilities, abs=1e-9)
    assert (body["width"], body["height"]) == (width, height)  # the full image's size, not the decoded one
    assert body["timings"]["decode_ms"] > 0
    stored = client.get(body["urls"]["original"]).data
    if kind.startswith(("jpeg", "png")):
        assert stored == data  # kept byte for byte
    else:
        # TIFF is kept as a PNG of the pixels the model worked from: it re-classifies identically.
        assert Image.open(io.BytesIO(stored)).format == "PNG"
        assert classifier.classify(stored).probabilities == pytest.approx(expected.probabilities, abs=1e-9)
    thumb = Image.open(io.BytesIO(client.get(body["urls"]["thumbnail"]).data))
    assert max(thumb.size) <= 256 and abs(thumb.width / thumb.height - width / height) < 0.05  # aspect kept


def _sized_jpeg(total: int) -> bytes:
    return pad_jpeg(encode(camera_frame((1600, 1200), seed=6), "JPEG", quality=90), total)


def test_a_file_just_under_the_upload_limit_is_classified_and_one_just_over_is_413(make_app):
    limit = 3 * MB
    app = make_app(max_upload_bytes=limit)
    client = app.test_client()
    under = _sized_jpeg(limit - 4096)  # leaves room for the multipart framing
    r = _post(client, under, "under.jpg")
    assert r.status_code == 201, r.json
    over = _sized_jpeg(limit + 1)
    r = _post(client, over, "over.jpg")
    assert r.status_code == 413
    err = r.json["error"]
    assert err["type"] == "UploadTooLarge"
    assert "3 MB limit" in err["message"] and f"{limit:,}" in err["message"]  # the real limit, in the flag's unit
    assert "--max-upload-mb" in err["hint"]
    assert app.extensions["leukoedge"].store.count() == 1


def test_the_default_32_mb_limit_is_stated_as_32_mb(make_app):
    client = make_app().test_client()
    r = _post(client, b"x" * (32 * MB + 10), "huge.jpg")
    assert r.status_code == 413 and "32 MB limit" in r.json["error"]["message"]
    assert "34 MB" not in r.json["error"]["message"]


def test_an_oversized_text_field_is_413_saying_it_is_a_form_field(make_app):
    client = make_app().test_client()
    r = client.post("/api/classify", data={"note": "n" * (600 * 1024), "image": (io.BytesIO(b"x"), "a.jpg")},
                    content_type="multipart/form-data")
    assert r.status_code == 413 and "form field" in r.json["error"]["message"]


def test_tiff_with_a_damaged_second_page_is_classified_from_its_first(make_app, classifier):
    page = camera_frame((640, 480), seed=7)
    data = tiff_without_width_on_page(two_page_tiff(page, page[::-1]), page=1)
    client = make_app().test_client()
    r = _post(client, data, "two-pages.tif")
    assert r.status_code == 201, r.json  # was HTTP 500 (TypeError: Missing dimensions)
    assert r.json["probabilities"] == pytest.approx(classifier.classify(page).probabilities, abs=1e-9)
    broken_first = tiff_without_width_on_page(two_page_tiff(page, page), page=0)
    r = _post(client, broken_first, "broken.tif")
    assert r.status_code == 400 and r.json["error"]["type"] == "InvalidImageError"


def _multipart(data: bytes, name: str) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"{name}\"\r\n"
            "Content-Type: application/octet-stream\r\n\r\n").encode()
    return head + data + f"\r\n--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def _send(url_port: int, body: bytes, ctype: str) -> tuple[int, dict | str]:
    conn = http.client.HTTPConnection("127.0.0.1", url_port, timeout=120)
    try:
        conn.request("POST", "/api/classify", body=body, headers={"Content-Type": ctype})
        resp = conn.getresponse()
        raw = resp.read()
        try:
            return resp.status, json.loads(raw)
        except ValueError:
            return resp.status, raw.decode(errors="replace")
    finally:
        conn.close()


def test_real_server_takes_a_12mp_frame_and_refuses_oversize_with_a_clear_413(make_app, classifier, real_files):
    data, name, _ = real_files["jpeg-12mp"]
    limit = 4 * MB
    app = make_app(max_upload_bytes=limit)
    with BackgroundServer(app, app.extensions["leukoedge"].config) as server:
        status, body = _send(server.port, *_multipart(data, name))
        assert status == 201, body
        assert body["predicted"] == classifier.classify(data).label
        status, body = _send(server.port, *_multipart(_sized_jpeg(limit + 100), "over.jpg"))
        assert status == 413 and body["error"]["type"] == "UploadTooLarge"
        assert "4 MB limit" in body["error"]["message"]
        # Far over the limit: refused from the Content-Length header alone, before any body byte is read.
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
        conn.putrequest("POST", "/api/classify")
        conn.putheader("Content-Type", "multipart/form-data; boundary=x")
        conn.putheader("Content-Length", str(50 * limit))
        conn.endheaders()
        assert conn.getresponse().status == 413
        conn.close()
    assert app.extensions["leukoedge"].store.count() == 1


def test_pixel_budget_refusal_is_413_and_stores_nothing(make_app):
    # A 72 MP image cannot be decoded within the 64 MP budget; only its header is read.
    png = png_header_only(9000, 8000)
    app = make_app()
    r = _post(app.test_client(), png, "huge.png")
    assert r.status_code == 413 and r.json["error"]["type"] == "ImageTooLargeError"
    assert "64 MP" in r.json["error"]["message"]
    assert app.extensions["leukoedge"].store.count() == 0


def test_batch_with_a_damaged_file_in_the_middle_reports_every_file(make_app, real_files):
    from app_helpers import csrf_from

    app = make_app()
    client = app.test_client()
    token = csrf_from(client.get("/upload").data)
    good = real_files["jpeg-12mp"][0]
    bad = tiff_without_width_on_page(two_page_tiff(np.zeros((20, 20, 3), np.uint8), np.zeros((20, 20, 3), np.uint8)),
                                     page=0)
    r = client.post("/upload", data={"csrf_token": token, "images": [
        (io.BytesIO(good), "first.jpg"), (io.BytesIO(bad), "bad.tif"), (io.BytesIO(good), "third.jpg")]},
        content_type="multipart/form-data")
    assert r.status_code == 200
    page = r.get_data(as_text=True)
    assert "first.jpg" in page and "third.jpg" in page and "bad.tif" in page
    assert app.extensions["leukoedge"].store.count() == 2
