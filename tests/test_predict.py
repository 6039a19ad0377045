"""``leukoedge predict``: folders and files through the device runtime, one row per image, broken files as rows.

Runs the real CLI on a real bundle (the session's tiny int8 bundle) and real
image files, including damaged ones; checks the JSON and CSV contracts and
that the command never imports TensorFlow (it must run on a Pi).
"""
from __future__ import annotations

import csv
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bundle_factory import CLASSES, draw_cell, shared_tiny_bundle
from leukoedge import cli
from leukoedge.bundle import load_bundle
from leukoedge.predict import ROW_FIELDS, collect_inputs
from leukoedge.runtime import Classifier


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return shared_tiny_bundle(tmp_path_factory, "int8", True)


@pytest.fixture()
def folder(tmp_path) -> Path:
    """Six good fields (two formats, a nested folder), a truncated JPEG, a text file renamed .png, a note."""
    rng = np.random.default_rng(5)
    root = tmp_path / "fields"
    (root / "slide-2").mkdir(parents=True)
    for i, label in enumerate(CLASSES + CLASSES[:2]):
        img = Image.fromarray(draw_cell(label, rng, size=96))
        target = root / ("slide-2" if i % 2 else "") / f"field-{i}.{'png' if i % 3 == 0 else 'jpg'}"
        img.save(target)
    good = (root / "field-2.jpg").read_bytes()
    (root / "truncated.jpg").write_bytes(good[: len(good) // 3])
    (root / "not-an-image.png").write_text("hello")
    (root / "notes.txt").write_text("slide 2, stained 2026-11-30")
    return root


def _run(argv, capsys):
    code = cli.main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_json_has_one_row_per_image_and_errors_as_rows(bundle, folder, capsys):
    code, out, err = _run(["predict", str(bundle), str(folder), "--json"], capsys)
    assert code == 0, err
    doc = json.loads(out)
    rows = {Path(r["path"]).name: r for r in doc["rows"]}
    assert len(rows) == 8 and "notes.txt" not in rows  # folders: image suffixes only
    for name in ("truncated.jpg", "not-an-image.png"):
        assert rows[name]["error"] and rows[name]["label"] is None and rows[name]["predicted"] is None
    good = [r for r in doc["rows"] if not r["error"]]
    assert len(good) == 6
    clf = Classifier(load_bundle(bundle))
    for row in good:
        for key in ("path", "label", "predicted", "confidence", "probabilities", "abstained", "quality",
                    "um_per_px", "tiles"):
            assert key in row
        assert set(row["probabilities"]) == set(CLASSES)
        assert abs(sum(row["probabilities"].values()) - 1) < 1e-4
        expected = clf.classify(row["path"], heatmap=False)
        assert row["predicted"] == expected.label
        assert row["confidence"] == pytest.approx(expected.confidence, abs=1e-6)
        assert row["label"] == (None if (row["abstained"] or row["retake"]) else row["predicted"])
        assert row["tiles"] >= 1
    assert doc["summary"]["images"] == 8 and doc["summary"]["failed"] == 2
    assert doc["bundle_sha256"] == load_bundle(bundle).sha256
    assert "Research use only" in doc["notice"]


def test_csv_is_written_with_a_probability_column_per_class(bundle, folder, tmp_path, capsys):
    target = tmp_path / "out" / "rows.csv"
    target.parent.mkdir()
    code, out, err = _run(["predict", str(bundle), str(folder / "field-0.png"), str(folder / "truncated.jpg"),
                           "--csv", str(target)], capsys)
    assert code == 0, err
    with target.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == [*ROW_FIELDS, *(f"p_{c}" for c in CLASSES)]
    assert [Path(r["path"]).name for r in rows] == ["field-0.png", "truncated.jpg"]
    assert rows[0]["error"] == "" and rows[0]["predicted"] in CLASSES
    assert abs(sum(float(rows[0][f"p_{c}"]) for c in CLASSES) - 1) < 1e-4
    assert rows[1]["error"] and rows[1]["p_Benign"] == ""
    assert "2 images" in err and "failed 1" in err and "Research use only" in err


def test_table_output_names_each_image_and_why_it_has_no_label(bundle, folder, capsys):
    code, out, err = _run(["predict", str(bundle), str(folder)], capsys)
    assert code == 0
    lines = out.strip().splitlines()
    assert len(lines) == 8
    assert any("truncated.jpg" in line and "error:" in line for line in lines)


def test_nothing_classifiable_exits_3_and_missing_paths_exit_2(bundle, folder, tmp_path, capsys):
    code, out, err = _run(["predict", str(bundle), str(folder / "truncated.jpg"), "--json"], capsys)
    assert code == 3 and json.loads(out)["summary"]["failed"] == 1
    code, out, err = _run(["predict", str(bundle), str(tmp_path / "nowhere")], capsys)
    assert code == 2 and "no such file or folder" in err and "Traceback" not in err
    empty = tmp_path / "empty"
    empty.mkdir()
    code, out, err = _run(["predict", str(bundle), str(empty)], capsys)
    assert code == 2 and "no image files" in err
    code, out, err = _run(["predict", str(bundle), str(folder), "--um-per-px", "-1"], capsys)
    assert code == 2 and "--um-per-px" in err


def test_a_damaged_bundle_is_refused_with_a_message(bundle, folder, tmp_path, capsys):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(bundle, broken)
    model = next(broken.glob("*.tflite"))
    model.write_bytes(model.read_bytes()[:-100])
    code, out, err = _run(["predict", str(broken), str(folder)], capsys)
    assert code == 8 and err.startswith("error: ") and "Traceback" not in err


def test_inputs_are_deduplicated_and_named_files_kept_whatever_their_suffix(folder):
    odd = folder / "field.dat"
    odd.write_bytes((folder / "field-0.png").read_bytes())
    inputs = collect_inputs([folder, folder / "field-0.png", odd])
    names = [p.name for p in inputs.files]
    assert names.count("field-0.png") == 1 and "field.dat" in names and "notes.txt" not in names


def test_predict_never_imports_tensorflow(bundle, folder):
    code = textwrap.dedent(f"""
        import sys
        from leukoedge import cli
        rc = cli.main(["predict", {str(bundle)!r}, {str(folder)!r}, "--json"])
        assert rc == 0, rc
        bad = sorted(m for m in sys.modules if m.split(".")[0] in ("tensorflow", "keras"))
        assert not bad, bad
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_a_scaled_bundle_tiles_a_wide_capture_at_the_given_scale(bundle, tmp_path, capsys):
    """A 2x2 mosaic of fields at the training scale: four tiles at the given um/px, recorded in the row."""
    from bundle_factory import SIZE, scaled_bundle_copy

    scaled = scaled_bundle_copy(bundle, tmp_path / "scaled", 0.5, without=("quality",))
    rng = np.random.default_rng(9)
    tiles = [draw_cell(CLASSES[0], rng, size=SIZE) for _ in range(4)]
    mosaic = np.concatenate([np.concatenate(tiles[:2], axis=1), np.concatenate(tiles[2:], axis=1)], axis=0)
    path = tmp_path / "wide.png"
    Image.fromarray(mosaic).save(path)
    code, out, err = _run(["predict", str(scaled), str(path), "--um-per-px", "0.5", "--json"], capsys)
    assert code == 0, err
    row = json.loads(out)["rows"][0]
    assert row["error"] is None and row["tiles"] == 4
    assert row["um_per_px"] == pytest.approx(0.5) and row["scale_source"] == "given"
    code, out, err = _run(["predict", str(bundle), str(path), "--um-per-px", "0.5", "--json"], capsys)
    row = json.loads(out)["rows"][0]
    assert row["scale_source"] == "bundle-unknown" and row["tiles"] == 1  # no training scale: stretched as before
