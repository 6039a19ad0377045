"""The capture quality gate (issue 15): focus, exposure and empty-field checks, thresholds, bundle section.

Fields come from the project's synthetic smear generator (``leukoedge.data.synth``)
at 128 px, degraded the way a microscope capture goes wrong; the bundle tests use
the session's real tiny bundle (converted once, shared with test_bundle.py).
"""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFilter

from bundle_factory import SIZE, shared_tiny_bundle
from leukoedge import quality
from leukoedge.bundle import load_bundle, write_manifest
from leukoedge.data.synth import STYLES, render_field
from leukoedge.errors import BundleError, InvalidImageError, UsageError
from leukoedge.quality import QualityThresholds

FIELD = 128


def _fields(n: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = sorted(STYLES)
    return [render_field(labels[i % len(labels)], rng, FIELD) for i in range(n)]


@pytest.fixture(scope="module")
def thresholds() -> QualityThresholds:
    return quality.fit_thresholds(_fields(24, seed=0))


@pytest.fixture(scope="module")
def field() -> np.ndarray:
    """A held-out synthetic field (not among the fitting ones) in good focus."""
    return _fields(1, seed=1)[0]


def _blur(x: np.ndarray, sigma: float) -> np.ndarray:
    return np.asarray(Image.fromarray(x).filter(ImageFilter.GaussianBlur(sigma)))


def _exposure(x: np.ndarray, factor: float) -> np.ndarray:
    return np.clip(np.rint(x.astype(np.float32) * factor), 0, 255).astype(np.uint8)


def _without_white_cell(x: np.ndarray) -> np.ndarray:
    """The field with its white cell(s) painted over in its background colour: red cells only."""
    mask = quality.white_cells(x)
    mask = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).filter(ImageFilter.MaxFilter(9))) > 0
    out = x.copy()
    out[mask] = np.median(x[~mask], axis=0).astype(np.uint8)
    return out


# ---------------------------------------------------------------- the four checks
def test_held_out_synthetic_fields_pass(thresholds):
    reports = [quality.assess(x, thresholds) for x in _fields(8, seed=1)]
    assert [r.reasons for r in reports] == [()] * 8
    assert all(r.ok and r.message is None for r in reports)


def test_blurred_copy_is_out_of_focus(field, thresholds):
    report = quality.assess(_blur(field, 3.0), thresholds)
    assert report.reasons == ("out_of_focus",) and not report.ok
    assert report.message == "retake: out of focus"
    assert report.focus < thresholds.min_focus < quality.assess(field, thresholds).focus


def test_dark_and_overexposed_copies_fail_on_exposure_only(field, thresholds):
    dark = quality.assess(_exposure(field, 0.3), thresholds)
    assert dark.reasons == ("too_dark",) and dark.message == "retake: too dark"
    assert dark.brightness < thresholds.min_brightness
    bright = quality.assess(_exposure(field, 2.5), thresholds)
    assert bright.reasons == ("too_bright",) and bright.message == "retake: too bright (overexposed)"
    assert bright.clipped_high > thresholds.max_clipped_high
    # An exposure failure hides the focus and white-cell reasons (fix the light first); the numbers stay measured.
    dark_blurred = quality.assess(_exposure(_blur(field, 4.0), 0.3), thresholds)
    assert dark_blurred.reasons == ("too_dark",) and dark_blurred.focus < thresholds.min_focus


def test_black_frame_is_too_dark_not_out_of_focus(thresholds):
    report = quality.assess(np.zeros((FIELD, FIELD, 3), np.uint8), thresholds)
    assert report.reasons == ("too_dark",) and report.clipped_low == 1.0 and report.focus == 0.0


def test_red_cells_without_a_white_cell_fail(field, thresholds):
    empty = _without_white_cell(field)
    assert quality.assess(field, thresholds).white_cell_fraction > thresholds.min_white_cell_fraction
    report = quality.assess(empty, thresholds)
    assert report.reasons == ("no_white_cell",) and report.message == "retake: no white cell in view"
    assert report.white_cell_fraction == 0.0 and report.focus >= thresholds.min_focus  # the red cells are sharp


def test_several_reasons_are_joined(field, thresholds):
    report = quality.assess(_blur(_without_white_cell(field), 4.0), thresholds)
    assert report.reasons == ("out_of_focus", "no_white_cell")
    assert report.message == "retake: out of focus; no white cell in view"


def test_without_thresholds_everything_is_measured_nothing_refused(field):
    report = quality.assess(_blur(field, 4.0), None)
    assert report.ok and report.reasons == () and report.message is None and report.thresholds is None
    assert 0.0 < report.focus < quality.focus_score(field)
    assert 0.0 < report.brightness <= 1.0 and 0.0 < report.white_cell_fraction < 1.0


def test_not_an_rgb_image_is_an_invalid_image(thresholds):
    with pytest.raises(InvalidImageError, match="uint8 HxWx3"):
        quality.assess(np.zeros((8, 8), np.float32), thresholds)


# ---------------------------------------------------------------- the focus score
def test_focus_falls_with_blur_and_ignores_exposure_and_noise(field):
    scores = [quality.focus_score(_blur(field, s)) if s else quality.focus_score(field) for s in (0, 1, 2, 4)]
    assert scores == sorted(scores, reverse=True) and scores[2] < 0.5 * scores[0]
    assert quality.focus_score(_exposure(field, 0.6)) == pytest.approx(scores[0], rel=0.1)
    noisy = _blur(field, 2.0).astype(np.float32) + np.random.default_rng(0).normal(0, 3, (FIELD, FIELD, 1))
    # Sensor noise must not pass for sharpness: a noisy blurred field stays well below the sharp one.
    assert quality.focus_score(np.clip(np.rint(noisy), 0, 255).astype(np.uint8)) < 0.6 * scores[0]


def test_focus_is_a_per_pixel_measure_so_a_wider_field_scores_alike(field):
    wide = np.pad(field, ((0, FIELD), (0, 2 * FIELD), (0, 0)), mode="symmetric")  # mirrored: no seams
    assert quality.focus_score(wide) == pytest.approx(quality.focus_score(field), rel=0.05)


def test_wide_capture_with_one_white_cell_passes_like_one_field(field, thresholds):
    """Four fields side by side, one with a white cell: the share is taken per training field, not per capture."""
    empty = _without_white_cell(field)
    wide = np.concatenate([np.concatenate([field, empty], 1), np.concatenate([empty, empty], 1)], 0)
    one = quality.assess(field, thresholds)
    report = quality.assess(wide, thresholds)
    assert report.ok, report.reasons
    assert report.white_cell_fraction == pytest.approx(one.white_cell_fraction, rel=0.25)
    # Over the whole capture the share would be diluted four times.
    assert quality.white_cells(wide, thresholds.field_size).mean() < 0.3 * one.white_cell_fraction
    # A capture with no white cell anywhere still fails.
    assert quality.assess(np.tile(empty, (2, 2, 1)), thresholds).reasons == ("no_white_cell",)


def test_a_precomputed_mask_gives_the_same_report_and_must_fit(field, thresholds):
    mask = quality.white_cells(field, thresholds.field_size)
    assert quality.assess(field, thresholds, white_cell_mask=mask) == quality.assess(field, thresholds)
    with pytest.raises(UsageError, match="mask has shape"):
        quality.assess(field, thresholds, white_cell_mask=mask[:-1])


# ---------------------------------------------------------------- thresholds
def test_fit_thresholds_on_synthetic_fields(thresholds):
    assert thresholds.n_images == 24 and thresholds.field_size == (FIELD, FIELD)
    scores = [quality.focus_score(x) for x in _fields(24, seed=0)]
    assert thresholds.min_focus == pytest.approx(quality.FOCUS_MARGIN * np.quantile(scores, quality.FOCUS_QUANTILE))
    assert 0 < thresholds.min_white_cell_fraction < 0.05 and 0.3 < thresholds.min_brightness < 0.9
    # The synthetic fields never clip: the limits are the headroom rule's, well below 1.
    assert thresholds.max_clipped_high == pytest.approx(quality.CLIP_HIGH_HEADROOM)
    assert thresholds.max_clipped_low == pytest.approx(quality.CLIP_LOW_HEADROOM)


def test_fit_takes_a_generator_and_refuses_nothing():
    fitted = quality.fit_thresholds(x for x in _fields(4, seed=2))
    assert fitted.n_images == 4
    with pytest.raises(UsageError, match="at least one training image"):
        quality.fit_thresholds([])


def test_thresholds_and_report_round_trip_through_json(field, thresholds):
    again = QualityThresholds.from_dict(json.loads(json.dumps(thresholds.to_dict())))
    assert again == thresholds
    report = json.loads(json.dumps(quality.assess(_blur(field, 3.0), thresholds).to_dict()))
    assert report["ok"] is False and report["reasons"] == ["out_of_focus"] and report["message"] == "retake: out of focus"
    assert QualityThresholds.from_dict(report["thresholds"]) == thresholds
    assert set(report) >= {"focus", "brightness", "clipped_high", "clipped_low", "white_cell_fraction"}


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(min_focus=float("nan")), "quality.min_focus is nan, not a finite number"),
        (dict(min_focus=-1.0), "quality.min_focus is -1.0; it must be >= 0"),
        (dict(max_clipped_high=1.5), "quality.max_clipped_high is 1.5; it must be in (0, 1]"),
        (dict(max_clipped_low=0.0), "quality.max_clipped_low is 0.0; it must be in (0, 1]"),
        (dict(min_white_cell_fraction=True), "quality.min_white_cell_fraction is True, not a finite number"),
        (dict(min_brightness="0.5"), "quality.min_brightness is '0.5', not a finite number"),
        (dict(field_size=[128]), "quality.field_size must be [height, width]"),
        (dict(n_images=-3), "quality.n_images must be a whole number"),
        (dict(typo=1.0), "unknown quality fields ['typo']"),
    ],
)
def test_from_dict_names_the_bad_field(thresholds, change, message):
    with pytest.raises(UsageError) as err:
        QualityThresholds.from_dict({**thresholds.to_dict(), **change})
    assert message in err.value.message


def test_from_dict_requires_the_four_limits(thresholds):
    data = thresholds.to_dict()
    del data["min_focus"]
    with pytest.raises(UsageError, match=r"missing field\(s\) \['min_focus'\]"):
        QualityThresholds.from_dict(data)
    minimal = {k: thresholds.to_dict()[k] for k in ("min_focus", "max_clipped_high", "max_clipped_low",
                                                    "min_white_cell_fraction")}
    assert QualityThresholds.from_dict(minimal).min_brightness == 0.0  # optional checks default to off


# ---------------------------------------------------------------- the bundle section
@pytest.fixture(scope="module")
def source_bundle(tmp_path_factory) -> Path:
    return shared_tiny_bundle(tmp_path_factory, "int8", True)


def _edited(source: Path, tmp_path: Path, change) -> Path:
    bundle = Path(shutil.copytree(source, tmp_path / "bundle"))
    meta = json.loads((bundle / "bundle.json").read_text())
    change(meta)
    (bundle / "bundle.json").write_text(json.dumps(meta))
    write_manifest(bundle)
    return bundle


def test_converted_bundle_carries_thresholds_fitted_on_its_training_images(source_bundle):
    bundle = load_bundle(source_bundle)
    th = bundle.quality
    assert isinstance(th, QualityThresholds)
    assert th.field_size == (SIZE, SIZE) and th.n_images > 0  # fitted at model input size on the train split
    assert th.min_focus > 0 and math.isfinite(th.min_focus) and 0 < th.max_clipped_high <= 1
    assert bundle.meta["quality"] == th.to_dict()


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("min_focus", float("nan"), "bundle.json quality.min_focus is nan, not a finite number"),
        ("max_clipped_high", -0.1, "quality.max_clipped_high is -0.1; it must be in (0, 1]"),
        ("min_white_cell_fraction", 2, "quality.min_white_cell_fraction is 2; it must be in [0, 1)"),
    ],
)
def test_damaged_quality_section_is_refused_at_load(source_bundle, tmp_path, key, value, message):
    bundle = _edited(source_bundle, tmp_path, lambda meta: meta["quality"].__setitem__(key, value))
    with pytest.raises(BundleError) as err:
        load_bundle(bundle)
    assert message in err.value.message and "re-run `leukoedge convert`" in err.value.user_message()


def test_quality_section_that_is_not_an_object_is_refused(source_bundle, tmp_path):
    bundle = _edited(source_bundle, tmp_path, lambda meta: meta.__setitem__("quality", [1, 2]))
    with pytest.raises(BundleError, match="quality must be an object"):
        load_bundle(bundle)


def test_bundle_without_the_section_stays_valid(source_bundle, tmp_path):
    bundle = load_bundle(_edited(source_bundle, tmp_path, lambda meta: meta.pop("quality")))
    assert bundle.quality is None and bundle.valid


@pytest.mark.shared
def test_real_taleqani_fields_pass_and_their_blurred_copies_do_not():
    """A small real-data check (the full measurement is benchmarks/quality_gate.py)."""
    from conftest import TALEQANI
    from leukoedge.preprocess import PreprocessSpec, load_image

    spec = PreprocessSpec.square(160)
    files = sorted((TALEQANI / "Original" / "Early").glob("*.jpg"))
    fit = quality.fit_thresholds(load_image(p, spec) for p in files[:60:2])
    held_out = [load_image(p, spec) for p in files[-10:]]
    assert all(quality.assess(x, fit).ok for x in held_out)
    assert all(quality.assess(_blur(x, 2.0), fit).reasons == ("out_of_focus",) for x in held_out)


def test_best_window_fraction_equals_a_brute_force_search_over_the_same_windows():
    rng = np.random.default_rng(3)
    for h, w, fh, fw in [(40, 57, 16, 16), (33, 20, 10, 7), (12, 12, 12, 5), (90, 61, 31, 60)]:
        mask = rng.random((h, w)) < 0.2
        ys, xs = quality._starts(h, min(fh, h)), quality._starts(w, min(fw, w))
        best = max(mask[y:y + min(fh, h), x:x + min(fw, w)].mean() for y in ys for x in xs)
        assert quality._best_window_fraction(mask, (fh, fw)) == pytest.approx(best, abs=1e-12)


@pytest.mark.parametrize("n", [1, 2, 7, 1000, 1001])
def test_median_is_numpys_median(n):
    values = np.random.default_rng(n).random(n).astype(np.float32)
    assert quality._median(values) == pytest.approx(float(np.median(values)), abs=0)
