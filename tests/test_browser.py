"""The real thing: waitress + replay camera + real model, driven by headless Chromium.

Skips cleanly when Debian's chromium is not installed (``python3 tasks.py
test`` installs it when it can). Set ``LEUKOEDGE_SCREENSHOT_DIR`` to keep the
result-page screenshot somewhere you can look at it.
"""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest

from leukoedge.edge_app.server import BackgroundServer
from leukoedge.preprocess import load_image

pytest_plugins = ["app_fixtures"]  # shared fixtures, registered once per session


pytestmark = pytest.mark.browser

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]


def _chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.skip("Debian chromium is not installed")
    return path


@pytest.fixture(scope="module")
def browser():
    executable = _chromium()
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS, headless=True)
        yield browser
        browser.close()


@pytest.fixture
def server(make_app, replay_dir):
    app = make_app(camera=f"replay:{replay_dir}")
    with BackgroundServer(app, app.extensions["leukoedge"].config) as srv:
        yield srv


def _image_loaded(page, selector: str) -> None:
    page.wait_for_function(
        "sel => { const i = document.querySelector(sel); return i && i.complete && i.naturalWidth > 0; }",
        arg=selector, timeout=20_000)


def test_capture_shows_result_and_heatmap_then_corrupt_upload_shows_error(browser, server, replay_dir,
                                                                         classifier, tmp_path):
    context = browser.new_context(viewport={"width": 1280, "height": 860})
    page = context.new_page()
    failed: list[str] = []
    page.on("requestfailed", lambda req: failed.append(req.url) if "stream.mjpg" not in req.url else None)
    console_errors: list[str] = []
    page.on("console", lambda msg: console_errors.append(msg.text) if msg.type == "error" else None)

    page.goto(server.url + "/")
    assert page.locator("#research-notice").is_visible()
    assert "Research use only — not a diagnosis." in page.locator("#research-notice").inner_text()
    _image_loaded(page, "#preview")  # the MJPEG live preview shows a frame

    page.get_by_role("button", name="Capture and classify").click()
    page.wait_for_url(re.compile(r".*/results/[0-9a-f]{32}$"), timeout=30_000)
    _image_loaded(page, "#heatmap")
    _image_loaded(page, "#original")
    first = sorted(replay_dir.iterdir())[0]
    expected = classifier.classify(load_image(first))
    verdict = page.locator("#verdict").inner_text()
    if expected.abstained:
        assert "not like the images this model was trained on" in verdict.lower()
    else:
        assert verdict.strip() == expected.label
    assert classifier.info()["model"] in page.content()

    shots = Path(os.environ.get("LEUKOEDGE_SCREENSHOT_DIR", tmp_path))
    shots.mkdir(parents=True, exist_ok=True)
    shot = shots / "result-page.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    assert not failed and not console_errors, (failed, console_errors)  # before the deliberate 400 below

    page.goto(server.url + "/upload")
    page.set_input_files("#images", files=[{"name": "broken.jpg", "mimeType": "image/jpeg",
                                            "buffer": b"\xff\xd8\xff\xe0 this is not really a JPEG"}])
    page.get_by_role("button", name="Upload and classify").click()
    message = page.locator("#error-message")
    message.wait_for(timeout=20_000)
    assert "broken.jpg" in message.inner_text() or "not an image" in message.inner_text() \
        or "corrupt" in message.inner_text()
    assert page.locator("#research-notice").is_visible()

    page.goto(server.url + "/history")
    assert page.locator("img.thumb").count() == 1  # the capture; the corrupt upload stored nothing
    _image_loaded(page, "img.thumb")
    assert not failed
    context.close()


def test_page_upload_of_camera_size_files_in_chromium(browser, server, classifier):
    """12 MP JPEG, 5 MP 16-bit TIFF, 5 MP TIFF and PNG through the upload form (two batches under 32 MB)."""
    from real_images import FIELD_5MP, HQ_FRAME, camera_frame, encode, gray16

    field = camera_frame(FIELD_5MP, seed=12)
    batches = [
        [("hq-frame.jpg", "image/jpeg", encode(camera_frame(HQ_FRAME, seed=11), "JPEG", quality=92)),
         ("field16.tif", "image/tiff", encode(gray16(field), "TIFF"))],
        [("field.tif", "image/tiff", encode(field, "TIFF")),
         ("field.png", "image/png", encode(field, "PNG", compress_level=1))],
    ]
    context = browser.new_context(viewport={"width": 1280, "height": 860})
    page = context.new_page()
    for batch in batches:
        assert all(len(data) > 1_000_000 for _, _, data in batch)
        page.goto(server.url + "/upload")
        page.set_input_files("#images", files=[{"name": n, "mimeType": m, "buffer": d} for n, m, d in batch])
        page.get_by_role("button", name="Upload and classify").click()
        page.wait_for_load_state("load", timeout=60_000)
        text = page.content()
        assert all(name in text for name, _, _ in batch), text[:2000]
        assert "error-message" not in text and "larger than" not in text
        assert page.locator("#research-notice").is_visible()
        for img in page.locator("img").all():
            if "/results/" in (img.get_attribute("src") or ""):
                page.wait_for_function("el => el.complete && el.naturalWidth > 0", arg=img.element_handle(),
                                       timeout=20_000)
    results = {r.filename: r for r in server.app.extensions["leukoedge"].store.page(limit=10)}
    assert set(results) == {"hq-frame.jpg", "field16.tif", "field.tif", "field.png"}
    jpeg = batches[0][0][2]
    assert results["hq-frame.jpg"].label == classifier.classify(jpeg).label
    assert (results["hq-frame.jpg"].width, results["hq-frame.jpg"].height) == HQ_FRAME
    assert all((r.width, r.height) == FIELD_5MP for name, r in results.items() if name != "hq-frame.jpg")
    context.close()


def test_no_token_warning_is_visible_on_every_page_in_chromium(browser, make_app):
    app = make_app(host="0.0.0.0", insecure_no_token=True)
    with BackgroundServer(app, app.extensions["leukoedge"].config) as srv:
        context = browser.new_context()
        page = context.new_page()
        for path in ("/", "/upload", "/history"):
            page.goto(srv.url + path)
            warning = page.locator("#no-token-warning")
            assert warning.is_visible() and "anyone on this network" in warning.inner_text()
        context.close()


@pytest.fixture
def scaled_server(tmp_path, tiny_bundle):
    """The tiny bundle's real model, its copy saying its 64 px training fields were 0.5 um/px: uploads are tiled."""
    from bundle_factory import scaled_bundle_copy
    from leukoedge.edge_app import AppConfig, create_app

    bundle = scaled_bundle_copy(tiny_bundle, tmp_path / "scaled-bundle", 0.5, (64, 64))
    config = AppConfig(bundle=bundle, camera="none", data_dir=tmp_path / "scaled", secret_key=b"z" * 32,
                       num_threads=1, edgetpu="off")
    app = create_app(config)  # the real start-up path: bundle loaded and verified, no camera
    with BackgroundServer(app, config) as srv:
        yield srv
    app.extensions["leukoedge"].close()


def test_scale_page_sets_the_header_and_the_result_draws_the_tile_map_in_chromium(browser, scaled_server, tmp_path):
    """Type 0.25 um/px on the Scale page, see it in the header, upload a 2x2 field: four tile boxes over it."""
    import numpy as np
    from PIL import Image

    from app_helpers import CLASSES, png_bytes
    from bundle_factory import draw_cell

    rng = np.random.default_rng(3)
    cells = [draw_cell(label, rng, 64) for label in CLASSES]
    field = np.asarray(Image.fromarray(np.vstack([np.hstack(cells[:2]), np.hstack(cells[2:])])).resize((256, 256)))
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    console_errors: list[str] = []
    page.on("console", lambda msg: console_errors.append(msg.text) if msg.type == "error" else None)

    page.goto(scaled_server.url + "/scale")
    assert page.locator("#scale-status").inner_text() == "Scale: not calibrated — estimated per capture"
    page.fill("#um-per-px", "0.25")
    page.click("#save-typed")
    page.wait_for_url(re.compile(r".*/scale\?saved=1$"), timeout=20_000)
    assert re.fullmatch(r"Scale: 0\.25 um/px \(typed in on \d{4}-\d\d-\d\d\)",
                        page.locator("#scale-status").inner_text())
    assert page.locator("#scale-value").inner_text() == "0.25"

    page.goto(scaled_server.url + "/upload")
    assert page.locator("#scale-status").inner_text().startswith("Scale: 0.25 um/px")  # on every page
    page.set_input_files("#images", files=[{"name": "field.png", "mimeType": "image/png", "buffer": png_bytes(field)}])
    page.get_by_role("button", name="Upload and classify").click()
    page.wait_for_url(re.compile(r".*/results/[0-9a-f]{32}$"), timeout=30_000)
    _image_loaded(page, "#original")
    assert page.locator("#tile-map rect.tile").count() == 4
    image, overlay = page.locator("#original").bounding_box(), page.locator("#tile-map").bounding_box()
    assert all(abs(image[k] - overlay[k]) < 1.5 for k in ("x", "y", "width", "height"))  # drawn over the capture
    corner = page.locator('#tile-map rect[x="128"][y="128"]')
    box = corner.bounding_box()
    assert box["x"] == pytest.approx(image["x"] + image["width"] / 2, abs=3)
    assert box["y"] == pytest.approx(image["y"] + image["height"] / 2, abs=3)
    assert box["width"] == pytest.approx(image["width"] / 2, abs=3)
    assert corner.locator("title").text_content().startswith("Tile 4: ")
    assert "0.25 µm/px, given" in page.locator("#result-scale").inner_text()
    page.locator("#tile-table summary").click()
    assert page.locator("#tile-table tbody tr").count() == 4 and page.locator("#tile-table table").is_visible()

    shots = Path(os.environ.get("LEUKOEDGE_SCREENSHOT_DIR", tmp_path))
    shots.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(shots / "result-tile-map.png"), full_page=True)
    assert not console_errors, console_errors  # e.g. a Content-Security-Policy violation
    context.close()
