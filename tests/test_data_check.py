"""`leukoedge data check` on broken files, duplicates and the real Taleqani set."""
from __future__ import annotations

import io
import json
import shutil

import numpy as np
import pytest
from PIL import Image

from data_fixtures import make_taleqani
from leukoedge.cli import main
from leukoedge.data.check import check_dataset
from leukoedge.data.synth import render_field


@pytest.fixture()
def broken(tmp_path):
    root = make_taleqani(tmp_path / "ds", per_class=4)
    benign = root / "Original" / "Benign"
    good = (benign / "WBC-Benign-001.jpg").read_bytes()
    (benign / "WBC-Benign-101.jpg").write_bytes(good[: len(good) // 2])  # truncated
    (benign / "WBC-Benign-102.jpg").write_bytes(b"")  # zero bytes
    (benign / "WBC-Benign-103.jpg").write_text("not really a jpeg\n")  # text named .jpg
    (benign / "notes.txt").write_text("stray file")
    buf = io.BytesIO()
    Image.fromarray(np.full((16, 16), 40000, np.uint16)).save(buf, format="TIFF")
    (root / "Original" / "Pre" / "WBC-Malignant-Pre-101.tif").write_bytes(buf.getvalue())  # 16-bit: fine
    Image.fromarray(np.full((16, 16), 90, np.uint8)).save(root / "Original" / "Pre" / "WBC-Malignant-Pre-102.png")
    Image.fromarray(np.full((16, 16, 4), 90, np.uint8), "RGBA").save(root / "Original" / "Pre" / "WBC-Malignant-Pre-103.png")
    bomb = root / "Original" / "Pro" / "WBC-Malignant-Pro-101.png"
    from real_images import png_header_only
    bomb.write_bytes(png_header_only(40000, 40000))
    shutil.copyfile(root / "Original" / "Pro" / "WBC-Malignant-Pro-001.jpg", root / "Original" / "Pro" / "WBC-Malignant-Pro-102.jpg")
    shutil.copyfile(root / "Original" / "Pro" / "WBC-Malignant-Pro-002.jpg", root / "Original" / "Early" / "WBC-Malignant-Early-102.jpg")
    return root


def test_report_lists_every_broken_file_and_duplicate(broken):
    report = check_dataset(broken, progress=False)
    reasons = {e["path"].rsplit("/", 1)[-1]: e["reason"] for e in report.errors}
    assert set(reasons) == {"WBC-Benign-101.jpg", "WBC-Benign-102.jpg", "WBC-Benign-103.jpg", "notes.txt",
                            "WBC-Malignant-Pro-101.png"}
    assert "empty" in reasons["WBC-Benign-102.jpg"]
    assert "truncated" in reasons["WBC-Benign-101.jpg"] or "corrupt" in reasons["WBC-Benign-101.jpg"]
    assert "not an image" in reasons["WBC-Benign-103.jpg"]
    assert "too large" in reasons["WBC-Malignant-Pro-101.png"] or "bomb" in reasons["WBC-Malignant-Pro-101.png"]
    assert report.modes.get("I;16") == 1 and report.modes.get("L") == 1 and report.modes.get("RGBA") == 1
    flat = [sorted(p.rsplit("/", 1)[-1] for p in g) for g in report.duplicates]
    assert ["WBC-Malignant-Pro-001.jpg", "WBC-Malignant-Pro-102.jpg"] in flat
    assert len(report.cross_class_duplicates) == 1
    assert report.duplicates_by_class == {"Pro-B": 1}


def test_json_and_strict_exit_codes(broken, capsys):
    assert main(["data", "check", str(broken), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    for key in ("classes", "duplicates", "near_duplicates", "errors"):
        assert key in data
    assert data["classes"]["Benign"] == 7
    assert all(set(e) == {"path", "reason"} for e in data["errors"])
    assert main(["data", "check", str(broken), "--strict"]) == 1
    assert "PROBLEMS FOUND" in capsys.readouterr().out


def test_clean_dataset_passes_strict(tmp_path, capsys):
    root = make_taleqani(tmp_path, per_class=3)
    assert main(["data", "check", str(root), "--strict"]) == 0
    assert capsys.readouterr().out.rstrip().endswith("OK")


def test_near_duplicates_are_found(tmp_path):
    root = make_taleqani(tmp_path, per_class=3)
    src = root / "Original" / "Pre" / "WBC-Malignant-Pre-001.jpg"
    field = render_field("Pre-B", np.random.default_rng(1), 96)
    Image.fromarray(field).save(src, quality=95)
    img = Image.fromarray(field).resize((80, 80), Image.Resampling.BICUBIC)
    img.save(root / "Original" / "Pre" / "WBC-Malignant-Pre-050.jpg", quality=60)  # re-encoded, resized copy
    report = check_dataset(root, progress=False)
    names = [sorted(p.rsplit("/", 1)[-1] for p in g) for g in report.near_duplicates]
    assert ["WBC-Malignant-Pre-001.jpg", "WBC-Malignant-Pre-050.jpg"] in names


@pytest.mark.shared
def test_real_taleqani_has_40_identical_pairs_in_pro(taleqani_dir):
    report = check_dataset(taleqani_dir, progress=False)
    assert report.classes == {"Benign": 403, "Early Pre-B": 788, "Pre-B": 770, "Pro-B": 643}
    assert report.duplicates_by_class == {"Pro-B": 40}
    assert len(report.duplicates) == 40 and all(len(g) == 2 for g in report.duplicates)
    assert not report.errors


def test_distinct_fields_with_the_same_illumination_are_not_near_duplicates(tmp_path):
    """pHash alone collides on smooth fields; the thumbnail correlation must veto that."""
    from leukoedge.data.hashing import NEAR_DUPLICATE_BITS, fingerprint, hamming, near_duplicate_pairs

    fields = [render_field("Benign", np.random.default_rng([5, i]), 96) for i in range(60)]
    prints = [fingerprint(f) for f in fields]
    hashes, thumbs = [p[0] for p in prints], [p[1] for p in prints]
    assert near_duplicate_pairs(hashes, thumbs=thumbs) == []
    copy = np.asarray(Image.fromarray(fields[0]).resize((90, 90), Image.Resampling.BILINEAR))
    h, t = fingerprint(copy)
    assert hamming(h, hashes[0]) <= NEAR_DUPLICATE_BITS
    assert near_duplicate_pairs([hashes[0], h], thumbs=[thumbs[0], t]) == [(0, 1)]


# -- issue 14: confounds and a root above the datasets ------------------------------------------
def _class_folders(root, spec: dict[str, list[tuple[str, tuple[int, int], str]]]):
    """root/<class>/<name>: (name, (width, height), mode) per image; smear content from the generator."""
    rng = np.random.default_rng(0)
    for label, images in spec.items():
        (root / label).mkdir(parents=True, exist_ok=True)
        for name, size, mode in images:
            img = Image.fromarray(render_field("Benign", rng, 64)).resize(size).convert(mode)
            img.save(root / label / name)
    return root


def test_an_image_size_confounded_with_the_class_is_reported(tmp_path):
    """All 33 images of one camera's size in one class (as in a public field set): a net can read the size."""
    spec = {
        "blast": [(f"im{i:03d}.jpg", (171, 137), "RGB") for i in range(33)] + [(f"x{i:03d}.jpg", (130, 97), "RGB") for i in range(17)],
        "normal": [(f"im{i:03d}.jpg", (130, 97), "RGB") for i in range(50)],
    }
    report = check_dataset(_class_folders(tmp_path / "ds", spec), progress=False)
    sizes = [c for c in report.confounds if c["property"] == "image size"]
    assert len(sizes) == 1 and sizes[0]["value"] == "171x137" and sizes[0]["label"] == "blast"
    assert sizes[0]["n"] == sizes[0]["n_label"] == 33 and sizes[0]["p_chance"] < 1e-6
    text = report.to_text()
    assert "WARNING image size 171x137: 33 of its 33 images are 'blast'" in text
    assert report.ok  # a warning, not an error: the files are fine


def test_mode_format_and_naming_confounds_and_no_false_alarm(tmp_path):
    spec = {
        "blast": [(f"scan-{i:03d}.tif", (96, 96), "L") for i in range(12)],
        "normal": [(f"IMG_{i:04d}.jpg", (96, 96), "RGB") for i in range(12)],
    }
    report = check_dataset(_class_folders(tmp_path / "ds", spec), progress=False)
    assert {c["property"] for c in report.confounds} == {"mode", "format", "file-name pattern"}
    # Same properties in both classes, file names that only spell the label: nothing to report.
    even = {"blast": [(f"blast_{i:03d}.png", (96, 96), "RGB") for i in range(12)],
            "normal": [(f"normal_{i:03d}.png", (96, 96), "RGB") for i in range(12)]}
    assert check_dataset(_class_folders(tmp_path / "even", even), progress=False).confounds == []


def test_taleqani_names_are_not_reported_as_a_confound(tmp_path):
    report = check_dataset(make_taleqani(tmp_path / "tq", per_class=8), progress=False)
    assert not [c for c in report.confounds if c["property"] == "file-name pattern"]


def test_a_root_above_several_datasets_is_said_to_be_one(tmp_path, capsys):
    """Pointed at the folder above the datasets, the class-folder reader took their names for classes, silently."""
    parent = tmp_path / "work"
    for name in ("ALL_IDB_A", "ALL_IDB_B"):
        _class_folders(parent / name, {"blast": [(f"b{i}.png", (64, 64), "RGB") for i in range(3)],
                                       "normal": [(f"n{i}.png", (64, 64), "RGB") for i in range(3)]})
    report = check_dataset(parent, progress=False)
    assert report.layout == "class-folders" and set(report.classes) == {"ALL_IDB_A", "ALL_IDB_B"}
    assert len(report.warnings) == 2 and "looks like the parent of one or more datasets" in report.warnings[0]
    assert main(["data", "check", str(parent), "--json"]) == 0
    assert "parent of one or more datasets" in json.loads(capsys.readouterr().out)["warnings"][0]
