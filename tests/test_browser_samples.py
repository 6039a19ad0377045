"""The lab's loop in a real browser: sample, three captures, a review, the summary, agreement, report, reviewed.zip.

waitress + the replay camera + the real tiny model, driven by headless Chromium
(skips cleanly without Debian's chromium or playwright, as tests/test_browser.py,
whose ``browser`` fixture this module uses). The loop ends where the lab's does:
the review page's reviewed.zip link is downloaded by the browser (its own
session), unzipped, and read by the real ``leukoedge data check`` in a process
of its own. Set ``LEUKOEDGE_SCREENSHOT_DIR`` to keep screenshots of the sample
page and the report.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import zipfile
import zlib
from pathlib import Path

import pytest
import test_browser
from test_browser import _image_loaded

from leukoedge.data import reviewed as reviewed_format
from leukoedge.edge_app.server import BackgroundServer

pytest_plugins = ["app_fixtures"]  # shared fixtures, registered once per session

pytestmark = pytest.mark.browser
browser = test_browser.browser  # the module-scoped headless Chromium fixture, shared rather than copied
REPO = Path(__file__).resolve().parents[1]
#: ``leukoedge ARGS...`` as the console script runs it (cli.main), in a fresh interpreter.
CLI = [sys.executable, "-c", "import sys; from leukoedge import cli; sys.exit(cli.main(sys.argv[1:]))"]


@pytest.fixture
def served(make_app, replay_dir):
    app = make_app(camera=f"replay:{replay_dir}")
    with BackgroundServer(app, app.extensions["leukoedge"].config) as srv:
        yield app, srv


def _pdf_page_texts(pdf: bytes) -> list[str]:
    """Text of each page of a Chromium PDF, read with the fonts' own ToUnicode maps (no PDF library needed).

    Chromium writes text as hex glyph ids (``<0036...> Tj``) in one zlib stream per page, and one
    ToUnicode CMap per font. Each page is decoded with every CMap in turn and the decodings joined,
    so a phrase set in one font reads right in that font's decoding.
    """
    streams = []
    for m in re.finditer(rb"stream\r?\n(.*?)\r?\nendstream", pdf, re.DOTALL):
        try:
            streams.append(zlib.decompress(m.group(1)))
        except zlib.error:
            continue  # images (DCTDecode) and anything not deflated
    cmaps = []
    for stream in streams:
        if b"begincmap" not in stream:
            continue
        mapping = {}
        for block in re.findall(rb"beginbfchar(.*?)endbfchar", stream, re.DOTALL):
            for src, dst in re.findall(rb"<([0-9A-Fa-f]+)>\s*<([0-9A-Fa-f]+)>", block):
                mapping[int(src, 16)] = bytes.fromhex(dst.decode()).decode("utf-16-be", "replace")
        for block in re.findall(rb"beginbfrange(.*?)endbfrange", stream, re.DOTALL):
            for lo, hi, dst in re.findall(rb"<([0-9A-Fa-f]+)>\s*<([0-9A-Fa-f]+)>\s*(<[0-9A-Fa-f]+>|\[[^\]]*\])", block):
                targets = re.findall(rb"<([0-9A-Fa-f]+)>", dst)
                for i, code in enumerate(range(int(lo, 16), int(hi, 16) + 1)):
                    if dst.startswith(b"["):  # one destination per code
                        if i < len(targets):
                            mapping[code] = bytes.fromhex(targets[i].decode()).decode("utf-16-be", "replace")
                    else:  # consecutive code points from the first
                        mapping[code] = chr(int(targets[0], 16) + i)
        cmaps.append(mapping)
    pages = [s for s in streams if b" Tj" in s and b"begincmap" not in s]
    texts = []
    for page_stream in pages:
        runs = [h.decode() for h in re.findall(rb"<([0-9A-Fa-f]+)>\s*Tj", page_stream)]
        codes = [[int(h[i:i + 4], 16) for i in range(0, len(h), 4)] for h in runs]
        texts.append("\n".join("".join("".join(m.get(c, "\ufffd") for c in run) for run in codes) for m in cmaps))
    return texts


def _shot(page, name: str) -> None:
    folder = os.environ.get("LEUKOEDGE_SCREENSHOT_DIR")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(folder) / name), full_page=True)


def test_sample_capture_review_summary_agreement_and_report(browser, served, classifier, tmp_path):
    app, server = served
    store = app.extensions["leukoedge"].store
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.on("dialog", lambda dialog: dialog.accept())  # the close / delete confirmations
    console_errors: list[str] = []
    page.on("console", lambda msg: console_errors.append(msg.text) if msg.type == "error" else None)

    # Create the sample on the live page: it becomes the current one.
    page.goto(server.url + "/")
    assert "No patient names are needed" in page.locator("#no-patient-names").inner_text()
    page.fill("#new-sample-name", "slide B-7")
    page.get_by_role("button", name="Create and use").click()
    page.wait_for_url(server.url + "/")
    assert page.locator("#current-sample").inner_text() == "slide B-7"
    _shot(page, "live-page.png")

    # Three fields with the replay camera, each into the current sample.
    for _ in range(3):
        page.get_by_role("button", name="Capture and classify").click()
        page.wait_for_url(re.compile(r".*/results/[0-9a-f]{32}$"), timeout=30_000)
        assert "slide B-7" in page.locator("#result-sample").inner_text()
        page.goto(server.url + "/")
    sample = store.samples()[0]
    fields = list(store.sample_results(sample.id))
    assert len(fields) == 3 and all(f.sample_id == sample.id for f in fields)

    page.click("#current-sample")
    page.wait_for_url(re.compile(r".*/samples/[0-9a-f]{32}$"))
    assert page.locator("#sample-n").inner_text() == "3"
    assert page.locator("#sample-fields a.field").count() == 3
    _image_loaded(page, "#sample-fields a.field img")
    before = page.locator("#sample-agreement .agreement-overall").inner_text()
    assert before == "no reviews yet"

    # Review one labelled field as a different class than the model's.
    target = next((f for f in fields if not f.retake), None)
    assert target is not None, "all three replay captures were retakes: nothing for the agreement to count"
    other = next(label for label in classifier.info()["labels"] if label != target.label)
    page.click(f'#sample-fields a[data-result="{target.id}"]')
    page.wait_for_url(re.compile(rf".*/results/{target.id}$"))
    page.select_option("#review-label", other)
    page.fill("#review-note-input", "nucleus lobed")
    page.click("#review-button")
    page.wait_for_url(re.compile(rf".*/results/{target.id}$"))
    assert f"Reviewed as {other}" in page.locator("#review-state").inner_text()
    assert store.get(target.id).review_label == other

    # The summary and the agreement figure follow.
    page.goto(f"{server.url}/samples/{sample.id}")
    assert page.locator("#sample-reviewed").inner_text().startswith("1 of 3")
    after = page.locator("#sample-agreement .agreement-overall").inner_text()
    assert after != before and after.startswith("0 % (0 of 1 reviewed; 95 % CI 0-")
    _shot(page, "sample-page.png")
    page.goto(server.url + "/review")
    _shot(page, "review-page.png")
    assert page.locator("#agreement .agreement-overall").inner_text() == after
    assert page.locator("#review-waiting").inner_text() == "2"

    # The printable report: every field, the checksum, the notice repeated on every printed page.
    page.goto(f"{server.url}/samples/{sample.id}")
    page.click("#report-link")
    page.wait_for_url(re.compile(r".*/report$"))
    assert page.locator("tr.field-row").count() == 3
    assert page.locator("#report-checksum").inner_text() == classifier.info()["bundle_sha256"]
    assert "Research use only" in page.locator("#report-notice").inner_text()
    _shot(page, "report.png")
    page.emulate_media(media="print")
    assert not page.locator("#print-report").is_visible()
    pdf = page.pdf(format="A4")
    assert pdf.startswith(b"%PDF")
    pages = [re.sub(r"\s+", "", text) for text in _pdf_page_texts(pdf)]
    assert len(pages) >= 2  # the fields table starts a new sheet
    for text in pages:  # the notice heads, the model's checksum foots, every printed sheet
        assert "leukoedgeisnotadiagnosticdevice" in text and classifier.info()["bundle_sha256"] in text
    if os.environ.get("LEUKOEDGE_SCREENSHOT_DIR"):
        (Path(os.environ["LEUKOEDGE_SCREENSHOT_DIR"]) / "report.pdf").write_bytes(pdf)
    page.emulate_media(media="screen")

    # The corrections as training data: the review page's link, downloaded by this browser (its session).
    page.goto(server.url + "/review")
    export_text = page.locator("#reviewed-export").inner_text()
    assert "leukoedge train --data ORIGINAL --data reviewed/" in export_text and "reviewed.json" in export_text
    with page.expect_download() as download_info:
        page.click("#reviewed-zip-link")
    download = download_info.value
    assert download.failure() is None
    assert re.fullmatch(r"leukoedge-reviewed-\d{8}\.zip", download.suggested_filename)
    zip_path = tmp_path / download.suggested_filename
    download.save_as(zip_path)
    with zipfile.ZipFile(zip_path) as zf:
        assert zf.testzip() is None
        zf.extractall(tmp_path / "reviewed")
    folder = tmp_path / "reviewed" / reviewed_format.label_folder(other)
    image = folder / f"{target.id}{target.original_ext}"
    assert sorted(p.name for p in (tmp_path / "reviewed").iterdir()) == sorted([folder.name,
                                                                                 reviewed_format.MANIFEST_NAME])
    assert [p.name for p in folder.iterdir()] == [image.name]
    assert image.read_bytes() == store.file_path(target.id, "original", target.original_ext).read_bytes()
    entry, = json.loads((tmp_path / "reviewed" / reviewed_format.MANIFEST_NAME).read_text())["images"]
    assert (entry["result_id"], entry["reviewer_label"], entry["review_note"]) == (target.id, other, "nucleus lobed")
    assert entry["sample_id"] == sample.id and entry["bundle_sha256"] == classifier.info()["bundle_sha256"]

    # The real CLI reads the unzipped folder as a class-folder dataset: one image, under the reviewer's label.
    check = subprocess.run([*CLI, "data", "check", str(tmp_path / "reviewed"), "--layout", "class-folders",
                            "--strict", "--json"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert check.returncode == 0, check.stderr
    report = json.loads(check.stdout)
    assert report["layout"] == "class-folders" and report["classes"] == {other: 1} and report["images"] == 1
    assert not report["errors"]

    assert not console_errors, console_errors
    context.close()
