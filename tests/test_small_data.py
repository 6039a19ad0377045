"""A lab's own small dataset (issue 14): what convert and the card say must be right at n = 40.

Plain numpy inputs where a decision is pure maths (no training, so these hold on any CPU).
"""
from __future__ import annotations

import numpy as np

from leukoedge.convert.trust import Outputs, calibrate


def _binary_outputs(seed: int, n: int = 40, confidence: float = 0.9, accuracy: float = 0.8):
    """Two-class probabilities of a model that is right ``accuracy`` of the time at about ``confidence``."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    pred = np.where(rng.random(n) < accuracy, y, 1 - y)
    top = np.clip(rng.normal(confidence, 0.08, n), 0.5, 0.999)
    probs = np.zeros((n, 2))
    probs[np.arange(n), pred] = top
    probs[np.arange(n), 1 - pred] = 1 - top
    return Outputs(probs, None), y


def test_a_temperature_that_would_worsen_validation_calibration_is_not_applied():
    val, y_val = _binary_outputs(0)
    test, y_test = _binary_outputs(1000)
    cal, _ = calibrate(val, y_val, test, y_test)
    assert cal["temperature_fitted"] != 1.0  # the fit wanted to rescale ...
    assert cal["temperature"] == 1.0 and cal["log_prob_floor"] is None  # ... but it is not applied
    assert cal["ece_val_after"] == cal["ece_val_before"] and cal["ece_after"] == cal["ece_before"]
    assert "would not lower the validation ECE" in cal["kept_at_1"] and "T = 1" in cal["kept_at_1"]

    from leukoedge.convert.trust_report import calibration_lines
    said = "\n".join(calibration_lines(cal, "converted model"))
    assert "only when it improves calibration on validation" in said


def test_a_temperature_that_lowers_validation_ece_is_applied():
    val, y_val = _binary_outputs(0, confidence=0.97, accuracy=0.75)
    test, y_test = _binary_outputs(1000, confidence=0.97, accuracy=0.75)
    cal, _ = calibrate(val, y_val, test, y_test)
    assert cal["temperature"] > 1.0 and cal["kept_at_1"] is None
    assert cal["ece_val_after"] < cal["ece_val_before"]


def _audit(clean_right: np.ndarray, gray_right: np.ndarray) -> dict:
    from leukoedge.train.audit import _paired, proportion_ci

    clean = proportion_ci(clean_right)
    return {
        "clean_accuracy": clean, "majority_class_rate": 0.5, "split": "test", "colour_step": "as-captured",
        "colour_baseline": {"histogram": {"accuracy": proportion_ci(np.zeros_like(clean_right))}},
        "perturbations": {"clean": {"accuracy": clean},
                          "grayscale": {"accuracy": proportion_ci(gray_right),
                                        "change_vs_clean": _paired(clean_right, gray_right)}},
        "heatmap": {},
    }


def test_audit_readings_never_call_a_25_point_fall_no_drop():
    """Issue 14: "Under grayscale accuracy is 59.0 % (clean 84.6 %): removing colour causes no significant drop"."""
    from leukoedge.train.audit_run import readings

    clean = np.array([1] * 33 + [0] * 6, bool)  # 84.6 % of 39
    gray = np.array([1] * 23 + [0] * 16, bool)  # 59.0 %: ten images lost, none gained
    said = " ".join(readings(_audit(clean, gray)))
    assert "Under grayscale accuracy falls from 84.6 % to 59.0 %" in said and "p = 0.002" in said
    assert "no significant drop" not in said and "no meaningful drop" not in said
    # The same 25-point fall on 8 images cannot be told from chance: it says so.
    small = " ".join(readings(_audit(np.array([1] * 7 + [0], bool), np.array([1] * 5 + [0] * 3, bool))))
    assert "inconclusive at n = 8" in small and "cannot tell from chance" in small
    # No change on 390 images: the data do show the drop is small.
    big = " ".join(readings(_audit(np.array([1] * 380 + [0] * 10, bool), np.array([1] * 380 + [0] * 10, bool))))
    assert "causes no meaningful drop (the drop is below" in big


def test_audit_intervals_never_collapse_at_100_percent():
    from leukoedge.train.audit import proportion_ci

    ci = proportion_ci(np.ones(39, bool))
    assert ci["value"] == 1.0 and ci["low"] < 0.92 and ci["high"] == 1.0 and ci["method"] == "wilson"


def _manifest(layout: str, classes=("blast", "normal")):
    from leukoedge.data.records import Manifest, ManifestEntry

    entries = tuple(ManifestEntry(path=f"{c}/{i}.tif", label=c, order=i, split=s)
                    for c in classes for i, s in enumerate(["train"] * 6 + ["val"] * 2 + ["test"] * 2))
    return Manifest(root="/data/lab", layout=layout, classes=tuple(classes), split_kind="block", seed=0,
                    entries=entries, params={})


def test_the_card_speaks_of_the_runs_own_data_not_taleqani():
    from leukoedge.train.card import intended_use, limitations

    lab = " ".join([intended_use(("blast", "normal")), *limitations(_manifest("class-folders"))])
    assert "blast, normal" in lab and "Taleqani" not in lab and "scale-bar" not in lab
    taleqani = " ".join(limitations(_manifest("taleqani", ("Benign", "Early", "Pre", "Pro"))))
    assert "Taleqani" in taleqani and "scale-bar label" in taleqani


def test_label_corner_checks_only_on_data_with_a_burnt_in_label():
    from leukoedge.train.audit_run import default_perturbations

    assert "label_corner_covered" in default_perturbations("taleqani")
    lab = default_perturbations("class-folders")
    assert "label_corner_covered" not in lab and "control_corner_covered" not in lab and "grayscale" in lab


def test_no_benign_vs_malignant_column_when_the_labels_do_not_say_which_is_benign():
    from leukoedge.train.audit import proportion_ci
    from leukoedge.train.card import _audit_markdown

    flags = np.array([1, 1, 0, 1], bool)
    audit = {"stale": False, "leaky": False, "split": "test", "split_kind": "block", "n_images": 4,
             "colour_step": "as-captured", "readings": ["x"],
             "perturbations": {"clean": {"description": "as is", "accuracy": proportion_ci(flags),
                                         "agreement_with_clean": proportion_ci(np.ones(4, bool))}},
             "colour_baseline": {"histogram": {"accuracy": proportion_ci(flags)}}, "heatmap": {}}
    md = "\n".join(_audit_markdown(audit))
    assert "benign vs malignant" not in md and "n/a" not in md.split("Colour-only")[0]
    assert "| perturbation | accuracy | agreement with clean |" in md


def test_the_bundle_card_has_one_abstention_section_the_devices(tmp_path_factory, tmp_path):
    """The bundle's card had two abstention sections that disagreed (max_softmax 25.6 %, Mahalanobis 0.0 %)."""
    import json

    from bundle_factory import shared_tiny_bundle
    from leukoedge.convert.writer import write_model_card

    meta = json.loads((shared_tiny_bundle(tmp_path_factory) / "bundle.json").read_text())
    run_md = ("# Model card: lab-net\n\n## Out-of-distribution abstention\n\n- score `max_softmax`; abstain below 0.9870\n"
              "- abstains on 25.60 % of the test split\n\n## Shortcut audit\n\nfigures\n")
    run_card = {"model": "lab-net", "ood": {"score": "max_softmax", "threshold": 0.987, "test_abstain_rate": 0.256}}
    write_model_card(tmp_path, run_md, run_card, meta)
    card = (tmp_path / "model_card.md").read_text()
    assert card.count("## Out-of-distribution abstention") == 1 and "25.60 %" not in card
    section = card.split("## Out-of-distribution abstention")[1].split("\n## ")[0]
    assert f"score `{meta['abstention']['score']}`" in section and "abstain below" not in section
    assert "## Shortcut audit" in card
    as_json = json.loads((tmp_path / "model_card.json").read_text())
    assert "ood" not in as_json and as_json["training_run_ood"]["used_on_device"] is False
