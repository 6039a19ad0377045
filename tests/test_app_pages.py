"""HTML pages with the Flask test client: live, upload, result, history, exports, errors."""
from __future__ import annotations

import csv
import io
import json
import re

import numpy as np
import pytest
from PIL import Image

from app_helpers import CLASSES, csrf_from, png_bytes
from bundle_factory import draw_cell

pytest_plugins = ["app_fixtures"]  # shared fixtures, registered once per session

NOTICE = "Research use only — not a diagnosis."


def _cell(label="Early", seed=0):
    return draw_cell(label, np.random.default_rng(seed), 64)


def _upload(client, files, token=None):
    token = token or csrf_from(client.get("/upload").data)
    data = {"csrf_token": token, "images": [(io.BytesIO(d), n) for n, d in files]}
    return client.post("/upload", data=data, content_type="multipart/form-data")


def _result_id(location: str) -> str:
    match = re.search(r"/results/([0-9a-f]{32})$", location)
    assert match, location
    return match.group(1)


@pytest.mark.parametrize("path", ["/", "/upload", "/history", "/login"])
def test_every_page_shows_the_research_notice(client, path):
    r = client.get(path)
    assert r.status_code == 200
    html = r.get_data(as_text=True)
    assert NOTICE in html
    assert "http://" not in html.replace("http://localhost", "") and "https://" not in html  # nothing from a CDN


def test_live_page_has_preview_and_capture(client):
    html = client.get("/").get_data(as_text=True)
    assert 'src="/stream.mjpg"' in html and "Capture and classify" in html


def test_live_page_in_upload_mode_explains_why(make_app):
    html = make_app(camera="replay:/no/such/folder").test_client().get("/").get_data(as_text=True)
    assert "Upload mode" in html and "does not exist" in html and 'name="images"' in html
    assert "stream.mjpg" not in html


def test_capture_button_classifies_and_shows_the_result(client, classifier):
    token = csrf_from(client.get("/").data)
    r = client.post("/capture", data={"csrf_token": token})
    assert r.status_code == 303
    page = client.get(r.headers["Location"])
    html = page.get_data(as_text=True)
    assert page.status_code == 200 and NOTICE in html
    info = classifier.info()
    assert info["model"] in html and str(info["version"]) in html
    for label in CLASSES:
        assert label in html  # one probability bar per class
    assert 'id="heatmap"' in html and 'id="original"' in html


def test_upload_one_file_redirects_to_its_result(app, client, classifier):
    data = png_bytes(_cell("Pro", 4))
    r = _upload(client, [("pro.png", data)])
    assert r.status_code == 303
    result = app.extensions["leukoedge"].store.get(_result_id(r.headers["Location"]))
    assert result.label == classifier.classify(data).label and result.filename == "pro.png"


def test_upload_several_files_with_one_bad_reports_each(app, client):
    files = [("a.png", png_bytes(_cell("Early", 1))), ("b.png", png_bytes(_cell("Pre", 2))),
             ("broken.jpg", b"\xff\xd8\xff garbage")]
    r = _upload(client, files)
    assert r.status_code == 200
    html = r.get_data(as_text=True)
    assert "1 file(s) could not be classified" in html and "broken.jpg" in html
    assert app.extensions["leukoedge"].store.count() == 2


def test_corrupt_upload_shows_the_error_on_the_page_and_stores_nothing(app, client):
    r = _upload(client, [("bad.png", b"not an image at all")])
    assert r.status_code == 400
    html = r.get_data(as_text=True)
    assert "not an image Pillow can read" in html and NOTICE in html
    assert 'name="images"' in html  # the form is right there to try again
    assert app.extensions["leukoedge"].store.count() == 0


def test_upload_form_without_files_or_with_too_many(make_app):
    client = make_app(max_files_per_upload=2).test_client()
    token = csrf_from(client.get("/upload").data)
    r = client.post("/upload", data={"csrf_token": token}, content_type="multipart/form-data")
    assert r.status_code == 400 and "no image" in r.get_data(as_text=True)
    r = _upload(client, [(f"{i}.png", png_bytes(_cell())) for i in range(3)])
    assert r.status_code == 400 and "more than the 2 allowed" in r.get_data(as_text=True)


def test_oversized_form_upload_is_413_page(make_app):
    client = make_app(max_upload_bytes=4096).test_client()
    r = _upload(client, [("big.png", b"\x00" * 20_000)])
    assert r.status_code == 413 and "Upload too large" in r.get_data(as_text=True)


def test_forms_need_the_csrf_token(app, client):
    client.get("/upload")
    data = {"images": [(io.BytesIO(png_bytes(_cell())), "a.png")]}
    r = client.post("/upload", data=data, content_type="multipart/form-data")
    assert r.status_code == 403 and "expired" in r.get_data(as_text=True)
    r = client.post("/capture", data={"csrf_token": "forged"})
    assert r.status_code == 403
    assert app.extensions["leukoedge"].store.count() == 0


def test_abstention_is_shown_as_not_like_the_training_images(app, client):
    store = app.extensions["leukoedge"].store
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="JPEG")
    result = store.add({
        "source": "upload", "filename": "odd.jpg", "label": "Pre", "confidence": 0.3, "abstained": True,
        "ood_score": 0.7, "probabilities": {c: 0.25 for c in CLASSES}, "latency_ms": 1.0, "timings": {},
        "model_name": "m", "model_version": "1", "width": 8, "height": 8, "original_ext": ".jpg",
    }, {"original": buf.getvalue(), "thumbnail": buf.getvalue()})
    html = client.get(f"/results/{result.id}").get_data(as_text=True)
    assert "not like the images this model was trained on" in html.lower()
    assert 'class="label"' not in html  # no big label for an abstention
    assert 'id="heatmap"' not in html
    assert client.get(f"/results/{result.id}/heatmap").status_code == 404


def test_history_filter_delete_and_exports(app, client, classifier):
    ids = []
    for i, label in enumerate(CLASSES):
        r = _upload(client, [(f"{label}.png", png_bytes(_cell(label, 20 + i)))])
        ids.append(_result_id(r.headers["Location"]))
    store = app.extensions["leukoedge"].store
    some = store.get(ids[0]).label
    given = {i: store.get(i).given_label for i in ids}  # None for an abstained result
    html = client.get("/history").get_data(as_text=True)
    assert html.count('class="thumb"') == 4
    filtered = client.get(f"/history?label={some}").get_data(as_text=True)
    assert filtered.count('class="thumb"') == sum(g == some for g in given.values())

    exported = client.get("/export.csv")
    assert exported.mimetype == "text/csv" and "attachment" in exported.headers["Content-Disposition"]
    rows = list(csv.DictReader(io.StringIO(exported.get_data(as_text=True))))
    assert {r["id"] for r in rows} == set(ids)
    row = next(r for r in rows if r["id"] == ids[0])
    assert row["predicted"] == some and row["label"] == (given[ids[0]] or "")
    assert float(row[f"p_{some}"]) == pytest.approx(store.get(ids[0]).confidence, abs=1e-6)
    body = json.loads(client.get(f"/export.json?label={some}").data)
    assert {r["id"] for r in body["results"]} == {i for i, g in given.items() if g == some}
    assert "not a diagnosis" in body["research_notice"]

    token = csrf_from(html)
    r = client.post(f"/results/{ids[1]}/delete", data={"csrf_token": token})
    assert r.status_code == 303 and store.count() == 3
    assert client.get(f"/results/{ids[1]}").status_code == 404
    assert "Not found" in client.get(f"/results/{ids[1]}").get_data(as_text=True)
    assert client.get("/history?page=0").status_code == 400


def test_history_paginates(app, client):
    from leukoedge.edge_app.views.history import PAGE_SIZE

    store = app.extensions["leukoedge"].store
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="JPEG")
    for i in range(PAGE_SIZE + 2):
        store.add({"source": "upload", "filename": f"{i}.jpg", "label": "Early", "confidence": 0.9,
                   "abstained": False, "ood_score": None, "probabilities": {"Early": 0.9}, "latency_ms": 1.0,
                   "timings": {}, "model_name": "m", "model_version": "1", "width": 8, "height": 8,
                   "original_ext": ".jpg", "created_at": 1_700_000_000 + i},
                  {"original": buf.getvalue(), "thumbnail": buf.getvalue()})
    first = client.get("/history").get_data(as_text=True)
    second = client.get("/history?page=2").get_data(as_text=True)
    assert first.count('class="thumb"') == PAGE_SIZE and second.count('class="thumb"') == 2
    assert "page 1 of 2" in first and "older" in first


def test_mjpeg_stream_sends_jpeg_frames(client):
    r = client.get("/stream.mjpg", buffered=False)
    assert r.status_code == 200 and r.mimetype == "multipart/x-mixed-replace"
    part = next(r.response)
    header, _, body = part.partition(b"\r\n\r\n")
    assert header.startswith(b"--frame") and Image.open(io.BytesIO(body[:-2])).format == "JPEG"
    r.close()


def test_stream_without_camera_is_503(make_app):
    assert make_app(camera="none").test_client().get("/stream.mjpg").status_code == 503


def test_security_headers_on_pages(client):
    r = client.get("/")
    csp = r.headers["Content-Security-Policy"]
    assert "default-src 'self'" in csp and "unsafe-inline" not in csp
    assert r.headers["X-Content-Type-Options"] == "nosniff" and r.headers["X-Frame-Options"] == "DENY"
    assert r.headers["Referrer-Policy"] == "same-origin"


def test_static_files_are_packaged(client):
    assert client.get("/static/style.css").status_code == 200
    assert client.get("/static/app.js").status_code == 200
