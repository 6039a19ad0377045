"""The quantized-vs-float parity tests.

Pure metric tests on arrays, then the real gate: a tiny CNN trained in this
session is converted for real (TFLiteConverter) and graded through the
device runtime (LiteRT). int8/uint8 must pass and agree with the float model
on nearly every image; a deliberately broken calibration must be caught.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from bundle_factory import CLASSES, SIZE, shared_tiny_bundle, shared_tiny_run
from leukoedge.bundle import load_bundle
from leukoedge.convert import parity
from leukoedge.convert.options import ConvertOptions
from leukoedge.convert.pipeline import convert_run
from leukoedge.errors import BundleError, ParityError

REQUIRED_KEYS = {"float_accuracy", "quant_accuracy", "delta_accuracy", "agreement", "per_class_agreement", "passed"}


# ---------------------------------------------------------------- pure metrics
def _onehot(idx, k=3, p=0.9):
    out = np.full((len(idx), k), (1 - p) / (k - 1))
    out[np.arange(len(idx)), idx] = p
    return out


def test_compare_identical_models_pass_with_zero_divergence():
    y = np.array([0, 1, 2, 0, 1, 2])
    probs = _onehot(y)
    r = parity.compare(probs, probs.copy(), y, ["a", "b", "c"], [f"{i}.png" for i in range(6)],
                       mode="int8", max_drop=1.0, min_agreement=0.99)
    assert r.passed and r.agreement == 1.0 and r.delta_accuracy == 0.0
    assert r.mean_kl == pytest.approx(0.0, abs=1e-9) and r.pearson == pytest.approx(1.0)
    assert r.per_class_agreement == {"a": 1.0, "b": 1.0, "c": 1.0}
    assert r.float_macro_f1 == 1.0


def test_compare_catches_drop_and_disagreement_and_lists_worst():
    y = np.array([0, 1, 2, 0, 1, 2, 0, 1, 2, 0])
    quant_pred = y.copy()
    quant_pred[[1, 4]] = 0  # two class-b images flip to a
    r = parity.compare(_onehot(y), _onehot(quant_pred), y, ["a", "b", "c"], [f"{i}.png" for i in range(10)],
                       mode="int8", max_drop=1.0, min_agreement=0.99, worst=3)
    assert not r.passed and len(r.reasons) == 2
    assert r.delta_accuracy == pytest.approx(20.0) and r.agreement == pytest.approx(0.8)
    assert r.per_class_agreement["b"] == pytest.approx(1 / 3) and r.per_class_agreement["a"] == 1.0
    assert {w["path"] for w in r.worst[:2]} == {"1.png", "4.png"} and not r.worst[1]["agree"]
    assert r.worst[2]["agree"]
    assert "FAILED" in r.to_markdown()
    # a generous gate lets the same result through
    ok = parity.compare(_onehot(y), _onehot(quant_pred), y, ["a", "b", "c"], [str(i) for i in range(10)],
                        mode="int8", max_drop=25.0, min_agreement=0.75)
    assert ok.passed


def test_macro_f1_against_hand_computation():
    y = np.array([0, 0, 1, 1])
    pred = np.array([0, 1, 1, 1])
    # class 0: tp1 fp0 fn1 -> 2/3 ; class 1: tp2 fp1 fn0 -> 4/5
    assert parity.macro_f1(y, pred, 2) == pytest.approx((2 / 3 + 4 / 5) / 2)


def test_kl_is_finite_when_quantized_probability_is_zero():
    p = np.array([[0.5, 0.5]])
    q = np.array([[1.0, 0.0]])
    kl = parity.kl_divergence(p, q)
    assert np.isfinite(kl).all() and kl[0] > 1.0


# ---------------------------------------------------------------- the real gate
@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    return shared_tiny_run(tmp_path_factory)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["int8", "uint8"])
def test_full_integer_passes_gate_and_agrees_with_float(tmp_path_factory, mode):
    bundle = shared_tiny_bundle(tmp_path_factory, mode, True)
    report = json.loads((bundle / "parity.json").read_text())
    assert REQUIRED_KEYS <= set(report)
    assert report["passed"] is True and report["mode"] == mode
    assert report["agreement"] >= 0.99  # nearly every image: at most 1 in 100 may flip
    assert abs(report["delta_accuracy"]) <= 1.0
    assert set(report["per_class_agreement"]) == set(CLASSES)
    assert report["float_accuracy"] >= 0.9  # the float model itself learned the task
    assert report["pearson"] > 0.99 and report["mean_kl"] < 0.05
    b = load_bundle(bundle)
    assert b.valid and b.input["dtype"] == mode
    assert report["size"]["converted_bytes"] < report["size"]["float32_bytes"]
    md = (bundle / "parity.md").read_text()
    assert "Gate: PASSED" in md and "Size" in md


@pytest.mark.slow
def test_broken_calibration_is_caught_by_the_gate(tiny_run, tmp_path):
    """A constant grey image as the only representative data: activation ranges are wrong."""
    constant = np.full((64, SIZE, SIZE, 3), 128, dtype=np.uint8)
    out = tmp_path / "broken"
    options = ConvertOptions(run_dir=tiny_run, out=out, quantize="int8", calibration=64, with_heatmap=True)
    with pytest.raises(ParityError) as info:
        convert_run(options, representative_images=constant)
    result = info.value.result
    assert not result.parity.passed and result.parity.agreement < 0.9
    assert info.value.exit_code == 7
    # the bundle exists, is marked invalid with the reason, and the device refuses it
    meta = json.loads((out / "bundle.json").read_text())
    assert meta["valid"] is False and "parity gate failed" in meta["invalid_reason"]
    assert json.loads((out / "parity.json").read_text())["passed"] is False
    with pytest.raises(BundleError, match="marked invalid"):
        load_bundle(out)
    assert not load_bundle(out, allow_invalid=True).valid


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["float16", "dynamic"])
def test_float16_and_dynamic_convert_and_pass(tmp_path_factory, mode):
    bundle = shared_tiny_bundle(tmp_path_factory, mode, False)
    report = json.loads((bundle / "parity.json").read_text())
    assert report["passed"] and report["agreement"] >= 0.99
    b = load_bundle(bundle)
    assert b.input["dtype"] == "float32" and b.heatmap is None
    # No heatmap, but the default abstention score (Mahalanobis) reads the pooled feature map.
    assert set(b.output_names) == {"probabilities", "features"} and b.abstention["score"] == "mahalanobis"
    assert b.meta["size"]["ratio"] > 1.0
