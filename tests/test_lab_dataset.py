"""A lab's first dataset, end to end (issue 14): small, two classes, or a 200-image Taleqani subset.

Two real-looking small sets: a generated 2-class set (the project's smear
generator, 60 fields per class, written as class folders as a lab would) and,
where ../shared is present, a 200-image subset of the Taleqani fields (50 per
class, contiguous capture numbers, the public layout). On them: the folds
partition the images, ``data check`` raises no false alarm, and the whole path
-- ``train --folds``, ``convert`` with the default calibration size, the
statistical parity gate, the card -- works without dataset-specific text.
Mechanisms only: what a 2-epoch training learns differs between CPUs.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import TALEQANI, training_seed
from leukoedge.cli import main
from leukoedge.data.check import check_dataset
from leukoedge.data.split import check_partition, make_folds
from leukoedge.data.synth import render_field


@pytest.fixture(scope="module")
def two_class_set(tmp_path_factory) -> Path:
    """60 'blast' (Pro-B style) and 60 'normal' (Benign style) generated fields, 96 px JPEG, in class folders."""
    root = tmp_path_factory.mktemp("lab2")
    rng = np.random.default_rng(training_seed(40))
    for label, style in (("blast", "Pro-B"), ("normal", "Benign")):
        (root / label).mkdir()
        for i in range(60):
            Image.fromarray(render_field(style, rng, 96)).save(root / label / f"field_{i:03d}.jpg", quality=92)
    return root


@pytest.fixture(scope="module")
def taleqani_200(tmp_path_factory) -> Path:
    if not TALEQANI.is_dir():
        pytest.skip(f"{TALEQANI} is absent (team-only real images)")
    root = tmp_path_factory.mktemp("tq200")
    for cls in ("Benign", "Early", "Pre", "Pro"):
        files = sorted((TALEQANI / "Original" / cls).iterdir())[:50]  # one contiguous capture block per class
        (root / "Original" / cls).mkdir(parents=True)
        for f in files:
            shutil.copyfile(f, root / "Original" / cls / f.name)
    return root


def test_folds_partition_a_small_two_class_set(two_class_set):
    folds = make_folds(two_class_set, folds=5, progress=False)
    check_partition(folds)
    assert all(len(m.subset("test")) == 24 and m.subset("val") for m in folds)


@pytest.mark.shared
def test_folds_partition_the_taleqani_subset_and_keep_copies_together(taleqani_200):
    folds = make_folds(taleqani_200, folds=5, progress=False)
    check_partition(folds)
    assert {m.layout for m in folds} == {"taleqani"} and sum(len(m.subset("test")) for m in folds) == 200


def test_data_check_raises_no_false_alarm_on_a_clean_small_set(two_class_set):
    report = check_dataset(two_class_set, progress=False)
    assert report.ok and report.confounds == [] and report.warnings == []


@pytest.mark.shared
def test_data_check_on_the_taleqani_subset_has_no_name_or_size_confound(taleqani_200):
    report = check_dataset(taleqani_200, progress=False)
    assert report.layout == "taleqani" and sum(report.classes.values()) == 200
    assert not [c for c in report.confounds if c["property"] in ("file-name pattern", "image size")]


@pytest.mark.slow
def test_a_small_lab_set_goes_from_folds_to_a_bundle_with_cards_of_its_own(two_class_set, tmp_path, caplog):
    run = tmp_path / "cv"
    assert main(["train", "--data", str(two_class_set), "--folds", "2", "--model", "leuko-tiny", "--input-size", "32",
                 "--epochs", "2", "--batch", "16", "--seed", str(training_seed(41)), "--no-audit",
                 "--out", str(run)]) == 0
    cv = json.loads((run / "cv.json").read_text())
    assert len(cv["folds"]) == 2 and sum(sum(r) for r in cv["pooled"]["confusion_matrix"]) == 120
    card = (run / "model_card.md").read_text()
    assert "Taleqani" not in card and "blast" in card
    # convert with the DEFAULT calibration size: 300 asked, the fold's train split has fewer -> all of them.
    with caplog.at_level("WARNING"):
        rc = main(["convert", str(run / "fold-1"), "--quantize", "int8", "--out", str(tmp_path / "bundle")])
    assert any("fewer than the 300 asked for; using all" in r.getMessage() for r in caplog.records)
    parity = json.loads((tmp_path / "bundle" / "parity.json").read_text())
    assert "flip_p_value" in parity and parity["n_images"] == 60  # the gate's statistics at this n
    assert rc == 0 or not parity["passed"]  # a failed gate exits non-zero; either way the report is there
    bundle_card = (tmp_path / "bundle" / "model_card.md").read_text()
    assert "Taleqani" not in bundle_card and "label_corner" not in bundle_card
    assert bundle_card.count("## Out-of-distribution abstention") <= 1
