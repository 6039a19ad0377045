"""Captures at the training scale, tiled (issue 15): geometry, pixels, and the real classifier.

Pure geometry is tested on numbers; the classifier on a copy of the session's tiny
int8 bundle (real conversion, real LiteRT interpreter) that records a training
scale of 2 um per model-input pixel, i.e. a 32 px training field of 64 um. Cells
are the bundle factory's: its Benign and Pro cells are white cells by the
nucleus-colour rule (Early's blue disc is borderline, Pre's brown ring is not one),
so mosaics are made of those two.
"""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bundle_factory import SIZE, draw_cell, scaled_bundle_copy, shared_tiny_bundle
from leukoedge.bundle import load_bundle
from leukoedge.errors import ScaleError, UsageError
from leukoedge.runtime import Classifier, tiling
from leukoedge.runtime.classifier import Capture
from real_images import HQ_FRAME, camera_frame, encode

#: The scaled test bundle: 32 px training images of 2 um/px, so one model pixel = 2 um.
TRAIN_UM = 2.0
CELLS = ("Benign", "Pro", "Pro", "Benign")


@pytest.fixture(scope="session")
def plain_bundle(tmp_path_factory) -> Path:
    """The tiny bundle as an old one: no training scale, no quality thresholds."""
    shared = shared_tiny_bundle(tmp_path_factory, "int8", True)
    return scaled_bundle_copy(shared, tmp_path_factory.mktemp("plain") / "bundle", None, without=("quality",))


@pytest.fixture(scope="session")
def scaled_bundle(tmp_path_factory) -> Path:
    """The tiny bundle with a training scale of TRAIN_UM per model pixel and no quality thresholds."""
    shared = shared_tiny_bundle(tmp_path_factory, "int8", True)
    return scaled_bundle_copy(shared, tmp_path_factory.mktemp("scaled") / "bundle", TRAIN_UM, without=("quality",))


def gated_bundle(scaled: Path, tmp_path: Path, **limits) -> Classifier:
    """A classifier for the scaled tiny bundle with quality thresholds (permissive unless ``limits`` say otherwise)."""
    pytest.importorskip("leukoedge.quality")
    quality = {"min_focus": 0.0, "max_clipped_high": 1.0, "max_clipped_low": 1.0, "min_white_cell_fraction": 0.0,
               "field_size": [SIZE, SIZE], **limits}
    return Classifier(load_bundle(scaled_bundle_copy(scaled, tmp_path / "gated", TRAIN_UM, extra={"quality": quality})))


@pytest.fixture(scope="session")
def clf(scaled_bundle) -> Classifier:
    return Classifier(load_bundle(scaled_bundle))


@pytest.fixture(scope="session")
def plain(plain_bundle) -> Classifier:
    return Classifier(load_bundle(plain_bundle))


def fields(seed: int = 0, labels=CELLS) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [draw_cell(label, rng) for label in labels]


def mosaic(ims: list[np.ndarray]) -> np.ndarray:
    """2x2 mosaic: [0 1; 2 3]."""
    return np.concatenate([np.concatenate(ims[:2], 1), np.concatenate(ims[2:4], 1)], 0)


def blank(size: int, seed: int = 0) -> np.ndarray:
    """A pale field with noise and no cell at all."""
    rng = np.random.default_rng(seed)
    img = np.array([235, 215, 225], np.float32) + rng.normal(0, 6, (size, size, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def union_covers(boxes, h: int, w: int) -> bool:
    covered = np.zeros((h, w), bool)
    for x, y, bw, bh in boxes:
        covered[y:y + bh, x:x + bw] = True
    return bool(covered.all())


# ---------------------------------------------------------------- geometry
@pytest.mark.parametrize("length", [32, 33, 40, 64, 65, 100, 161, 662, 1000])
@pytest.mark.parametrize("overlap", [0.0, 0.25, 0.5])
def test_tile_starts_cover_the_axis_with_the_overlap_asked(length, overlap):
    tile = 32
    starts = tiling.tile_starts(length, tile, overlap)
    assert starts[0] == 0 and starts[-1] == max(0, length - tile)
    covered = np.zeros(length, bool)
    for s in starts:
        covered[s:s + tile] = True
    assert covered.all()
    steps = np.diff(starts)
    assert (steps <= tile * (1 - overlap) + 1e-9).all()  # neighbours overlap at least `overlap`
    assert len(steps) == 0 or steps.max() - steps.min() <= 1  # evenly spread
    # as few as that allows: one tile fewer could not keep the overlap
    if len(starts) > 2:
        assert (length - tile) / (len(starts) - 2) > tile * (1 - overlap)


def test_tile_starts_reject_a_bad_overlap():
    for bad in (1.0, -0.1):
        with pytest.raises(UsageError):
            tiling.tile_starts(100, 32, bad)


def test_own_regions_partition_the_canvas_and_lie_inside_their_tiles():
    plan = tiling.plan_tiles((3040, 4056), 0.08, (0.49, 0.49), (160, 160), overlap=0.5)
    owner = np.zeros(plan.canvas_size, np.int32)
    for r, c, y, x in plan.positions():
        y0, y1, x0, x1 = plan.own_region(r, c)
        assert y <= y0 < y1 <= y + 160 and x <= x0 < x1 <= x + 160
        owner[y0:y1, x0:x1] += 1
    assert (owner == 1).all()


def test_2x2_mosaic_of_training_fields_is_cut_into_those_fields():
    for overlap, n in ((0.0, 2), (0.5, 3)):
        plan = tiling.plan_tiles((64, 64), TRAIN_UM, (TRAIN_UM, TRAIN_UM), (SIZE, SIZE), overlap)
        assert plan.ys == plan.xs and len(plan.xs) == n and plan.fit == "tiles"
        boxes = {plan.box(y, x) for _, _, y, x in plan.positions()}
        assert {(0, 0, 32, 32), (32, 0, 32, 32), (0, 32, 32, 32), (32, 32, 32, 32)} <= boxes


def test_plan_rescales_by_the_ratio_of_pixel_sizes():
    plan = tiling.plan_tiles((3040, 4056), 0.08, (0.49, 0.49), (160, 160))
    assert plan.scaled_size == (round(3040 * 0.08 / 0.49), round(4056 * 0.08 / 0.49)) == (496, 662)
    assert plan.n_tiles == 4 * 5 and plan.fit == "tiles"
    assert plan.factor == pytest.approx((3040 / 496, 4056 / 662))
    boxes = [plan.box(y, x) for _, _, y, x in plan.positions()]
    assert union_covers(boxes, 3040, 4056)
    assert all(x + w <= 4056 and y + h <= 3040 for x, y, w, h in boxes)
    # a tile covers 160 x 0.49 = 78.4 um: 980 capture pixels at 0.08 um/px
    assert all(abs(w - 980) <= 2 and abs(h - 980) <= 2 for _, _, w, h in boxes)


def test_small_captures_are_padded_and_near_misses_resized():
    padded = tiling.plan_tiles((20, 24), TRAIN_UM, (TRAIN_UM, TRAIN_UM), (SIZE, SIZE))
    assert padded.fit == "padded" and padded.canvas_size == (32, 32) and padded.n_tiles == 1
    assert padded.offset == (6, 4) and padded.box(0, 0) == (0, 0, 24, 20)  # clipped to the capture
    near = tiling.plan_tiles((31, 31), TRAIN_UM, (TRAIN_UM, TRAIN_UM), (SIZE, SIZE))
    assert near.fit == "resized" and near.scaled_size == (32, 32) and near.box(0, 0) == (0, 0, 31, 31)


def test_absurd_scales_are_refused_with_a_message():
    with pytest.raises(ScaleError, match="far too large"):
        tiling.plan_tiles((3040, 4056), 50.0, (2.0, 2.0), (32, 32))
    with pytest.raises(ScaleError, match="far too small"):
        tiling.plan_tiles((100, 100), 0.01, (2.0, 2.0), (32, 32))


def test_decode_target_is_enough_for_the_rescaled_capture_whatever_the_orientation():
    t = tiling.decode_target((3040, 4056), 0.08, (0.49, 0.49))
    assert t[0] == t[1] >= 1.5 * 496
    assert tiling.decode_target((4056, 3040), 0.08, (0.49, 0.49)) == t


def test_a_pale_nucleus_beside_dark_ones_is_found_as_in_its_own_training_image():
    """One Otsu threshold over the capture drops the factory's pale Early nucleus next to dark Pro ones;
    the tile's own mask (as training computed it on that very image) finds it."""
    from leukoedge.cells import white_cell_mask

    plan = tiling.plan_tiles((64, 64), TRAIN_UM, (TRAIN_UM, TRAIN_UM), (SIZE, SIZE))
    agree = found = 0
    for seed in range(12):
        rng = np.random.default_rng(seed)
        ims = [draw_cell(label, rng) for label in ("Pro", "Early", "Pro", "Benign")]
        counts = tiling.cell_counts(tiling.white_cells(mosaic(ims), plan))
        alone = white_cell_mask(ims[1]).sum() >= counts.min_pixels
        agree += (counts.in_own[1] >= counts.min_pixels) == alone
        found += alone
    assert agree == 12 and found >= 4


def test_aggregate_leaves_abstaining_tiles_out_and_abstains_only_when_all_do():
    a, b = np.array([0.9, 0.1]), np.array([0.2, 0.8])
    agg = tiling.aggregate([a, b, b], [False, True, True], [1.0, 5.0, 6.0], [0, 3, 4])
    assert agg.probabilities == pytest.approx(a) and not agg.abstained and agg.used == (0,)
    assert "2 abstaining" in agg.description and agg.ood_score == 5.0
    agg = tiling.aggregate([a, b], [True, True], [None, None], [1, 2])
    assert agg.abstained and agg.probabilities == pytest.approx((a + b) / 2) and agg.used == (1, 2)


# ---------------------------------------------------------------- the classifier: no scale in the bundle
def test_old_bundle_behaves_as_before_with_the_new_fields(plain):
    img = mosaic(fields())
    pred = plain.classify(img)
    raw = plain.run(plain.to_pixels(img))
    assert pred.scale_source == "bundle-unknown" and pred.um_per_px is None and pred.scale_message is None
    assert pred.probabilities[pred.label] == pytest.approx(pred.confidence)
    assert int(np.argmax(raw.probabilities)) == pred.class_index
    assert len(pred.tiles) == 1 and pred.tiles[0].box == (0, 0, 64, 64) and pred.tiles[0].used
    assert set(pred.timings) == {"preprocess_ms", "invoke_ms", "postprocess_ms"}
    assert pred.heatmap.shape == (SIZE, SIZE) and not pred.retake
    given = plain.classify(img, um_per_px=0.5)  # a calibration cannot help a bundle without a scale
    assert given.probabilities == pred.probabilities and given.scale_source == "bundle-unknown"
    assert given.um_per_px is None and "does not record the scale" in given.scale_message


# ---------------------------------------------------------------- with a bundle scale
def test_mosaic_tiles_are_the_original_fields_with_their_own_results(clf, plain):
    ims = fields()
    pred = clf.classify(mosaic(ims), um_per_px=TRAIN_UM)
    assert pred.scale_source == "given" and pred.um_per_px == TRAIN_UM
    assert [t.box for t in pred.tiles] == [(0, 0, 32, 32), (32, 0, 32, 32), (0, 32, 32, 32), (32, 32, 32, 32)]
    for tile, im in zip(pred.tiles, ims):
        alone = plain.classify(im)  # the field on its own: exactly the pixels the model got as a tile
        assert tile.has_white_cell and tile.used
        assert tile.probabilities == pytest.approx(alone.probabilities, abs=1e-12)
        assert tile.abstained == alone.abstained
    kept = [t for t in pred.tiles if not t.abstained] or list(pred.tiles)
    mean = {c: np.mean([t.probabilities[c] for t in kept]) for c in pred.probabilities}
    assert pred.probabilities == pytest.approx(mean)
    assert "mean probability" in pred.aggregation or "abstained" in pred.aggregation
    assert pred.tiling["rows"] == pred.tiling["cols"] == 2


def test_overlapping_tiles_contain_the_originals_and_read_each_cell_once(scaled_bundle, plain):
    clf50 = Classifier(load_bundle(scaled_bundle), tile_overlap=0.5)
    ims = fields(1)
    pred = clf50.classify(mosaic(ims), um_per_px=TRAIN_UM)
    assert len(pred.tiles) == 9
    corners = {t.box: t for t in pred.tiles}
    for box, im in zip([(0, 0, 32, 32), (32, 0, 32, 32), (0, 32, 32, 32), (32, 32, 32, 32)], ims):
        assert corners[box].probabilities == pytest.approx(plain.classify(im).probabilities, abs=1e-12)
    # own regions split the capture: the white-cell pixels of all tiles add up to the capture's once
    assert sum(t.white_cell_pixels for t in pred.tiles) <= 64 * 64


def test_empty_tiles_are_not_used_and_an_empty_field_asks_for_a_retake(clf):
    ims = fields(2)
    ims[3] = blank(SIZE, 5)
    pred = clf.classify(mosaic(ims), um_per_px=TRAIN_UM)
    last = pred.tiles[3]
    assert not last.has_white_cell and not last.used and last.probabilities is None and last.label is None
    assert all(t.used or t.abstained for t in pred.tiles[:3])
    assert not pred.retake

    empty = clf.classify(blank(64), um_per_px=TRAIN_UM)
    assert empty.retake and "no_white_cell" in empty.quality["reasons"]
    assert "no white cell" in empty.quality["message"]
    d = empty.to_dict()
    assert d["label"] is None and d["predicted"] == empty.label and d["retake"]


def test_failed_quality_check_withholds_the_label_but_keeps_the_prediction(scaled_bundle, tmp_path, clf):
    img = mosaic(fields(2))
    gated = gated_bundle(scaled_bundle, tmp_path, min_focus=1e6)  # nothing is that sharp
    pred = gated.classify(img, um_per_px=TRAIN_UM)
    assert pred.retake and pred.quality["ok"] is False and pred.quality["reasons"] == ["out_of_focus"]
    assert pred.quality["message"].startswith("retake:")
    d = pred.to_dict()
    assert d["label"] is None and d["predicted"] == pred.label and d["retake"]
    # the prediction itself is the ungated one
    assert pred.probabilities == pytest.approx(clf.classify(img, um_per_px=TRAIN_UM).probabilities, abs=1e-12)
    assert gated.info()["scale"]["quality_gate"] and not clf.info()["scale"]["quality_gate"]


def test_no_white_cell_retake_follows_the_bundles_quality_rule(scaled_bundle, tmp_path):
    """Thresholds fitted on training fields that often show no detectable white cell turn the check off
    (min_white_cell_fraction 0); then an empty view is classified without a retake."""
    off = gated_bundle(scaled_bundle, tmp_path / "off").classify(blank(64), um_per_px=TRAIN_UM)
    assert not off.retake and off.quality["ok"] and "no tile holds" in off.aggregation
    on = gated_bundle(scaled_bundle, tmp_path / "on", min_white_cell_fraction=0.01).classify(blank(64), um_per_px=TRAIN_UM)
    assert on.retake and "no_white_cell" in on.quality["reasons"]


def test_boxes_are_in_capture_pixels_and_tiles_keep_their_physical_size(clf):
    base = mosaic(fields(3))
    one = clf.classify(base, um_per_px=TRAIN_UM)
    big = np.asarray(Image.fromarray(base).resize((160, 160), Image.Resampling.BICUBIC))
    two = clf.classify(big, um_per_px=TRAIN_UM * 64 / 160)  # 2.5x the magnification
    assert one.tiling["scaled_size"] == two.tiling["scaled_size"] == [64, 64]
    assert [t.box for t in two.tiles] == [(0, 0, 80, 80), (80, 0, 80, 80), (0, 80, 80, 80), (80, 80, 80, 80)]
    for a, b in zip(one.tiles, two.tiles):
        assert a.box[2] * one.um_per_px == pytest.approx(b.box[2] * two.um_per_px) == SIZE * TRAIN_UM
    assert two.capture_size == (160, 160)


def test_heatmap_is_stitched_over_the_whole_capture(clf):
    wide = np.concatenate([mosaic(fields(4)), mosaic(fields(5))], 1)  # 64 x 128: 2 x 4 tiles
    pred = clf.classify(wide, um_per_px=TRAIN_UM)
    assert len(pred.tiles) == 8
    h, w = pred.heatmap.shape
    assert w == 2 * h and pred.heatmap.dtype == np.float32
    assert 0.0 <= pred.heatmap.min() and pred.heatmap.max() == pytest.approx(1.0)
    assert clf.classify(wide, um_per_px=TRAIN_UM, heatmap=False).heatmap is None


def test_small_capture_is_padded_by_mirroring_its_edges(clf):
    im = draw_cell("Benign", np.random.default_rng(7))[4:28, 4:28]  # 24 px: 48 um of a 64 um field
    pred = clf.classify(im, um_per_px=TRAIN_UM)
    assert pred.tiling["fit"] == "padded" and pred.tiles[0].box == (0, 0, 24, 24)
    plan = tiling.plan_tiles(im.shape[:2], TRAIN_UM, (TRAIN_UM, TRAIN_UM), (SIZE, SIZE))
    canvas, scaled = tiling.rescale(im, plan)
    oy, ox = plan.offset
    assert canvas.shape == (SIZE, SIZE, 3) and np.array_equal(canvas[oy:oy + 24, ox:ox + 24], im)
    assert np.array_equal(canvas[oy - 1, ox:ox + 24], im[1]) and np.array_equal(canvas[oy:oy + 24, ox - 1], im[:, 1])
    tiny = tiling.plan_tiles((8, 8), TRAIN_UM, (TRAIN_UM, TRAIN_UM), (SIZE, SIZE))
    assert tiling.rescale(im[:8, :8], tiny)[0].shape == (SIZE, SIZE, 3)  # pads wider than the capture
    assert pred.heatmap is not None and pred.heatmap.shape[0] == pred.heatmap.shape[1]


def test_to_dict_is_json_ready(clf):
    pred = clf.classify(mosaic(fields()), um_per_px=TRAIN_UM)
    d = json.loads(json.dumps(pred.to_dict(include_heatmap=True)))
    assert d["scale_source"] == "given" and d["um_per_px"] == TRAIN_UM
    assert len(d["tiles"]) == 4 and d["tiles"][0]["box"] == [0, 0, 32, 32]
    assert {"decode_ms", "scale_ms", "tiles_ms", "invoke_ms", "aggregate_ms"} <= set(d["timings"])
    assert d["capture_size"] == [64, 64] and d["tiling"]["fit"] == "tiles"


def test_bad_um_per_px_is_refused(clf):
    for bad in (0, -1, float("nan"), "x"):
        with pytest.raises(UsageError):
            clf.classify(mosaic(fields()), um_per_px=bad)
    with pytest.raises(ScaleError):
        clf.classify(mosaic(fields()), um_per_px=500.0)


def test_tile_overlap_is_checked_at_construction(scaled_bundle):
    with pytest.raises(UsageError):
        Classifier(load_bundle(scaled_bundle), tile_overlap=1.5)


# ---------------------------------------------------------------- estimated scale
def test_failed_estimate_falls_back_to_the_whole_frame_with_a_message(clf, plain):
    img = mosaic(fields(6))  # synthetic cells, no red cells to measure
    pred = clf.classify(img)
    assert pred.scale_source == "estimate-failed" and pred.um_per_px is None
    assert "could not be estimated" in pred.scale_message and "calibrate" in pred.scale_message
    assert len(pred.tiles) == 1 and pred.tiles[0].box == (0, 0, 64, 64)
    assert pred.probabilities == pytest.approx(plain.classify(img).probabilities, abs=1e-12)
    assert {"decode_ms", "scale_ms"} <= set(pred.timings)


def synth_field(size: int = 448, seed: int = 0) -> np.ndarray:
    """A synthetic smear field with red cells (the project's generator): something to measure."""
    from leukoedge.data.synth import render_field

    return render_field("Pro-B", np.random.default_rng(seed), size)


def test_estimated_scale_tiles_two_magnifications_at_the_same_physical_size(clf):
    pytest.importorskip("leukoedge.scale")
    field = synth_field()
    zoomed = np.asarray(Image.fromarray(field).resize((896, 896), Image.Resampling.BICUBIC))
    one, two = clf.classify(field), clf.classify(encode(zoomed, "JPEG", quality=92))
    for pred in (one, two):
        assert pred.scale_source == "estimated" and "red cells" in pred.scale_message
        assert pred.tiles[0].box[2] * pred.um_per_px == pytest.approx(SIZE * TRAIN_UM, rel=0.05)
    assert two.um_per_px == pytest.approx(one.um_per_px / 2, rel=0.1)  # the ruler scales with the zoom
    assert two.tiles[0].box[2] == pytest.approx(2 * one.tiles[0].box[2], rel=0.1)
    assert one.timings["scale_ms"] > 0


class _FakeScale:
    """Stands in for leukoedge.scale where a test needs an estimate the real estimator would not give."""

    def __init__(self, um_per_px: float) -> None:
        self.um = um_per_px

    def estimate_scale(self, rgb):
        from leukoedge.scale import ScaleEstimate

        return ScaleEstimate(um_per_px=self.um, rbc_diameter_px=30.0, n_cells=20, spread=0.1, rbc_um=7.5)


def test_an_estimate_that_cannot_fit_the_capture_falls_back_too(scaled_bundle):
    pytest.importorskip("leukoedge.scale")
    odd = Classifier(load_bundle(scaled_bundle))
    odd._scale_module = _FakeScale(500.0)  # 500 um/px: thousands of tiles
    pred = odd.classify(mosaic(fields()))
    assert pred.scale_source == "estimate-failed" and "does not fit" in pred.scale_message
    assert len(pred.tiles) == 1


# ---------------------------------------------------------------- real-size files
@pytest.fixture(scope="module")
def frame_jpeg() -> bytes:
    return encode(camera_frame(HQ_FRAME, seed=2), "JPEG", quality=90)


def test_12mp_jpeg_is_decoded_reduced_and_tiled(clf, frame_jpeg):
    um = 0.125  # 16x finer than the tiny bundle's 2 um/px: 254 x 190 model pixels, 8 x 6 tiles
    pred = clf.classify(frame_jpeg, um_per_px=um)
    h, w = HQ_FRAME[1], HQ_FRAME[0]
    assert pred.capture_size == (h, w)
    assert pred.tiling["scaled_size"] == [round(h * um / TRAIN_UM), round(w * um / TRAIN_UM)] == [190, 254]
    assert (pred.tiling["rows"], pred.tiling["cols"]) == (6, 8) and len(pred.tiles) == 48
    assert union_covers([t.box for t in pred.tiles], h, w)
    assert all(abs(t.box[2] - SIZE * TRAIN_UM / um) <= 2 for t in pred.tiles)  # 64 um = 512 capture px
    assert pred.label in pred.probabilities and json.dumps(pred.to_dict())


def test_file_capture_and_decode_plan_give_the_same_result(clf, frame_jpeg):
    direct = clf.classify(frame_jpeg, um_per_px=0.125)
    with clf.decode_plan(frame_jpeg, um_per_px=0.125) as pending:
        assert pending.header.jpeg_scale > 1  # DCT scaling: far fewer pixels than the frame
        capture = clf.decode_capture(pending)
    assert isinstance(capture, Capture) and capture.full_size == (HQ_FRAME[1], HQ_FRAME[0])
    again = clf.classify(capture, um_per_px=0.125)
    assert again.probabilities == direct.probabilities and [t.box for t in again.tiles] == [t.box for t in direct.tiles]


def test_a_capture_decoded_too_small_for_its_scale_is_decoded_again(clf):
    """An app that decoded small (e.g. to estimate the scale) and then learns a finer scale gets the pixels it needs."""
    big = np.asarray(Image.fromarray(mosaic(fields(10))).resize((256, 256), Image.Resampling.BICUBIC))
    data = encode(big, "JPEG", quality=92)
    small = np.asarray(Image.open(io.BytesIO(data)).reduce(8))  # 32 x 32: 4x too few for 1 um/px
    pred = clf.classify(Capture(small, (256, 256), data), um_per_px=1.0)
    assert pred.tiling["scaled_size"] == [128, 128]
    assert pred.probabilities == clf.classify(data, um_per_px=1.0).probabilities


def test_exif_rotated_jpeg_gives_boxes_in_upright_pixels(clf):
    img = np.concatenate([mosaic(fields(8)), mosaic(fields(9))], 0)  # 128 x 64 upright
    stored = Image.fromarray(np.ascontiguousarray(np.rot90(img, 1)))  # stored lying: 64 x 128
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    out = io.BytesIO()
    stored.save(out, "JPEG", quality=95, exif=exif)
    pred = clf.classify(out.getvalue(), um_per_px=TRAIN_UM)
    assert pred.capture_size == (128, 64) and (pred.tiling["rows"], pred.tiling["cols"]) == (4, 2)
    assert union_covers([t.box for t in pred.tiles], 128, 64)


def test_table_quantisation_of_pixels_equals_quantize():
    """The tiled path feeds many inputs per capture; set_input's fast path must give the same tensor."""
    from leukoedge.runtime.adapters import quantize, quantize_pixels

    px = np.random.default_rng(0).integers(0, 256, (1, 16, 16, 3), dtype=np.uint8)
    px[0, 0, 0] = [0, 128, 255]
    for dtype, scale, zero in ((np.int8, 1.0, -128), (np.uint8, 1.0, 0), (np.int8, 1.0, 0), (np.uint8, 1.0, -5),
                               (np.int8, 0.7, -3), (np.uint8, 2.3, 10), (np.float32, 0.0, 0)):
        a, b = quantize(px, dtype, scale, zero), quantize_pixels(px, dtype, scale, zero)
        assert a.dtype == b.dtype and np.array_equal(a, b), (dtype, scale, zero)
