"""Intervals and verdicts at the n a lab has (issue 14): never [100 %, 100 %], "inconclusive" when n cannot decide.

Reference values from SciPy (a test-only dependency); the package itself is pure Python.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as sps

from leukoedge.stats import (PairedChange, Proportion, binomial_tail, clopper_pearson, exceeds_rate, paired_change,
                             verdict_on_drop, wilson)


@pytest.mark.parametrize("k, n", [(39, 39), (0, 39), (1, 39), (20, 39), (389, 390), (7, 10), (1, 1)])
def test_clopper_pearson_matches_the_beta_quantiles(k, n):
    lo, hi = clopper_pearson(k, n)
    ref_lo = 0.0 if k == 0 else sps.beta.ppf(0.025, k, n - k + 1)
    ref_hi = 1.0 if k == n else sps.beta.ppf(0.975, k + 1, n - k)
    assert lo == pytest.approx(ref_lo, abs=1e-9) and hi == pytest.approx(ref_hi, abs=1e-9)


@pytest.mark.parametrize("k, n", [(39, 39), (0, 39), (1, 39), (20, 39), (389, 390), (3, 7)])
def test_wilson_matches_the_score_formula_and_never_collapses(k, n):
    z = sps.norm.ppf(0.975)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    lo, hi = wilson(k, n)
    assert lo == pytest.approx(max(0, centre - half), abs=1e-9) and hi == pytest.approx(min(1, centre + half), abs=1e-9)
    assert hi - lo > 0.01  # 39 of 39 right is not certainty: [91.0 %, 100 %]
    perfect = Proportion(39, 39).to_dict()
    assert perfect["value"] == 1.0 and perfect["low"] < 0.92 and perfect["method"] == "wilson"


@pytest.mark.parametrize("k, n, p", [(1, 39, 0.01), (3, 39, 0.01), (8, 390, 0.01), (0, 5, 0.2), (5, 5, 0.5)])
def test_binomial_tail_is_exact(k, n, p):
    assert binomial_tail(k, n, p) == pytest.approx(sps.binom.sf(k - 1, n, p), rel=1e-9, abs=1e-15)


def test_one_flip_in_39_is_not_evidence_of_a_bad_conversion_but_many_are():
    assert exceeds_rate(1, 39, 0.01) == (False, pytest.approx(1 - 0.99 ** 39))
    assert exceeds_rate(2, 39, 0.01)[0] is False
    assert exceeds_rate(10, 39, 0.01)[0] is True
    assert exceeds_rate(8, 390, 0.01)[0] is True  # 2 % flips on 390 images
    assert exceeds_rate(0, 3, 0.0) == (False, 1.0) and exceeds_rate(1, 3, 0.0)[0] is True
    assert exceeds_rate(3, 3, 1.0) == (False, 1.0)  # --min-agreement 0: no flip limit


def test_a_25_point_drop_at_n_39_is_a_drop_and_a_small_sample_is_inconclusive():
    """Clean 84.6 % vs grayscale 59.0 % on the same 39 images is not "no significant drop"."""
    right_clean = np.array([1] * 33 + [0] * 6, bool)
    right_gray = np.array([1] * 23 + [0] * 16, bool)
    change = paired_change(right_clean, right_gray)
    assert change.lost == 10 and change.gained == 0 and change.drop == pytest.approx(10 / 39)
    assert change.p_value == pytest.approx(2 * 0.5 ** 10)
    assert verdict_on_drop(change) == "drop"
    lo, hi = change.interval
    assert 0 < lo < change.drop < hi < 1
    # Three lost, one gained of 12: n cannot tell this from chance, nor rule out a large loss.
    assert verdict_on_drop(PairedChange(both_right=7, lost=3, gained=1, both_wrong=1)) == "inconclusive"
    # 1 lost, 1 gained of 390: the data show any loss is small.
    assert verdict_on_drop(PairedChange(both_right=380, lost=1, gained=1, both_wrong=8)) == "no meaningful drop"


def test_paired_interval_contains_the_difference_and_matches_mcnemar():
    rng = np.random.default_rng(0)
    before = rng.random(60) < 0.8
    after = np.where(rng.random(60) < 0.15, ~before, before)
    change = paired_change(before, after)
    lo, hi = change.interval
    assert lo <= change.drop <= hi
    b, c = change.lost, change.gained
    assert change.p_value == pytest.approx(min(1.0, 2 * sps.binom.sf(max(b, c) - 1, b + c, 0.5)))
