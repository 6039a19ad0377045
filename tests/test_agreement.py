"""The device's agreement with its reviewers (edge_app/agreement.py) and the sample summary (samples.py)."""
from __future__ import annotations

import json
import math

import pytest

from leukoedge.edge_app.agreement import agreement, format_agreement, proportion_dict
from leukoedge.edge_app.samples import summarise
from leukoedge.edge_app.storage import REVIEW_UNUSABLE, Sample, StoredResult
from leukoedge.stats.intervals import Proportion, wilson

LABELS = ["Benign", "Early", "Pre", "Pro"]


def test_counts_exclude_unusable_and_retakes_and_keep_abstentions():
    pairs = [  # (predicted, reviewer, retake, abstained, count)
        ("Early", "Early", False, False, 5),
        ("Pro", "Early", False, False, 2),
        ("Pre", "Pre", False, True, 1),        # abstained, top class right: counts as agreeing
        ("Benign", "Pro", False, True, 1),     # abstained, top class wrong
        ("Early", REVIEW_UNUSABLE, False, False, 3),
        ("Early", "Pro", True, False, 4),      # retakes: no label was given
    ]
    a = agreement(pairs, LABELS)
    assert (a.overall.k, a.overall.n) == (6, 9)
    assert {k: (p.k, p.n) for k, p in a.per_label.items()} == {"Benign": (0, 0), "Early": (5, 7), "Pre": (1, 1),
                                                               "Pro": (0, 1)}
    assert (a.unusable, a.retakes, a.abstained) == (3, 4, 2)
    d = a.to_dict()
    assert d["overall"]["low"] == pytest.approx(wilson(6, 9)[0]) and d["overall"]["high"] == pytest.approx(wilson(6, 9)[1])
    assert d["per_label"]["Benign"] == {"value": None, "low": None, "high": None, "k": 0, "n": 0}
    json.dumps(d, allow_nan=False)  # no NaN anywhere: valid JSON for any client


def test_small_n_never_collapses():
    """Three of three agreeing is not "100 %, certain": the Wilson interval's low end stays far below 1."""
    a = agreement([("Pro", "Pro", False, False, 3)], LABELS)
    lo, hi = a.overall.interval
    assert a.overall.value == 1.0 and hi == 1.0 and lo < 0.5
    assert format_agreement(a.overall) == f"100 % (3 of 3 reviewed; 95 % CI {lo * 100:.0f}-100 %)"
    assert format_agreement(agreement([], LABELS).overall) == "no reviews yet"


def test_review_labels_outside_the_bundle_are_kept_after_its_classes():
    a = agreement([("Early", "Myeloblast", False, False, 2)], LABELS)
    assert list(a.per_label) == [*LABELS, "Myeloblast"] and a.overall.n == 2 and a.overall.k == 0


def test_proportion_dict_of_empty_is_null():
    assert proportion_dict(Proportion(0, 0)) == {"value": None, "low": None, "high": None, "k": 0, "n": 0}
    assert math.isnan(Proportion(0, 0).value)  # what it replaces


def _result(i: int, label: str, *, abstained=False, retake=False, review=None, probs=None) -> StoredResult:
    probs = probs or {name: (0.7 if name == label else 0.1) for name in LABELS}
    return StoredResult(id=f"{i:032x}", created_at=float(i), source="camera", filename="f", label=label,
                        confidence=max(probs.values()), abstained=abstained, ood_score=None, probabilities=probs,
                        latency_ms=1.0, timings={}, model_name="m", model_version="1", width=10, height=10,
                        original_ext=".jpg", has_heatmap=False, um_per_px=0.2, scale_source="given",
                        retake=retake, review_label=review)


def test_summary_counts_add_up_and_mean_is_over_labelled_fields():
    sample = Sample(id="a" * 32, name="slide", note="", created_at=0.0)
    results = [_result(1, "Early", review="Early"), _result(2, "Pro", review="Pre"),
               _result(3, "Pre", abstained=True, probs={"Benign": 0.3, "Early": 0.3, "Pre": 0.4, "Pro": 0.0}),
               _result(4, "Benign", retake=True, review=REVIEW_UNUSABLE)]
    s = summarise(sample, results, LABELS, [("Early", "Early", False, False, 1), ("Pro", "Pre", False, False, 1)])
    d = s.to_dict()
    assert (d["n"], d["abstained"], d["retake"], d["reviewed"], d["disagreed"]) == (4, 1, 1, 3, 1)
    assert d["counts"] == {"Benign": 0, "Early": 1, "Pre": 0, "Pro": 1}
    assert d["mean_probabilities"] == pytest.approx({"Benign": 0.1, "Early": 0.4, "Pre": 0.1, "Pro": 0.4})
    assert d["results"] == [r.id for r in results] and d["mean_over"] == 2
    assert d["um_per_px"] == [{"um_per_px": 0.2, "scale_source": "given"}]
    assert d["agreement"]["overall"]["k"] == 1 and d["agreement"]["overall"]["n"] == 2
    empty = summarise(sample, [], LABELS).to_dict()
    assert empty["mean_probabilities"] is None and empty["n"] == 0
