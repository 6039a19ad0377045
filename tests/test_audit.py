"""Shortcut audit on a synthetic set with a planted shortcut (class-dependent background tint).

Class 0 has one round nucleus, class 1 two smaller ones of the same total area
(the real, morphological signal: colour statistics cannot see it); the slide
background is tinted by class (the shortcut). A colour-only model must find the
tint and fall to chance once colour is normalised; a morphology model must not.
"""
from __future__ import annotations

import numpy as np
import pytest

from leukoedge.errors import UsageError
from leukoedge.train import audit, cells

SIZE = 40
TINTS = {0: (244, 214, 222), 1: (222, 222, 246)}  # pink slide vs bluish slide


def synthetic(n_per_class=30, seed=0, tinted=True):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:SIZE, :SIZE]
    images, labels = [], []
    for label in (0, 1):
        for _ in range(n_per_class):
            bg = TINTS[label] if tinted else TINTS[int(rng.integers(0, 2))]
            img = np.zeros((SIZE, SIZE, 3)) + bg
            for _ in range(4):  # pale red cells, same for both classes
                cy, cx = rng.integers(0, SIZE, 2)
                img[(yy - cy) ** 2 + (xx - cx) ** 2 < 12] -= (15, 40, 35)
            cy, cy2, cx = rng.integers(8, SIZE - 8), rng.integers(8, SIZE - 8), rng.integers(7, 19)
            if label == 0:
                img[(yy - cy) ** 2 + (xx - cx - 6) ** 2 < 45] = (110, 60, 160)  # 137 px, two r=5 discs: 138 px
            else:
                img[(yy - cy) ** 2 + (xx - cx) ** 2 < 5**2] = (110, 60, 160)
                img[(yy - cy2) ** 2 + (xx - cx - 14) ** 2 < 5**2] = (110, 60, 160)
            img += rng.normal(0, 3, img.shape)
            images.append(np.clip(img, 0, 255).astype(np.uint8))
            labels.append(label)
    return images, np.array(labels)


def disc_image(size=48, radius=9, centre=(20, 26)):
    yy, xx = np.mgrid[:size, :size]
    disc = (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 < radius**2
    img = np.zeros((size, size, 3)) + (240, 200, 210)
    img[disc] = (120, 60, 160)
    img += np.random.default_rng(1).normal(0, 3, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8), disc


def iou(a, b):
    return (a & b).sum() / (a | b).sum()


def test_white_cell_mask_finds_purple_disc():
    img, disc = disc_image()
    mask = cells.white_cell_mask(img, dilate_fraction=0.0)
    assert iou(mask, disc) > 0.7
    dilated = cells.white_cell_mask(img)
    assert dilated.sum() > mask.sum() and np.all(dilated[mask])
    assert not cells.white_cell_mask(np.full((32, 32, 3), (240, 200, 210), np.uint8)).any()


def test_white_cell_mask_ignores_blue_grey_and_pink_red_cells():
    """Bluish-lit Taleqani fields: grey-blue and teal red cells have B > G like nuclei; pink ones have R >> G."""
    size = 64
    yy, xx = np.mgrid[:size, :size]
    img = np.zeros((size, size, 3)) + (234, 246, 243)
    red_cells = {(14, 14): (172, 176, 227), (14, 50): (115, 156, 199), (50, 14): (225, 160, 175)}
    for (cy, cx), colour in red_cells.items():
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < 7**2] = colour
    blast = (yy - 44) ** 2 + (xx - 44) ** 2 < 8**2
    img[blast] = (226, 192, 251)  # pale magenta Pro-B blast
    img = np.clip(img + np.random.default_rng(0).normal(0, 3, img.shape), 0, 255).astype(np.uint8)
    mask = cells.white_cell_mask(img, dilate_fraction=0.0)
    assert iou(mask, blast) > 0.7
    for cy, cx in red_cells:
        assert not mask[cy, cx]


def test_connected_components():
    m = np.zeros((20, 20), bool)
    m[1:4, 1:4] = True
    m[10:18, 5] = True
    m[17, 5:15] = True  # an L shape: one component
    labels, n = cells.label_components(m)
    assert n == 2 and len(np.unique(labels[m])) == 2 and np.all(labels[~m] == 0)


def test_background_flattening_and_heatmap_mass():
    img, disc = disc_image()
    flat = audit.flatten_background(img)
    mask = cells.white_cell_mask(img)
    assert len(np.unique(flat[~mask].reshape(-1, 3), axis=0)) == 1
    assert np.array_equal(flat[mask], img[mask])
    heat_on = disc.astype(float)
    assert audit.heatmap_mass_on_cells(heat_on, mask) == pytest.approx(1.0)
    assert audit.heatmap_mass_on_cells(1.0 - heat_on, disc) == pytest.approx(0.0)
    small = np.ones((6, 6))  # resized to the mask; uniform heat gives the mask's area fraction
    assert audit.heatmap_mass_on_cells(small, mask) == pytest.approx(mask.mean(), abs=1e-6)
    assert np.isnan(audit.heatmap_mass_on_cells(np.zeros((4, 4)), mask))


def test_colour_baseline_exposes_planted_shortcut():
    train_x, train_y = synthetic(seed=0)
    test_x, test_y = synthetic(seed=1)
    report = audit.colour_baseline_report(train_x, train_y, test_x, test_y, ["one", "two"], n_boot=200)
    assert report["histogram"]["accuracy"]["value"] > 0.95
    assert report["mean_std"]["accuracy"]["value"] > 0.95
    # Same data with the tint removed per image: colour alone is at chance.
    norm = lambda xs: [audit.get_perturbation("colour_normalised").fn(x, None) for x in xs]  # noqa: E731
    model = audit.ColourBaseline(kind="mean_std").fit(norm(train_x), train_y)
    acc = np.mean(model.predict_proba(norm(test_x)).argmax(1) == test_y)
    assert acc < 0.75
    # Control: without the planted tint, colour alone is at chance on raw images too.
    ux, uy = synthetic(seed=2, tinted=False)
    vx, vy = synthetic(seed=3, tinted=False)
    model = audit.ColourBaseline(kind="mean_std").fit(ux, uy)
    assert np.mean(model.predict_proba(vx).argmax(1) == vy) < 0.75


def test_run_audit_separates_shortcut_model_from_morphology_model():
    train_x, train_y = synthetic(seed=0, n_per_class=20)
    test_x, test_y = synthetic(seed=1, n_per_class=20)
    shortcut = audit.ColourBaseline(kind="mean_std").fit(train_x, train_y)

    def morphology(batch):  # counts nuclei in the white-cell mask: shape only
        two = np.array([cells.label_components(cells.white_cell_mask(im, dilate_fraction=0.0))[1] >= 2
                        for im in batch], dtype=float)
        return np.stack([1 - two, two], axis=1)

    names = ["grayscale", "colour_normalised", "hed_jitter_0.05", "blur_1", "background_neutral"]
    rng = np.random.default_rng(0)
    res_s = audit.run_audit(shortcut.predict_proba, test_x, test_y, ["one", "two"], rng, names, n_boot=200)
    res_m = audit.run_audit(morphology, test_x, test_y, ["one", "two"], rng, names, n_boot=200)
    acc = lambda r, name: r["perturbations"][name]["accuracy"]["value"]  # noqa: E731
    assert acc(res_s, "clean") > 0.95 and acc(res_m, "clean") > 0.95
    assert acc(res_s, "colour_normalised") < 0.75 and acc(res_s, "background_neutral") < 0.75
    assert acc(res_m, "colour_normalised") > 0.9 and acc(res_m, "background_neutral") > 0.9
    ci = res_s["perturbations"]["clean"]["accuracy"]
    assert ci["low"] <= ci["value"] <= ci["high"] and ci["n"] == 40
    assert "benign_vs_malignant_accuracy" not in res_s["perturbations"]["clean"]


def test_benign_vs_malignant_accuracy():
    images = [np.full((8, 8, 3), 200, np.uint8)] * 4
    labels = np.array([0, 1, 2, 3])  # Benign, Early, Pre, Pro
    wrong_subtype = lambda b: np.eye(4)[[0, 2, 3, 1]][: len(b)]  # noqa: E731
    res = audit.run_audit(wrong_subtype, images, labels, ["Benign", "Early", "Pre", "Pro"],
                          np.random.default_rng(0), ["grayscale"], n_boot=50)
    clean = res["perturbations"]["clean"]
    assert clean["accuracy"]["value"] == 0.25
    assert clean["benign_vs_malignant_accuracy"]["value"] == 1.0


def test_bootstrap_ci_and_registry():
    flags = np.r_[np.ones(80), np.zeros(20)]
    ci = audit.bootstrap_ci(flags, n=2000, seed=0)
    assert ci["value"] == 0.8 and 0.7 < ci["low"] < 0.8 < ci["high"] < 0.9
    assert audit.bootstrap_ci(flags, n=500, seed=1) == audit.bootstrap_ci(flags, n=500, seed=1)
    with pytest.raises(UsageError, match="grayscale"):
        audit.get_perturbation("nope")
    img, _ = disc_image()
    rng = np.random.default_rng(0)
    for name, pert in audit.PERTURBATIONS.items():
        out = pert.fn(img, rng)
        assert out.dtype == np.uint8 and out.shape == img.shape, name


@pytest.mark.shared
def test_colour_baseline_reads_taleqani_slides(taleqani_dir):
    """Issue 7's finding on real data: colour histograms alone classify a later capture block."""
    from PIL import Image

    classes = ["Benign", "Early", "Pre", "Pro"]
    splits = {"train": ([], []), "test": ([], [])}
    for label, name in enumerate(classes):
        files = sorted((taleqani_dir / "Original" / name).glob("*.jpg"))
        cut = int(len(files) * 0.7)  # contiguous capture blocks, as the dataset README asks
        for i in range(0, len(files), 8):
            img = np.asarray(Image.open(files[i]).convert("RGB").resize((64, 64), Image.Resampling.BILINEAR))
            xs, ys = splits["train" if i < cut else "test"]
            xs.append(img)
            ys.append(label)
    (tx, ty), (vx, vy) = splits["train"], splits["test"]
    report = audit.colour_baseline_report(tx, np.array(ty), vx, np.array(vy), classes, n_boot=200)
    assert report["histogram"]["accuracy"]["value"] > 0.85
    masks = [cells.white_cell_mask(x) for x in vx[:20]]
    assert all(0.0 < m.mean() < 0.8 for m in masks)


def _labelled_fields(n_per_class: int = 12, size: int = 60):
    """Fields with one white cell (small for class 0, large for class 1) and a burnt-in corner label whose
    colour also says the class (black for 0, red for 1), as Taleqani's scale bars differ by capture session."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:size, :size]
    images, labels = [], []
    for c in (0, 1):
        for _ in range(n_per_class):
            img = np.clip(rng.normal((232, 214, 222), 3, (size, size, 3)), 0, 255).astype(np.uint8)
            cy, cx = rng.integers(15, 30, 2)
            img[(yy - cy) ** 2 + (xx - cx) ** 2 < (4 if c == 0 else 8) ** 2] = (110, 40, 170)
            img[size - 6:size - 3, size - 14:size - 4] = (20, 20, 20) if c == 0 else (220, 30, 30)
            images.append(img)
            labels.append(c)
    return images, np.array(labels)


def test_corner_covering_paints_only_the_corner():
    images, _ = _labelled_fields(1)
    img = images[1]
    out = audit.cover_corner(img, "bottom-right")
    h, w = img.shape[:2]
    ch, cw = round(audit.LABEL_CORNER[0] * h), round(audit.LABEL_CORNER[1] * w)
    corner = out[h - ch:, w - cw:].reshape(-1, 3)
    assert len(np.unique(corner, axis=0)) == 1 and np.abs(corner[0].astype(int) - (232, 214, 222)).max() <= 6
    rest = np.ones((h, w), bool)
    rest[h - ch:, w - cw:] = False
    np.testing.assert_array_equal(out[rest], img[rest])
    left = audit.cover_corner(img, "bottom-left")
    np.testing.assert_array_equal(left[h - 6:h - 3, w - 14:w - 4], img[h - 6:h - 3, w - 14:w - 4])  # label kept
    with pytest.raises(UsageError, match="corner"):
        audit.cover_corner(img, "top-left")


def test_audit_tells_a_label_reader_from_a_cell_reader():
    from leukoedge.train.audit_run import readings

    images, labels = _labelled_fields()

    def label_reader(batch):  # red in the bottom-right corner -> class 1
        red = np.array([float((im[-6:-3, -14:-4, 0].astype(int) - im[-6:-3, -14:-4, 1]).mean() > 100) for im in batch])
        return np.stack([1 - red, red], axis=1)

    def cell_reader(batch):  # white-cell area -> class 1 if large
        big = np.array([float(cells.white_cell_mask(im, dilate_fraction=0.0).sum() > 100) for im in batch])
        return np.stack([1 - big, big], axis=1)

    said = {}
    for name, fn in (("label", label_reader), ("cell", cell_reader)):
        res = audit.run_audit(fn, images, labels, ["one", "two"], np.random.default_rng(0),
                              ["label_corner_covered", "control_corner_covered"], n_boot=200)
        clean = res["perturbations"]["clean"]["accuracy"]
        assert clean["value"] == 1.0
        report = {"clean_accuracy": clean, "colour_baseline": {"histogram": {"accuracy": clean}},
                  "majority_class_rate": 0.5, "perturbations": res["perturbations"], "heatmap": {}}
        said[name] = " ".join(readings(report))
        if name == "label":  # with a per-image colour step the reading says how the label acts
            said["label-macenko"] = " ".join(readings({**report, "colour_step": "macenko"}))
    assert "Reads the scale-bar label" in said["label"] and "per-image colour step" not in said["label"]
    assert "No detectable use of the scale-bar label" in said["cell"]
    assert "per-image colour step (macenko)" in said["label-macenko"]
