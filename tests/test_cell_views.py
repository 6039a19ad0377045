"""The ``cells`` augmentation: background swap and cell-centred crops (issue 7).

What must hold: the white cells of an image survive a swap pixel for pixel,
nothing of the donor's white cells leaks in (they would carry another class),
the background stops predicting the label, crops are centred on cells, and
images without a detected cell are left alone.
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

from leukoedge.errors import UsageError  # noqa: E402
from leukoedge.train import trainer  # noqa: E402
from leukoedge.train.augment import RECIPES, AugmentConfig, cell_centred_crop, cell_views, swap_background  # noqa: E402
from leukoedge.train.cells import white_cell_mask  # noqa: E402
from leukoedge.train.dataset import train_dataset  # noqa: E402
from leukoedge.train.rundir import RunDir, read_json  # noqa: E402

NUCLEUS = (110, 40, 170)  # Wright-Giemsa violet: nucleus_score (B-G) + min(R-G, B-G) = 200


def _field(size: int, background, centre, radius: float) -> np.ndarray:
    """A flat-background field with one violet disc (a white cell)."""
    yy, xx = np.mgrid[:size, :size]
    img = np.empty((size, size, 3), np.uint8)
    img[:] = background
    img[(yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 < radius ** 2] = NUCLEUS
    return img


def _only(**kw) -> AugmentConfig:
    """A recipe with nothing but the given operations."""
    return replace(RECIPES["none"], **kw)


def test_swap_keeps_the_cells_and_paints_over_the_donors_cells():
    a = _field(48, (230, 190, 200), (12, 12), 6)
    b = _field(48, (170, 200, 230), (36, 36), 6)
    ma, mb = white_cell_mask(a), white_cell_mask(b)
    assert ma.any() and mb.any() and not (ma & mb).any()
    out = swap_background(tf.constant(a, tf.float32), tf.constant(ma, tf.float32),
                          tf.constant(b, tf.float32), tf.constant(mb, tf.float32)).numpy()
    np.testing.assert_array_equal(out[ma], a[ma].astype(np.float32))  # own cells, pixel for pixel
    donor_bg = ~ma & ~mb
    np.testing.assert_array_equal(out[donor_bg], b[donor_bg].astype(np.float32))
    # Where the donor had its cell there is its mean background colour, not its violet nucleus.
    np.testing.assert_allclose(out[mb & ~ma], np.broadcast_to(b[~mb].mean(axis=0), out[mb & ~ma].shape), atol=1e-3)
    assert white_cell_mask(out.astype(np.uint8)).sum() <= ma.sum() * 1.05


def test_swap_breaks_a_planted_background_shortcut(base_seed):
    """Class 0 on pink, class 1 on blue: after the swap the tint says the class only by chance."""
    n, size = 64, 40
    rng = np.random.default_rng(base_seed)
    y = np.repeat([0, 1], n // 2).astype(np.int32)
    tints = [(235, 200, 205), (180, 205, 235)]
    x = np.stack([_field(size, tints[c], tuple(rng.integers(10, 30, 2)), 5) for c in y])
    masks = np.stack([white_cell_mask(im) for im in x]).astype(np.uint8)
    ds = train_dataset(x, y, batch_size=n, seed=1 + base_seed, first_epoch=0, last_epoch=3,
                       augment=_only(background=1.0), masks=masks)
    hits = []
    for xb, yb in ds:
        xb, yb = xb.numpy(), yb.numpy()
        corner = xb[:, 0, 0, :]  # a background pixel (cells are at least 5 px inside)
        says_blue = corner[:, 2] > corner[:, 0]
        hits.append(np.mean(says_blue == (yb == 1)))
    assert 0.3 < np.mean(hits) < 0.7  # 192 fair coins: 0.5 +- 0.036 (sd); 1.0 without the swap
    plain = train_dataset(x, y, batch_size=n, seed=1, first_epoch=0, last_epoch=1, augment=_only(), masks=None)
    xb, yb = next(iter(plain))
    assert np.mean((xb.numpy()[:, 0, 0, 2] > xb.numpy()[:, 0, 0, 0]) == (yb.numpy() == 1)) == 1.0


def test_images_without_a_detected_cell_keep_their_background():
    empty = np.full((32, 32, 3), (235, 200, 205), np.uint8)
    donor = _field(32, (170, 200, 230), (16, 16), 6)
    out = cell_views(tf.constant(empty, tf.float32), tf.zeros((32, 32), tf.uint8), tf.constant(donor, tf.float32),
                     tf.constant(white_cell_mask(donor), tf.uint8), tf.constant([0, 1], tf.int64),
                     _only(background=1.0, cell_crop=1.0)).numpy()
    np.testing.assert_array_equal(out, empty.astype(np.float32))


def test_cell_centred_crop_zooms_in_on_the_cell():
    img = _field(64, (235, 215, 215), (10, 50), 5)
    mask = white_cell_mask(img)
    for k in range(5):
        out = cell_centred_crop(tf.constant(img, tf.float32), tf.constant(mask, tf.float32),
                                tf.constant([k, 7], tf.int64)).numpy()
        assert out.shape == img.shape
        violet = np.abs(out - np.array(NUCLEUS, np.float32)).max(axis=-1) < 20
        # The crop is 0.4-0.7 of the side: the cell's area grows by 2x-6x and stays in view.
        assert 2.0 * (mask.mean() * 0.5) < violet.mean()
        rows, cols = np.nonzero(violet)
        assert rows.size and 0 < rows.mean() < 64 and 0 < cols.mean() < 64


def test_recipes_that_need_masks_refuse_to_run_without_them():
    x = np.zeros((4, 16, 16, 3), np.uint8)
    y = np.zeros(4, np.int32)
    assert RECIPES["cells"].needs_cells and not RECIPES["robust"].needs_cells
    with pytest.raises(UsageError, match="white-cell"):
        train_dataset(x, y, batch_size=2, seed=0, first_epoch=0, last_epoch=1, augment=RECIPES["cells"])
    with pytest.raises(UsageError, match="white-cell"):
        train_dataset(x, y, batch_size=2, seed=0, first_epoch=0, last_epoch=1, augment=RECIPES["cells"],
                      masks=np.zeros((4, 8, 8), np.uint8))
    with pytest.raises(UsageError):
        AugmentConfig(background=1.5)
    with pytest.raises(UsageError):
        AugmentConfig(cell_crop=-0.1)


def test_cells_pipeline_is_a_function_of_seed_and_epoch():
    rng = np.random.default_rng(2)
    x = np.stack([_field(32, (230, 200, 210), tuple(rng.integers(8, 24, 2)), 5) for _ in range(8)])
    masks = np.stack([white_cell_mask(im) for im in x]).astype(np.uint8)
    y = np.arange(8, dtype=np.int32) % 2
    run = lambda: [b.numpy() for b, _ in train_dataset(  # noqa: E731
        x, y, batch_size=4, seed=5, first_epoch=1, last_epoch=2, augment=RECIPES["cells"], masks=masks)]
    for a, b in zip(run(), run()):
        np.testing.assert_array_equal(a, b)


def test_training_with_the_cells_recipe_and_a_grayscale_colour_step(tmp_path, base_seed):
    """Masks come from the as-captured images even when the run feeds grayscale; the run records the recipe."""
    from test_train import make_toy

    manifest = make_toy(tmp_path / "toy", per_class=10)
    out = tmp_path / "run"
    trainer.train(trainer.TrainOptions(out=out, model="leuko-tiny", manifest=manifest, input_size=32, epochs=2,
                                       batch_size=8, seed=base_seed, evaluate=True, augment="cells",
                                       colour="grayscale"))
    config = read_json(RunDir(out).config_path)
    assert config["augmentation"]["recipe"] == "cells"
    assert config["augmentation"]["background"] == 0.5 and config["augmentation"]["cell_crop"] == 0.25
    assert config["colour"] == "grayscale"
    assert read_json(RunDir(out).history_path)["epochs_run"] == 2
    card = RunDir(out).model_card_md.read_text()
    assert "background swap between training images p 0.5, cell-centred crops p 0.25" in card


#: Background tints of the planted set (pink slide, bluish slide); the cells are the same for both.
PLANTED_TINTS = {"blue": (186, 206, 236), "pink": (236, 200, 206)}


def _planted_cell(rng: np.random.Generator, tint, size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """(image, disc): one hard-edged violet disc of random place and radius on a noisy flat ``tint``."""
    yy, xx = np.mgrid[:size, :size]
    cy, cx = rng.integers(9, size - 9, 2)
    disc = (yy - cy) ** 2 + (xx - cx) ** 2 < rng.uniform(4.0, 6.0) ** 2
    img = np.empty((size, size, 3))
    img[:] = tint
    img[disc] = NUCLEUS
    img += rng.normal(0, 4, img.shape)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), disc


def _tint_only_set(root, seed: int, per_class: int = 40, size: int = 32):
    """Two classes told apart ONLY by the slide's tint: every cell comes from one distribution.

    Images are drawn at the input size with hard edges (no resize, no blending), so each white-cell
    mask lies inside its disc: a swapped image keeps none of its own background.
    """
    from PIL import Image

    from leukoedge.data.records import Manifest, ManifestEntry
    from leukoedge.preprocess import PreprocessSpec, load_image

    rng = np.random.default_rng(seed)
    entries = []
    for label, tint in PLANTED_TINTS.items():
        (root / label).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img, disc = _planted_cell(rng, tint, size)
            mask = white_cell_mask(img)
            assert mask.any() and not (mask & ~disc).any()  # the swap will move the whole cell and only the cell
            Image.fromarray(img).save(root / f"{label}/{i:03d}.png")
            assert np.array_equal(load_image(root / f"{label}/{i:03d}.png", PreprocessSpec.square(size)), img)
            split = "train" if i < 0.6 * per_class else "val" if i < 0.8 * per_class else "test"
            entries.append(ManifestEntry(path=f"{label}/{i:03d}.png", label=label, order=i, split=split))
    return Manifest(root=str(root.resolve()), layout="toy", classes=tuple(sorted(PLANTED_TINTS)), split_kind="block",
                    seed=seed, entries=tuple(entries), params={})


def _tint_effect(model, seed: int, n: int = 40, size: int = 32) -> float:
    """Mean over ``n`` new cells, each drawn twice with the same noise, of P(blue | blue slide) - P(blue | pink slide).

    1 for a net that reads only the tint, 0 for one that ignores it. Unlike accuracy on images
    whose tint matches the class, it does not jump between 0 and 1 on a net that is only slightly
    tilted towards one tint (argmax of probabilities near 0.5 that all move together).
    """
    rng = np.random.default_rng(10_000 + seed)
    blue, pink = [], []
    for _ in range(n):
        state = rng.bit_generator.state
        blue.append(_planted_cell(rng, PLANTED_TINTS["blue"], size)[0])
        rng.bit_generator.state = state  # same cell, same noise, other slide
        pink.append(_planted_cell(rng, PLANTED_TINTS["pink"], size)[0])
    p_blue = lambda x: np.asarray(model(np.stack(x).astype(np.float32), training=False))[:, 0]  # noqa: E731
    return float(np.mean(p_blue(blue) - p_blue(pink)))


@pytest.mark.slow
def test_background_swap_takes_a_planted_background_shortcut_away(tmp_path, base_seed, monkeypatch,
                                                                   record_property):
    """The tint is the only signal. With every background swapped, the tint says the class only by chance
    in every batch, so a net cannot learn it (by construction, on any CPU); with the same recipe and no
    swap it does, so the set is learnable and the first figure is not vacuous.

    The recipes are ``default`` with ``background`` 1.0 and 0.0: the swap runs before colour
    augmentation, and the heavy colour jitter of ``robust`` (the base of ``background-swap``) only
    blurs the control (0.65-0.92 instead of 0.97-1.0), not the mechanism.
    Figures from ``last.keras``: the best-val-loss ``model.keras`` is chosen on a val split whose
    tint still says the class, so of a dozen nets that ignore the tint it keeps the one most tilted
    towards it by chance (up to 0.32 where ``last.keras`` had 0.04). Nor is accuracy on tint-matched
    images a fair coin per image for a net that ignores the tint: near-0.5 probabilities that all move
    with the tint make it jump (measured 0.33-0.66 on 80 images, seeds 0-4, binomial band 0.39-0.61).
    Measured, seeds 0-9 x oneDNN on/off (``LEUKOEDGE_TEST_SEED``): with the swap -0.12..0.17
    (sd 0.09), without it 0.97..1.00.
    """
    import keras

    manifest = _tint_only_set(tmp_path / "planted", base_seed)
    monkeypatch.setitem(RECIPES, "swap-always", replace(RECIPES["default"], background=1.0))
    effect = {}
    for aug in ("swap-always", "default"):
        out = tmp_path / aug
        trainer.train(trainer.TrainOptions(out=out, model="leuko-tiny", manifest=manifest, input_size=32, epochs=12,
                                           batch_size=8, seed=base_seed, evaluate=False, augment=aug))
        assert read_json(RunDir(out).config_path)["augmentation"]["background"] == RECIPES[aug].background
        effect[aug] = _tint_effect(keras.models.load_model(RunDir(out).last_model_path, compile=False), base_seed)
        record_property(f"tint_effect_{aug}", round(effect[aug], 4))
    print(f"tint effect (seed {base_seed}): {effect}")
    assert effect["default"] >= 0.8, effect  # the net learns the tint when nothing stops it
    assert abs(effect["swap-always"]) <= 0.35, effect  # ... and cannot when every background is swapped
