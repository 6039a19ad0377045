"""Reviewed captures become a training set (issue 16): the export, its CLI and route, read back by the data layer.

Real SQLite store in tmp_path, real JPEG/PNG files (two of them multi-megapixel),
real zip files; the route through the real app (real bundle, LiteRT) and Flask's
test client.
"""
from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_fixtures import make_taleqani
from leukoedge.cli import main
from leukoedge.data import reviewed as fmt
from leukoedge.data.check import check_dataset
from leukoedge.data.split import make_manifest
from leukoedge.edge_app.reviewed_export import CHUNK, NothingToExportError, export, iter_zip, plan_export
from leukoedge.edge_app.storage import REVIEW_UNUSABLE, ResultStore
from leukoedge.errors import DatasetError, UsageError

pytest_plugins = ["app_fixtures"]  # the app fixtures, for the route tests

LABELS = ("Benign", "Early Pre-B", "Pre-B", "Pro-B")
BUNDLE_SHA = "5e" * 32


def _image(seed: int, size: tuple[int, int], fmt_name: str) -> bytes:
    """A smooth field with noise: a real photo-like file (noise keeps JPEG from shrinking it to nothing)."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[:h, :w]
    base = np.stack([200 + 30 * np.sin(xx / 97.0 + seed), 180 + 30 * np.cos(yy / 83.0), 210 + 0 * xx], -1)
    arr = np.clip(base + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(arr).save(out, format=fmt_name, **({"quality": 92} if fmt_name == "JPEG" else {}))
    return out.getvalue()


def _add(store: ResultStore, seed: int, *, label: str = "Benign", sample=None, size=(64, 48), png=False,
         created_at=None, **extra):
    probs = {c: 0.1 for c in LABELS}
    probs[label] = 0.7
    fields = {"source": "capture", "filename": f"field-{seed}.jpg", "label": label, "confidence": 0.7,
              "abstained": False, "ood_score": 0.3, "probabilities": probs, "latency_ms": 5.0, "timings": {},
              "model_name": "leuko-tiny", "model_version": "3", "width": size[0], "height": size[1],
              "original_ext": ".png" if png else ".jpg", "um_per_px": 0.21, "scale_source": "given",
              "created_at": created_at or 1_790_000_000.0 + seed, "sample_id": sample.id if sample else None,
              **extra}
    files = {"original": _image(seed, size, "PNG" if png else "JPEG"), "thumbnail": _image(seed, (16, 12), "JPEG")}
    return store.add(fields, files)


@pytest.fixture()
def store(tmp_path):
    s = ResultStore(tmp_path / "data")
    yield s
    s.close()


@pytest.fixture()
def reviewed_store(store):
    """Two slides, a capture in no sample, one unusable, one unreviewed, one reviewed then deleted."""
    slide1, slide2 = store.create_sample("slide 1", "a note"), store.create_sample("slide 2")
    r = {}
    r["big_jpeg"] = _add(store, 1, sample=slide1, size=(2400, 1800), bundle_sha256=BUNDLE_SHA)  # 4.3 MP
    r["big_png"] = _add(store, 2, sample=slide1, size=(1600, 1200), png=True, label="Pre-B")  # 1.9 MP
    r["s2a"] = _add(store, 3, sample=slide2, label="Pro-B")
    r["s2b"] = _add(store, 4, sample=slide2, label="Pro-B", retake=True,
                    quality={"reasons": ["out_of_focus"], "message": "retake: out of focus"})
    r["loose"] = _add(store, 5, label="Early Pre-B")
    r["unusable"] = _add(store, 6, sample=slide2)
    r["unreviewed"] = _add(store, 7, sample=slide2)
    r["deleted"] = _add(store, 8, sample=slide1)
    store.review(r["big_jpeg"].id, "Benign")
    store.review(r["big_png"].id, "Early Pre-B", "nucleus looks immature")  # a correction
    store.review(r["s2a"].id, "Pro-B")
    store.review(r["s2b"].id, "Pro-B")
    store.review(r["loose"].id, "Early Pre-B")
    store.review(r["unusable"].id, REVIEW_UNUSABLE, "smudged")
    store.review(r["deleted"].id, "Benign")
    store.delete(r["deleted"].id)
    return store, r, (slide1, slide2)


def test_zip_holds_the_originals_in_reviewer_label_folders_and_one_manifest(reviewed_store, tmp_path):
    store, r, (slide1, slide2) = reviewed_store
    manifest = export(store, tmp_path / "out.zip")
    exported = ["big_jpeg", "big_png", "s2a", "s2b", "loose"]
    with zipfile.ZipFile(tmp_path / "out.zip") as zf:
        assert zf.testzip() is None
        names = set(zf.namelist())
        expected = {"Benign/" + r["big_jpeg"].id + ".jpg", "Early Pre-B/" + r["big_png"].id + ".png",
                    "Pro-B/" + r["s2a"].id + ".jpg", "Pro-B/" + r["s2b"].id + ".jpg",
                    "Early Pre-B/" + r["loose"].id + ".jpg", fmt.MANIFEST_NAME}
        assert names == expected
        for key in exported:
            res = r[key]
            entry = next(e for e in manifest["images"] if e["result_id"] == res.id)
            assert zf.read(entry["path"]) == store.file_path(res.id, "original", res.original_ext).read_bytes()
        assert json.loads(zf.read(fmt.MANIFEST_NAME)) == manifest
    assert manifest["format"] == fmt.FORMAT and manifest["version"] == fmt.VERSION and manifest["exported_at"] > 0
    assert manifest["counts"]["images"] == 5 and manifest["counts"]["left_out"] == {"unusable": 1, "missing_file": 0}
    assert manifest["counts"]["by_label"] == {"Benign": 1, "Early Pre-B": 2, "Pro-B": 2}
    png = next(e for e in manifest["images"] if e["result_id"] == r["big_png"].id)
    assert png["sample_id"] == slide1.id and png["sample_name"] == "slide 1"
    assert png["predicted_label"] == "Pre-B" and png["reviewer_label"] == "Early Pre-B"
    assert png["review_note"] == "nucleus looks immature" and png["reviewed_at"] >= png["captured_at"]
    assert png["probabilities"]["Pre-B"] == pytest.approx(0.7) and png["model_name"] == "leuko-tiny"
    assert png["model_version"] == "3" and png["um_per_px"] == 0.21 and png["scale_source"] == "given"
    big = next(e for e in manifest["images"] if e["result_id"] == r["big_jpeg"].id)
    assert big["bundle_sha256"] == BUNDLE_SHA and png["bundle_sha256"] is None  # None: the row did not record it
    retake = next(e for e in manifest["images"] if e["result_id"] == r["s2b"].id)
    assert retake["retake"] and retake["quality_reasons"] == ["out_of_focus"]
    assert [e["captured_at"] for e in manifest["images"]] == sorted(e["captured_at"] for e in manifest["images"])
    ids = {e["result_id"] for e in manifest["images"]}
    assert not ids & {r["unusable"].id, r["unreviewed"].id, r["deleted"].id}


def test_the_zip_streams_in_pieces_no_bigger_than_a_chunk(reviewed_store):
    """Bounded memory, as a mechanism: a 4 MP original leaves the exporter CHUNK bytes at a time."""
    store, r, _ = reviewed_store
    big = store.file_path(r["big_jpeg"].id, "original").stat().st_size
    assert big > 3 * CHUNK
    pieces = [len(p) for p in iter_zip(plan_export(store))]
    assert max(pieces) <= CHUNK + 64 * 1024 and sum(pieces) > big


def test_folder_export_equals_the_zip_and_reads_back_as_a_dataset(reviewed_store, tmp_path, capsys):
    store, r, (slide1, slide2) = reviewed_store
    folder = export(store, tmp_path / "folder")
    export(store, tmp_path / "out.zip")
    with zipfile.ZipFile(tmp_path / "out.zip") as zf:
        zf.extractall(tmp_path / "unzipped")
    for e in folder["images"]:
        assert (tmp_path / "folder" / e["path"]).read_bytes() == (tmp_path / "unzipped" / e["path"]).read_bytes()
    report = check_dataset(tmp_path / "unzipped", progress=False)
    assert report.layout == "reviewed" and report.ok and report.classes == {"Benign": 1, "Early Pre-B": 2, "Pro-B": 2}
    # as a plain class-folder dataset too, with reviewed.json ignored (no stray-file error)
    assert main(["data", "check", str(tmp_path / "unzipped"), "--layout", "class-folders", "--strict"]) == 0
    assert "layout: class-folders, 5 image files" in capsys.readouterr().out
    with pytest.raises(UsageError, match="not an empty folder"):
        export(store, tmp_path / "folder")


def test_the_export_trains_with_the_original_data_samples_kept_whole(reviewed_store, tmp_path):
    store, r, (slide1, slide2) = reviewed_store
    export(store, tmp_path / "reviewed")
    orig = make_taleqani(tmp_path / "orig", per_class=8)
    for seed in range(4):
        m = make_manifest([orig, tmp_path / "reviewed"], seed=seed, progress=False)
        groups = {e.group for e in m.entries if e.root == 1}
        assert groups == {f"sample:{slide1.id}", f"sample:{slide2.id}", f"result:{r['loose'].id}"}
        for g in groups:
            assert len({e.split for e in m.entries if e.group == g}) == 1


def test_a_path_hostile_label_is_made_a_safe_folder_and_reads_back_exactly(store, tmp_path):
    hostile = "../../etc/passwd"
    for seed in range(3):
        res = _add(store, 10 + seed)
        store.review(res.id, hostile if seed else "Benign")
    manifest = export(store, tmp_path / "out.zip")
    with zipfile.ZipFile(tmp_path / "out.zip") as zf:
        for name in zf.namelist():
            assert ".." not in Path(name).parts and not name.startswith("/") and name.count("/") <= 1
        zf.extractall(tmp_path / "x")
    assert sorted(p.name for p in (tmp_path / "x").iterdir()) == ["%2E%2E%2F..%2Fetc%2Fpasswd", "Benign",
                                                                    fmt.MANIFEST_NAME]
    assert {e["reviewer_label"] for e in manifest["images"]} == {hostile, "Benign"}
    assert check_dataset(tmp_path / "x", progress=False).classes == {hostile: 2, "Benign": 1}


def test_labels_that_collide_on_a_case_insensitive_disk_are_refused(store, tmp_path):
    a, b = _add(store, 1), _add(store, 2)
    store.review(a.id, "Benign")
    store.review(b.id, "benign")
    with pytest.raises(DatasetError, match="case-insensitive"):
        export(store, tmp_path / "out.zip")
    assert not (tmp_path / "out.zip").exists()


def test_nothing_reviewed_is_a_clear_error_and_writes_nothing(store, tmp_path):
    with pytest.raises(NothingToExportError, match="no reviewed images"):
        export(store, tmp_path / "out.zip")
    store.review(_add(store, 1).id, REVIEW_UNUSABLE)
    with pytest.raises(NothingToExportError, match="1 unusable") as err:
        export(store, tmp_path / "folder")
    assert "Review page" in err.value.user_message()
    assert not (tmp_path / "out.zip").exists() and not (tmp_path / "folder").exists()


def test_a_missing_original_is_left_out_and_counted(store, tmp_path):
    keep, lost = _add(store, 1), _add(store, 2)
    store.review(keep.id, "Benign")
    store.review(lost.id, "Benign")
    store.file_path(lost.id, "original").unlink()
    manifest = export(store, tmp_path / "out.zip")
    assert [e["result_id"] for e in manifest["images"]] == [keep.id]
    assert manifest["counts"]["left_out"]["missing_file"] == 1


def test_cli_exports_a_copied_data_dir(reviewed_store, tmp_path, capsys):
    store, _, _ = reviewed_store
    data_dir = store.data_dir
    store.close()
    assert main(["data", "reviewed", str(data_dir), "--out", str(tmp_path / "r.zip")]) == 0
    out = capsys.readouterr().out
    assert "wrote 5 image(s)" in out and "1 unusable" in out
    assert zipfile.ZipFile(tmp_path / "r.zip").testzip() is None
    assert main(["data", "reviewed", str(data_dir), "--out", str(tmp_path / "r")]) == 0
    assert (tmp_path / "r" / fmt.MANIFEST_NAME).is_file()
    assert main(["data", "reviewed", str(tmp_path / "nowhere"), "--out", str(tmp_path / "s")]) == 4
    assert "results.sqlite3" in capsys.readouterr().err


def test_cli_stays_tensorflow_and_flask_free():
    import subprocess
    import sys

    code = ("import sys; from leukoedge.cli import build_parser; build_parser(); "
            "import leukoedge.edge_app.reviewed_export; "
            "print(sorted(m for m in ('tensorflow', 'flask', 'keras') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# --- the route -------------------------------------------------------------------------------------------------


def _with_route(app):
    from leukoedge.edge_app.views.export_reviewed import bp

    if "export_reviewed" not in app.blueprints:  # until app.py registers it
        app.register_blueprint(bp)
    return app


def test_route_streams_the_zip_with_a_dated_name(make_app, classifier):
    from app_helpers import png_bytes
    from bundle_factory import draw_cell

    app = _with_route(make_app())
    client = app.test_client()
    empty = client.get("/export/reviewed.zip")
    assert empty.status_code == 404
    ids = []
    for seed, label in enumerate(("Early", "Pro")):
        image = png_bytes(draw_cell(label, np.random.default_rng(seed), 64))
        r = client.post("/api/classify", data={"image": (io.BytesIO(image), "cell.png")},
                        content_type="multipart/form-data")
        assert r.status_code == 201, r.data
        ids.append(r.json["results"][0]["id"] if "results" in r.json else r.json["id"])
    store = app.extensions["leukoedge"].store
    store.review(ids[0], "Pro")
    store.review(ids[1], REVIEW_UNUSABLE)
    r = client.get("/export/reviewed.zip")
    assert r.status_code == 200 and r.mimetype == "application/zip" and r.is_streamed
    disposition = r.headers["Content-Disposition"]
    assert disposition.startswith("attachment; filename=leukoedge-reviewed-20") and disposition.endswith(".zip")
    with zipfile.ZipFile(io.BytesIO(r.data)) as zf:
        manifest = json.loads(zf.read(fmt.MANIFEST_NAME))
        assert [e["result_id"] for e in manifest["images"]] == [ids[0]]
        assert zf.namelist() == [manifest["images"][0]["path"], fmt.MANIFEST_NAME]
        assert manifest["images"][0]["path"].startswith("Pro/")
        assert manifest["images"][0]["bundle_sha256"] == classifier.info()["bundle_sha256"]


def test_route_needs_the_token(make_app):
    app = _with_route(make_app(host="0.0.0.0", token="t0ken-" * 6))
    r = app.test_client().get("/export/reviewed.zip")
    assert r.status_code == 302 and "/login" in r.headers["Location"]
