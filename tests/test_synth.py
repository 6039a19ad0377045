"""The synthetic smear generator: deterministic, Taleqani layout, morphology not colour."""
from __future__ import annotations

import hashlib

import numpy as np
import pytest

from leukoedge.data.readers import read_dataset
from leukoedge.data.synth import STYLES, generate, render_field
from leukoedge.errors import DatasetError, UsageError
from leukoedge.preprocess import load_image


def _digest(paths):
    return [hashlib.sha256(p.read_bytes()).hexdigest() for p in paths]


def test_same_seed_same_bytes_and_independent_of_n(tmp_path):
    a = generate(tmp_path / "a", 12, size=64, seed=7)
    b = generate(tmp_path / "b", 12, size=64, seed=7)
    c = generate(tmp_path / "c", 20, size=64, seed=7)
    assert _digest(a) == _digest(b)
    first_benign = lambda ps: next(p for p in ps if p.name == "WBC-Benign-001.jpg")  # noqa: E731
    assert _digest([first_benign(a)]) == _digest([first_benign(c)])
    d = generate(tmp_path / "d", 12, size=64, seed=8)
    assert _digest(a) != _digest(d)


def test_written_in_taleqani_layout_with_capture_numbers(tmp_path):
    generate(tmp_path, 10, size=48)
    layout, records = read_dataset(tmp_path)
    assert layout == "taleqani"
    counts = {label: sum(r.label == label for r in records) for label in STYLES}
    assert counts == {"Benign": 3, "Early Pre-B": 3, "Pre-B": 2, "Pro-B": 2}
    assert load_image(tmp_path / records[0].path).shape == (48, 48, 3)


def _white_cell_fraction(rgb):
    """Fraction of bluish pixels (nucleus + cytoplasm): the white cell's size."""
    rgb = rgb.astype(np.int32)
    return float(((rgb[..., 2] - rgb[..., 0]) > 10).mean())


def test_classes_differ_in_morphology_not_in_overall_colour():
    per_class = {}
    for label in STYLES:
        imgs = [render_field(label, np.random.default_rng([11, i]), 96) for i in range(40)]
        per_class[label] = (np.array([im.reshape(-1, 3).mean(0) for im in imgs]), np.array([_white_cell_fraction(im) for im in imgs]))
    means = np.array([per_class[c][0].mean(0) for c in STYLES])
    spread = np.array([per_class[c][0].std(0) for c in STYLES]).mean(0)
    # mean colour per class differs by less than the within-class spread: no colour shortcut
    assert (means.max(0) - means.min(0) < spread).all()
    # white-cell area grows from Benign through Early, Pre to Pro-B on average (morphology carries the label)
    size = [per_class[c][1].mean() for c in STYLES]
    assert size == sorted(size) and size[-1] > size[0] * 1.3


def test_rerun_is_idempotent_but_a_stale_larger_set_is_refused(tmp_path):
    first = generate(tmp_path, 8, size=32)
    again = generate(tmp_path, 8, size=32)
    assert _digest(first) == _digest(again)
    with pytest.raises(DatasetError, match="would not write"):
        generate(tmp_path, 4, size=32)
    with pytest.raises(UsageError):
        generate(tmp_path / "x", 3)
    with pytest.raises(UsageError):
        generate(tmp_path / "y", 8, size=8)
