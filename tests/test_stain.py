"""Stain/colour operations: exact round trips, target statistics, structure kept, no NaN on blank frames."""
from __future__ import annotations

import numpy as np
import pytest

from leukoedge import stain
from leukoedge.errors import InvalidImageError, UsageError


def smear(seed: int = 0, size: int = 48, tint=(0, 0, 0)) -> np.ndarray:
    """Pinkish background, pale red cells, a few dark purple nuclei, noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    img = np.zeros((size, size, 3)) + np.array([235.0, 215.0, 225.0])
    for _ in range(6):
        cy, cx = rng.integers(0, size, 2)
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < 25] = [215, 160, 170]
    for _ in range(2):
        cy, cx = rng.integers(8, size - 8, 2)
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < 36] = [110, 60, 150]
    img += rng.normal(0, 4, img.shape) + np.asarray(tint, dtype=float)
    return np.clip(img, 0, 255).astype(np.uint8)


def corr(a: np.ndarray, b: np.ndarray) -> float:
    ga, gb = a.astype(float) @ stain.LUMA, b.astype(float) @ stain.LUMA
    return float(np.corrcoef(ga.ravel(), gb.ravel())[0, 1])


def test_hed_round_trip_is_exact_for_every_uint8_value():
    v = np.arange(256, dtype=np.uint8)
    img = np.stack(np.meshgrid(v, v[::-1], indexing="ij"), -1)[:, :, [0, 1, 1]].copy()
    img[..., 2] = (img[..., 0].astype(int) * 7 % 256).astype(np.uint8)
    assert np.array_equal(stain.hed_to_rgb(stain.rgb_to_hed(img)), img)


def test_hed_separates_haematoxylin_from_eosin():
    pure_h = stain.od_to_rgb(np.array([[[0.65, 0.70, 0.29]]]) * 1.5)  # 1.5 OD of haematoxylin
    hed = stain.rgb_to_hed(pure_h)[0, 0]
    assert hed[0] == pytest.approx(1.5, abs=0.02) and abs(hed[1]) < 0.02 and abs(hed[2]) < 0.02


def test_hed_jitter_is_deterministic_and_varies_with_seed():
    img = smear()
    a = stain.hed_jitter(img, np.random.default_rng(3), 0.2, 0.2)
    b = stain.hed_jitter(img, np.random.default_rng(3), 0.2, 0.2)
    c = stain.hed_jitter(img, np.random.default_rng(4), 0.2, 0.2)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert corr(img, a) > 0.9
    assert np.array_equal(stain.hed_jitter(img, np.random.default_rng(0), 0.0, 0.0), img)
    with pytest.raises(UsageError):
        stain.hed_jitter(img, 3, 0.1, 0.1)


def test_lab_known_values_and_round_trip():
    lab = stain.rgb_to_lab(np.array([[[255, 255, 255], [255, 0, 0], [0, 0, 0]]], dtype=np.uint8))[0]
    np.testing.assert_allclose(lab[0], [100, 0, 0], atol=0.05)
    np.testing.assert_allclose(lab[1], [53.24, 80.09, 67.20], atol=0.05)
    np.testing.assert_allclose(lab[2], [0, 0, 0], atol=1e-6)
    img = smear(1)
    assert np.abs(stain.lab_to_rgb(stain.rgb_to_lab(img)).astype(int) - img).max() <= 1


def test_reinhard_matches_target_stats_and_keeps_structure():
    img = smear(2, tint=(-30, 10, 20))
    target = stain.ReinhardTarget(mean=(75.0, 8.0, -6.0), std=(12.0, 9.0, 7.0))
    out = stain.reinhard_normalize(img, target)
    lab = stain.rgb_to_lab(out).reshape(-1, 3)
    np.testing.assert_allclose(lab.mean(0), target.mean, atol=1.0)
    np.testing.assert_allclose(lab.std(0), target.std, rtol=0.1)
    assert corr(img, out) > 0.95
    assert stain.ReinhardTarget.from_dict(target.to_dict()) == target


def two_stain_image(stains: np.ndarray, seed: int = 0, size: int = 48, scale=(1.0, 1.0)) -> np.ndarray:
    """Macenko's model: OD = concentrations @ stain vectors (nuclei: stain 1, cytoplasm/red cells: stain 2)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    conc = np.zeros((size, size, 2))
    for _ in range(8):
        cy, cx = rng.integers(0, size, 2)
        conc[(yy - cy) ** 2 + (xx - cx) ** 2 < 30, 1] = 0.6
    for _ in range(3):
        cy, cx = rng.integers(6, size - 6, 2)
        conc[(yy - cy) ** 2 + (xx - cx) ** 2 < 25, 0] = 1.2
    conc = np.maximum(conc + rng.normal(0, 0.04, conc.shape), 0) * np.asarray(scale)
    s = stains / np.linalg.norm(stains, axis=0)
    return stain.od_to_rgb(conc @ s.T)


def test_macenko_maps_stainings_to_target_and_keeps_structure():
    batch_a = np.array([[0.65, 0.07], [0.70, 0.99], [0.29, 0.11]])
    batch_b = np.array([[0.45, 0.20], [0.80, 0.90], [0.40, 0.35]])
    a = two_stain_image(batch_a, seed=3)
    b = two_stain_image(batch_b, seed=3, scale=(1.3, 0.7))  # same cells, another stain batch
    target = stain.fit_macenko_target([two_stain_image(batch_a, seed=s) for s in range(3)])
    na, nb = stain.macenko_normalize(a, target), stain.macenko_normalize(b, target)
    assert corr(a, na) > 0.9 and corr(b, nb) > 0.9
    before = np.abs(a.astype(float) - b.astype(float)).mean()
    after = np.abs(na.astype(float) - nb.astype(float)).mean()
    assert after < before / 2, (before, after)
    stains, maxc = stain.macenko_stains(nb)
    np.testing.assert_allclose(maxc, target.max_concentrations, rtol=0.15)
    assert np.all(np.abs(np.sum(stains * target.matrix, axis=0)) > 0.98)  # same stain vectors as the target
    assert stain.MacenkoTarget.from_dict(target.to_dict()) == target


@pytest.mark.parametrize("value", [0, 255, 128])
def test_blank_frames_give_no_nan(value):
    blank = np.full((16, 16, 3), value, dtype=np.uint8)
    outs = [
        stain.macenko_normalize(blank),
        stain.reinhard_normalize(blank),
        stain.per_image_colour_normalize(blank),
        stain.hed_jitter(blank, np.random.default_rng(0), 0.2, 0.2),
        stain.grayscale(blank),
        stain.gaussian_blur(blank, 2.0),
    ]
    for out in outs:
        assert out.dtype == np.uint8 and out.shape == blank.shape
    assert np.array_equal(outs[0], blank)  # nothing to estimate: unchanged


def test_per_image_normalisation_removes_tint():
    a, b = smear(5), smear(5, tint=(-25, -20, -10))
    na, nb = stain.per_image_colour_normalize(a), stain.per_image_colour_normalize(b)
    np.testing.assert_allclose(na.astype(float).mean((0, 1)), stain.COLOUR_MEAN, atol=1.5)
    np.testing.assert_allclose(na.astype(float).std((0, 1)), stain.COLOUR_STD, atol=1.5)
    assert np.abs(na.astype(int) - nb.astype(int)).mean() < 3


def test_simple_ops():
    img = smear(6)
    g = stain.grayscale(img)
    assert np.array_equal(g[..., 0], g[..., 2])
    from PIL import Image
    assert np.abs(g[..., 0].astype(int) - np.asarray(Image.fromarray(img).convert("L"), dtype=int)).max() <= 1
    assert stain.adjust_brightness(img, 1.2).mean() > img.mean()
    wb = stain.white_balance(img, (1.1, 1.0, 0.9)).astype(float)
    assert wb[..., 0].mean() > img[..., 0].mean() and wb[..., 2].mean() < img[..., 2].mean()
    assert stain.gaussian_blur(img, 2.0).std() < img.std()
    with pytest.raises(InvalidImageError):
        stain.grayscale(img.astype(np.float32))
    with pytest.raises(UsageError):
        stain.white_balance(img, (1.0, 1.0))
