"""The shared maths (leukoedge.stats): one convention each, checked against scikit-learn and by hand."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from leukoedge.errors import UsageError
from leukoedge.stats import calibration as cal
from leukoedge.stats import metrics as M
from leukoedge.stats.thresholds import quantile_threshold, threshold_for_rate

skm = pytest.importorskip("sklearn.metrics")


def _random_labels(seed: int, n: int, k: int, drop: tuple[int, ...] = ()):
    """Truth and predictions on ``k`` classes; classes in ``drop`` never occur in either."""
    rng = np.random.default_rng(seed)
    keep = [c for c in range(k) if c not in drop]
    y = rng.choice(keep, n)
    pred = np.where(rng.random(n) < 0.6, y, rng.choice(keep, n))
    return y, pred


# ---------------------------------------------------------------- classification metrics
@pytest.mark.parametrize("seed", range(5))
def test_accuracy_and_f1_match_sklearn(seed):
    y, pred = _random_labels(seed, 60, 4)
    assert M.accuracy(y, pred) == pytest.approx(skm.accuracy_score(y, pred))
    assert M.macro_f1(y, pred, 4) == pytest.approx(skm.f1_score(y, pred, average="macro", zero_division=0))
    assert M.weighted_f1(y, pred, 4) == pytest.approx(skm.f1_score(y, pred, average="weighted", zero_division=0))
    np.testing.assert_array_equal(M.confusion_matrix(y, pred, 4), skm.confusion_matrix(y, pred, labels=range(4)))
    prf = M.per_class_prf(M.confusion_matrix(y, pred, 4))
    p, r, f, s = skm.precision_recall_fscore_support(y, pred, labels=range(4), zero_division=0)
    np.testing.assert_allclose(prf["precision"], p)
    np.testing.assert_allclose(prf["recall"], r)
    np.testing.assert_allclose(prf["f1"], f)
    np.testing.assert_array_equal(prf["support"], s)


def test_macro_f1_averages_over_classes_present_in_truth_or_prediction():
    """A split without class 3, never predicted: sklearn's macro over present labels, not a 0 for class 3."""
    y, pred = _random_labels(0, 50, 4, drop=(3,))
    present = M.macro_f1(y, pred, 4)
    assert present == pytest.approx(skm.f1_score(y, pred, average="macro", zero_division=0))
    over_all = skm.f1_score(y, pred, labels=range(4), average="macro", zero_division=0)
    assert present == pytest.approx(over_all * 4 / 3)  # the old "all classes" mean counted class 3 as 0
    assert M.present_classes(M.confusion_matrix(y, pred, 4)).tolist() == [True, True, True, False]
    # A class that IS in the split but never predicted (collapse) still counts, as 0.
    y2, pred2 = np.array([0, 0, 1, 1]), np.array([0, 0, 0, 0])
    assert M.macro_f1(y2, pred2, 2) == pytest.approx(skm.f1_score(y2, pred2, average="macro", zero_division=0))
    assert M.macro_f1(y2, pred2, 2) == pytest.approx((2 * 2 / (2 * 2 + 2) + 0.0) / 2)
    # Predicted but absent from the truth counts too (its F1 is 0).
    assert M.macro_f1(np.array([0, 0]), np.array([0, 1]), 3) == pytest.approx(
        skm.f1_score([0, 0], [0, 1], average="macro", zero_division=0))


def test_empty_input_is_nan_not_zero():
    empty = np.array([], dtype=np.int64)
    assert np.isnan(M.accuracy(empty, empty))
    assert np.isnan(M.macro_f1(empty, empty, 3))
    assert np.isnan(M.weighted_f1(empty, empty, 3))
    assert M.confusion_matrix(empty, empty, 3).sum() == 0
    assert np.isnan(cal.expected_calibration_error(np.zeros((0, 3)), empty))


def test_bad_labels_are_usage_errors():
    with pytest.raises(UsageError):
        M.confusion_matrix([0, 3], [0, 1], 3)
    with pytest.raises(UsageError):
        M.confusion_matrix([0, -1], [0, 1], 3)
    with pytest.raises(UsageError):
        M.accuracy([0, 1, 2], [0, 1])
    with pytest.raises(UsageError):
        M.confusion_matrix([0.5, 1.0], [0, 1], 2)


@pytest.mark.parametrize("seed", range(4))
def test_roc_auc_with_ties_matches_sklearn(seed):
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, 6, 80).astype(float)  # many ties
    positive = rng.random(80) < 0.4
    assert M.roc_auc(scores, positive) == pytest.approx(skm.roc_auc_score(positive, scores))
    a, b = scores[~positive], scores[positive]
    assert M.auroc(a, b) == pytest.approx(skm.roc_auc_score(positive, scores))


def test_auroc_conventions():
    assert M.auroc([1, 2], [1, 2]) == 0.5
    assert M.auroc([0, 0], [1, 1]) == 1.0
    assert M.auroc([1, 1], [0, 0]) == 0.0
    # Undefined -> NaN: one class missing, or a score that is not a number.
    assert np.isnan(M.roc_auc([0.1, 0.2], [True, True]))
    assert np.isnan(M.auroc([], [0.3]))
    assert np.isnan(M.auroc([0.1, np.nan], [0.3]))
    assert M.midranks([3.0, 1.0, 3.0, 2.0]).tolist() == [3.5, 1.0, 3.5, 2.0]


def test_one_vs_rest_auc_matches_sklearn_and_marks_absent_classes():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 3, 90)
    probs = rng.dirichlet(np.ones(4), 90)  # class 3 never occurs
    aucs = M.one_vs_rest_auc(y, probs)
    for c in range(3):
        assert aucs[c] == pytest.approx(skm.roc_auc_score(y == c, probs[:, c]))
    assert np.isnan(aucs[3])


# ---------------------------------------------------------------- calibration
def test_ece_by_hand_and_argument_order():
    # Two bins used: conf 0.9 (2 images, 1 correct: |0.5-0.9| = 0.4) and conf 0.6 (2 images, both correct: 0.4).
    probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4], [0.4, 0.6]])
    labels = np.array([0, 1, 0, 1])
    assert cal.expected_calibration_error(probs, labels) == pytest.approx(0.5 * 0.4 + 0.5 * 0.4)
    assert cal.expected_calibration_error(labels=labels, probs=probs) == pytest.approx(0.4)  # keyword-friendly
    with pytest.raises(UsageError):  # the old (y, probs) order is refused, not silently misread
        cal.expected_calibration_error(labels, probs)
    rel = cal.reliability_diagram(probs, labels, n_bins=10)
    assert rel.counts.tolist() == [0, 0, 0, 0, 0, 2, 0, 0, 2, 0]  # (0.5, 0.6] and (0.8, 0.9]
    assert rel.accuracy[5] == 1.0 and rel.confidence[8] == pytest.approx(0.9)
    assert cal.expected_calibration_error(np.eye(2), np.array([0, 1])) == 0.0


@pytest.mark.parametrize("t", [0.3, 0.7, 1.0, 1.7, 4.0])
def test_both_temperature_functions_agree(t):
    """softmax(z / T) == temperature_scale_probs(softmax(z), T) == temperature_scale_logits(z, T)."""
    z = np.random.default_rng(0).normal(0, 2, (20, 5))
    expected = cal.softmax(z / t)
    np.testing.assert_allclose(cal.temperature_scale_logits(z, t), expected, atol=1e-12)
    np.testing.assert_allclose(cal.temperature_scale_probs(cal.softmax(z), t), expected, atol=1e-9)
    for row in range(3):  # the device calls it on one (K,) row at a time
        np.testing.assert_allclose(cal.temperature_scale_probs(cal.softmax(z[row]), t), expected[row], atol=1e-9)


def test_temperature_on_probs_with_the_int8_floor_is_what_was_fitted():
    probs = np.array([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [0.2, 0.3, 0.5]])
    floor = cal.INT8_LOG_PROB_FLOOR
    fitted = cal.temperature_scale_logits(cal.log_probs(probs, floor), 0.6)
    np.testing.assert_allclose(cal.temperature_scale_probs(probs, 0.6, floor), fitted, atol=1e-12)
    # Without a floor an int8 zero stays zero; T = 1 leaves the probabilities untouched.
    assert cal.temperature_scale_probs(probs, 0.6)[0].tolist() == [1.0, 0.0, 0.0]
    assert cal.temperature_scale_probs(probs, 1.0) is probs
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(UsageError):
            cal.temperature_scale_probs(probs, bad)
        with pytest.raises(UsageError):
            cal.temperature_scale_logits(probs, bad)
    with pytest.raises(UsageError):
        cal.temperature_scale_probs(probs, 0.5, floor=1.5)


# ---------------------------------------------------------------- thresholds
def test_threshold_for_rate_counts_images_on_both_sides():
    s = np.arange(100, dtype=float)
    t = threshold_for_rate(s, 0.05)
    assert t in s and np.sum(s > t) == 5
    t_low = threshold_for_rate(s, 0.05, abstain_when="below")
    assert t_low in s and np.sum(s < t_low) == 5
    # "below" is the exact mirror of "above" on negated scores (what convert stored before).
    rng = np.random.default_rng(0)
    r = rng.normal(size=37)
    assert threshold_for_rate(r, 0.1, abstain_when="below") == -threshold_for_rate(-r, 0.1)
    # Ties at the threshold: never more than floor(rate * n) abstain.
    tied = np.array([0.0] * 10 + [1.0] * 10)
    assert np.sum(tied > threshold_for_rate(tied, 0.3)) <= 6
    assert np.sum(tied < threshold_for_rate(tied, 0.3, abstain_when="below")) <= 6


def test_quantile_threshold_is_numpy_quantile_of_the_scores():
    scores = np.array([0.9] * 95 + [0.55] * 5)
    assert quantile_threshold(scores, 0.05) == pytest.approx(np.quantile(scores, 0.05))
    assert quantile_threshold(np.linspace(0, 1, 101), 0.1) == pytest.approx(0.1)


@pytest.mark.parametrize("fn", [threshold_for_rate, quantile_threshold])
def test_threshold_errors(fn):
    with pytest.raises(UsageError):
        fn([], 0.05)
    with pytest.raises(UsageError):
        fn([0.1, np.nan], 0.05)
    for rate in (0.0, 1.0, 1.5, -0.1):
        with pytest.raises(UsageError):
            fn([0.1, 0.2], rate)
    if fn is threshold_for_rate:
        with pytest.raises(UsageError):
            fn([0.1, 0.2], 0.1, abstain_when="sideways")


def test_stats_package_import_is_light():
    """``import leukoedge.stats`` pulls neither numpy nor TensorFlow; the numpy modules never pull TensorFlow."""
    code = ("import sys, leukoedge.stats; light = 'numpy' not in sys.modules; "
            "import leukoedge.stats.metrics, leukoedge.stats.calibration, leukoedge.stats.thresholds; "
            "print(light, any(m.split('.')[0] in ('tensorflow', 'keras', 'sklearn') for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["True", "False"]
