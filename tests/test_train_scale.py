"""The training scale (issue 15): recorded in the run, the card and the bundle; scale jitter in tf.data.

One real (1-epoch, 32 px) training through ``leukoedge train --um-per-px`` and
three real conversions of it (as trained; as an "old" run without the scale
fields; that old run with ``convert --um-per-px``). The jitter is tested as a
mechanism on an image with a known disc, not as a learned outcome.
"""
from __future__ import annotations

import json
import logging
import math
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

keras = pytest.importorskip("keras")

from conftest import training_seed  # noqa: E402

from leukoedge import cli  # noqa: E402
from leukoedge.bundle import load_bundle  # noqa: E402
from leukoedge.convert.pixel_size import bundle_scale  # noqa: E402
from leukoedge.errors import UsageError  # noqa: E402
from leukoedge.train.augment import (  # noqa: E402
    RECIPES,
    AugmentConfig,
    augment_image,
    recipe,
    run_recipe,
)
from leukoedge.train.consistency import colour_only, geometry_only  # noqa: E402
from leukoedge.train.rundir import RunConfig, RunDir, read_json  # noqa: E402
from leukoedge.train.training_scale import card_markdown, card_section, median_size  # noqa: E402

UM = 0.5          # the --um-per-px of the one training
SOURCE = 48       # synthetic fields are stored at 48 x 48 px, trained at 32 x 32
BG = np.array([232.0, 212.0, 222.0], np.float32)
DISC = np.array([70.0, 30.0, 110.0], np.float32)


# ---------------------------------------------------------------- scale jitter (mechanism)
def disc_image(size: int = 64, radius: float = 12.0) -> np.ndarray:
    """A flat background with one dark centred disc of ``radius`` px (float32 0..255)."""
    yy, xx = np.mgrid[:size, :size]
    inside = np.hypot(yy - (size - 1) / 2, xx - (size - 1) / 2) < radius
    return np.where(inside[..., None], DISC, BG).astype(np.float32)


def disc_radius(img: np.ndarray) -> float:
    """Radius from the disc's area, each pixel counted by how far it lies from the background to the disc colour.

    Bilinear resampling is linear, so this sub-pixel area scales with the zoom squared.
    """
    d = DISC - BG
    share = np.clip(((img - BG) @ d) / (d @ d), 0.0, 1.0)
    return math.sqrt(share.sum() / math.pi)


def test_scale_jitter_zooms_a_known_disc_within_the_range_seeded_and_background_filled():
    import tensorflow as tf

    img = disc_image()
    r0 = disc_radius(img)
    cfg = recipe("none", 0.15)
    assert cfg.enabled and cfg.scale_jitter == 0.15
    ratios = []
    for k in range(40):
        seed = tf.constant([k, 7], tf.int64)
        out = augment_image(tf.constant(img), seed, cfg).numpy()
        np.testing.assert_array_equal(out, augment_image(tf.constant(img), seed, cfg).numpy())  # seeded
        ratios.append(disc_radius(out) / r0)
        # The margin of a zoomed-out image is the background colour (not a mirrored disc).
        np.testing.assert_allclose(out[0, 0], BG, atol=1.0)
        np.testing.assert_allclose(out[-1, -1], BG, atol=1.0)
    ratios = np.array(ratios)
    assert ratios.min() >= 0.85 - 0.02 and ratios.max() <= 1.15 + 0.02, ratios
    assert ratios.min() < 0.92 and ratios.max() > 1.08, ratios  # both zoom in and zoom out are drawn
    assert len(np.unique(np.round(ratios, 3))) > 30  # a continuous factor, not a few fixed zooms
    # A different seed draws a different zoom; without jitter the image is untouched.
    assert not np.array_equal(augment_image(tf.constant(img), tf.constant([0, 7], tf.int64), cfg).numpy(),
                              augment_image(tf.constant(img), tf.constant([1, 7], tf.int64), cfg).numpy())
    np.testing.assert_allclose(augment_image(tf.constant(img), tf.constant([0, 7], tf.int64),
                                             RECIPES["none"]).numpy(), img, atol=1e-3)


def test_scale_jitter_is_off_by_default_and_travels_with_the_run_config():
    assert AugmentConfig().scale_jitter == 0 and all(r.scale_jitter == 0 for r in RECIPES.values())
    assert recipe("robust") is RECIPES["robust"]
    assert run_recipe({"recipe": "robust"}) == RECIPES["robust"]  # runs made before the field
    assert run_recipe({"recipe": "robust", "scale_jitter": 0.15}) == replace(RECIPES["robust"], scale_jitter=0.15)
    # Paired consistency views share one geometry, scale jitter included: the colour view has none.
    cfg = recipe("robust", 0.15)
    assert geometry_only(cfg).scale_jitter == 0.15 and colour_only(cfg).scale_jitter == 0
    for bad in (-0.1, 0.5, float("nan")):
        with pytest.raises(UsageError, match="--scale-jitter"):
            recipe("none", bad)


def test_train_dataset_with_scale_jitter_is_a_function_of_seed_and_epoch():
    from leukoedge.train.dataset import train_dataset

    x = np.stack([disc_image(24, 5.0).astype(np.uint8)] * 6)
    y = np.arange(6, dtype=np.int32) % 2
    cfg = recipe("none", 0.2)
    a = [b[0].numpy() for b in train_dataset(x, y, batch_size=3, seed=4, first_epoch=0, last_epoch=2, augment=cfg)]
    b = [b[0].numpy() for b in train_dataset(x, y, batch_size=3, seed=4, first_epoch=1, last_epoch=2, augment=cfg)]
    np.testing.assert_array_equal(a[2], b[0])  # a resumed epoch sees the same zooms
    plain = [b[0].numpy() for b in train_dataset(x, y, batch_size=3, seed=4, first_epoch=0, last_epoch=1,
                                                 augment=RECIPES["none"])]
    assert not np.array_equal(a[0], plain[0])


# ---------------------------------------------------------------- pure records
def test_old_run_config_has_no_scale_and_a_given_one_fills_the_spec():
    old = {"model": "leuko-tiny", "input_size": 32, "classes": ["a", "b"], "seed": 0, "epochs": 1, "batch_size": 8,
           "learning_rate": 0.001, "augmentation": {"recipe": "none"}}
    config = RunConfig.from_dict(old)
    assert config.scale == {} and config.scale_jitter == 0.0
    assert config.preprocess_spec.um_per_px is None and config.preprocess_spec.field_um is None
    given = RunConfig.from_dict({**old, "scale": {"um_per_px": 0.4, "source": "given", "source_size": [300, 400]}})
    spec = given.preprocess_spec
    assert spec.um_per_px == 0.4 and spec.field_um == pytest.approx((120.0, 160.0))
    assert spec.input_um_per_px == pytest.approx((120 / 32, 160 / 32))


def test_card_section_says_what_the_scale_means_for_the_device():
    spec = RunConfig(model="m", input_size=32, classes=("a", "b"), seed=0, epochs=1, batch_size=1,
                     learning_rate=0.1, scale={"um_per_px": 0.5, "source": "given", "source_size": [48, 48]}
                     ).preprocess_spec
    known = card_section({"um_per_px": 0.5, "source": "given", "source_size": [48, 48]}, spec, 0.15)
    text = "\n".join(card_markdown(known))
    assert "0.5 um/px" in text and "--um-per-px" in text and "24.0 x 24.0 um" in text
    assert "captures are brought to 0.5 um/px and tiled" in text and "[0.85, 1.15]" in text
    unknown = card_section({"um_per_px": None, "source": "unknown", "reason": "no red cells"},
                           replace(spec, um_per_px=None, field_um=None), 0.0)
    text = "\n".join(card_markdown(unknown))
    assert "unknown" in text and "no red cells" in text and "stretches the whole frame" in text
    assert "leukoedge convert RUN_DIR --um-per-px X" in text and "scale jitter in training: off" in text
    assert "not recorded" in "\n".join(card_markdown(card_section({}, replace(spec, um_per_px=None, field_um=None))))


def test_override_of_a_recorded_scale_warns_beyond_ten_percent(tmp_path, caplog):
    from leukoedge.data.records import Manifest, ManifestEntry

    Image.new("RGB", (60, 40), (230, 210, 220)).save(tmp_path / "a.png")
    manifest = Manifest(root=str(tmp_path), layout="flat", classes=("a", "b"), split_kind="block", seed=0,
                        entries=(ManifestEntry(path="a.png", label="a", order=0, split="train"),))
    base = {"model": "m", "input_size": 32, "classes": ("a", "b"), "seed": 0, "epochs": 1, "batch_size": 1,
            "learning_rate": 0.1}
    measured = RunConfig(**base, scale={"um_per_px": 0.5, "source": "measured", "source_size": [48, 48]})
    with caplog.at_level(logging.WARNING, logger="leukoedge.convert.pixel_size"):
        spec, scale = bundle_scale(measured, manifest, 0.52)
    assert not caplog.records and spec.um_per_px == 0.52 and spec.field_um == pytest.approx((0.52 * 48,) * 2)
    assert scale["source"] == "conversion" and scale["replaced"] == 0.5
    with caplog.at_level(logging.WARNING, logger="leukoedge.convert.pixel_size"):
        bundle_scale(measured, manifest, 0.6)
    assert "+20 %" in caplog.text and "measured" in caplog.text
    # An old run: no recorded size, so the field comes from the train split's image headers (h, w).
    spec, scale = bundle_scale(RunConfig(**base), manifest, 0.25)
    assert scale["source_size"] == [40, 60] and spec.field_um == pytest.approx((10.0, 15.0))
    spec, scale = bundle_scale(RunConfig(**base), manifest, None)
    assert spec.um_per_px is None and scale["source"] == "not recorded"
    with pytest.raises(UsageError, match="--um-per-px"):
        bundle_scale(RunConfig(**base), manifest, -1.0)


def test_median_size_reads_headers_and_exif_orientation(tmp_path):
    Image.new("RGB", (30, 20)).save(tmp_path / "a.png")
    Image.new("RGB", (50, 40)).save(tmp_path / "b.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees on display
    Image.new("RGB", (40, 30)).save(tmp_path / "c.jpg", exif=exif)
    (tmp_path / "d.png").write_bytes(b"not an image")
    # (h, w): a 20x30, b 40x50, c 40x30 upright (30x40 stored); unoriented it would be [30, 40]
    assert median_size([tmp_path / n for n in ("a.png", "b.png", "c.jpg", "d.png")]) == [40, 30]
    assert median_size([tmp_path / "d.png"]) is None


def test_options_are_checked_and_resume_refuses_a_different_scale():
    from leukoedge.train import trainer

    for kw in ({"um_per_px": -0.3}, {"um_per_px": float("nan")}, {"rbc_um": 0.1}, {"scale_jitter": 0.6},
               {"um_per_px": 0.3, "rbc_um": 7.0}):
        with pytest.raises(UsageError):
            trainer.TrainOptions(out=Path("x"), model="leuko-tiny", resume=True, **kw)
    config = RunConfig(model="leuko-tiny", input_size=32, classes=("a", "b"), seed=0, epochs=1, batch_size=1,
                       learning_rate=0.1, augmentation={"recipe": "none", "scale_jitter": 0.1},
                       scale={"um_per_px": 0.5, "source": "given"})
    trainer._check_resume(trainer.TrainOptions(out=Path("x"), model="leuko-tiny", resume=True, um_per_px=0.5,
                                               scale_jitter=0.1), config)
    with pytest.raises(UsageError, match="um_per_px=0.6"):
        trainer._check_resume(trainer.TrainOptions(out=Path("x"), model="leuko-tiny", resume=True, um_per_px=0.6),
                              config)
    with pytest.raises(UsageError, match="scale_jitter=0"):
        trainer._check_resume(trainer.TrainOptions(out=Path("x"), model="leuko-tiny", resume=True, scale_jitter=0.0),
                              config)


def test_cross_validation_passes_the_scale_options_to_every_fold():
    from leukoedge.train import folds, trainer

    assert {"um_per_px", "rbc_um", "scale_jitter"} <= set(folds.SAVED_OPTIONS) & set(folds.FIXED_ON_RESUME)
    opts = trainer.TrainOptions(out=Path("x"), model="leuko-tiny", resume=True)
    fold = folds._fold_options(opts, {"um_per_px": 0.4, "scale_jitter": 0.1, "rbc_um": None})
    assert fold.um_per_px == 0.4 and fold.scale_jitter == 0.1


def _train_cli(argv):
    import argparse

    from leukoedge.train import cli as train_cli

    parser = argparse.ArgumentParser()
    train_cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["train", *map(str, argv)])
    return args.func(args)


def test_train_cli_refuses_contradicting_scale_options(tmp_path):
    with pytest.raises(UsageError, match="--scale-jitter"):
        _train_cli(["--data", tmp_path, "--model", "leuko-tiny", "--out", tmp_path / "r", "--no-augment",
                    "--scale-jitter", 0.1])


# ---------------------------------------------------------------- one real training + conversions
@pytest.fixture(scope="module")
def given_run(tmp_path_factory) -> Path:
    """`leukoedge train --um-per-px 0.5 --scale-jitter 0.1`: 1 epoch of leuko-tiny on 48 synthetic 48 px fields."""
    from leukoedge.data.synth import generate

    tmp = tmp_path_factory.mktemp("scale-run")
    generate(tmp / "synth", 48, size=SOURCE, seed=training_seed())
    out = tmp / "run"
    assert _train_cli(["--data", tmp / "synth", "--model", "leuko-tiny", "--input-size", 32, "--epochs", 1,
                       "--batch", 16, "--augment", "none", "--scale-jitter", 0.1, "--um-per-px", UM, "--no-audit",
                       "--seed", training_seed(), "--out", out]) == 0
    return out


@pytest.fixture
def convert_cli(monkeypatch):
    monkeypatch.setattr(cli, "COMMAND_MODULES", (("convert", "leukoedge.convert.cli"),))
    return lambda *argv: cli.main(["convert", *map(str, argv)])


@pytest.mark.slow
def test_given_scale_is_in_the_run_the_card_and_the_bundle(given_run, tmp_path, convert_cli, capsys):
    config = read_json(RunDir(given_run).config_path)
    assert config["scale"] == {"um_per_px": UM, "source": "given", "source_size": [SOURCE, SOURCE],
                               "n_images": config["scale"]["n_images"]}
    assert config["scale"]["n_images"] > 20 and config["augmentation"]["scale_jitter"] == 0.1
    card = read_json(RunDir(given_run).model_card_json)
    assert card["scale"]["um_per_px"] == UM and card["scale"]["source"] == "given"
    assert card["scale"]["field_um"] == [UM * SOURCE] * 2 and card["scale"]["scale_jitter"] == 0.1
    assert card["input"]["preprocessing"]["um_per_px"] == UM
    md = RunDir(given_run).model_card_md.read_text()
    assert "## Scale" in md and "0.5 um/px (given with `--um-per-px` at training)" in md
    assert "scale jitter +-10 %" in md and "brought to 0.5 um/px and tiled" in md
    # The exported model holds no augmentation: the jitter lives in tf.data only.
    model = keras.models.load_model(given_run / "model.keras", compile=False)
    assert not [layer.name for layer in model.layers if "random" in type(layer).__name__.lower()]

    out = tmp_path / "bundle"
    assert convert_cli(given_run, "--quantize", "dynamic", "--out", out) == 0
    assert f"scale: {UM:g} um/px" in capsys.readouterr().out
    meta = json.loads((out / "bundle.json").read_text())
    assert meta["preprocessing"]["um_per_px"] == UM and meta["preprocessing"]["field_um"] == [UM * SOURCE] * 2
    assert meta["scale"]["source"] == "given" and meta["scale"]["training"]["source_size"] == [SOURCE, SOURCE]
    bundle = load_bundle(out)
    assert bundle.spec.um_per_px == UM and bundle.spec.input_um_per_px == pytest.approx((UM * SOURCE / 32,) * 2)
    assert "- scale: 0.5 um/px" in (out / "model_card.md").read_text()


@pytest.mark.slow
def test_old_run_converts_without_a_scale_and_convert_um_per_px_adds_it(given_run, tmp_path, convert_cli, capsys):
    old = tmp_path / "old-run"
    shutil.copytree(given_run, old)
    config = read_json(old / "config.json")
    del config["scale"]
    del config["augmentation"]["scale_jitter"]
    (old / "config.json").write_text(json.dumps(config))
    (old / "model_card.json").unlink()
    (old / "model_card.md").write_text("# Model card: old run\n\nResearch use only.\n")

    out = tmp_path / "bundle"
    assert convert_cli(old, "--quantize", "dynamic", "--out", out) == 0
    assert "scale: unknown" in capsys.readouterr().out
    meta = json.loads((out / "bundle.json").read_text())
    assert meta["preprocessing"]["um_per_px"] is None and meta["preprocessing"]["field_um"] is None
    assert load_bundle(out).spec.um_per_px is None
    assert "scale: unknown" in (out / "model_card.md").read_text()

    assert convert_cli(old, "--quantize", "dynamic", "--um-per-px", 0.4, "--force", "--out", out) == 0
    meta = json.loads((out / "bundle.json").read_text())
    assert meta["preprocessing"]["um_per_px"] == 0.4
    assert meta["preprocessing"]["field_um"] == pytest.approx([0.4 * SOURCE] * 2)  # size from the image headers
    assert meta["scale"]["source"] == "conversion" and meta["scale"]["replaced"] is None
    card = json.loads((out / "model_card.json").read_text())
    assert card["scale"]["um_per_px"] == 0.4 and "convert --um-per-px" in card["scale"]["how"]
    assert load_bundle(out).spec.field_um == pytest.approx((0.4 * SOURCE,) * 2)


# ---------------------------------------------------------------- measured scale (leukoedge.scale)
def _synth_fields(tmp_path: Path, n: int = 6, size: int = 224) -> list[Path]:
    from leukoedge.data.synth import generate

    return sorted(generate(tmp_path / "synth", n, size=size, seed=training_seed()))


def test_measured_scale_follows_the_magnification(tmp_path):
    from leukoedge.train.training_scale import training_scale

    paths = _synth_fields(tmp_path)
    base = training_scale(paths)
    assert base["source"] == "measured" and base["um_per_px"] > 0 and base["failed"] == 0
    assert base["measured"] == len(paths) == base["n_images"] and base["source_size"] == [224, 224]
    # The same fields stored at 1.5x: the measured um/px is 1/1.5 of it (issue goal: within 5 %).
    zoomed = []
    for p in paths:
        q = tmp_path / "zoomed" / p.name
        q.parent.mkdir(exist_ok=True)
        Image.open(p).resize((336, 336), Image.Resampling.BICUBIC).save(q.with_suffix(".png"))
        zoomed.append(q.with_suffix(".png"))
    z = training_scale(zoomed)
    assert z["um_per_px"] == pytest.approx(base["um_per_px"] / 1.5, rel=0.05)
    assert z["source_size"] == [336, 336]
    # --rbc-um scales the answer: the same pixels, cells assumed 8 um instead of 7.5.
    assert training_scale(paths, rbc_um=8.0)["um_per_px"] == pytest.approx(base["um_per_px"] * 8 / 7.5, rel=1e-6)


def test_failed_measurement_is_a_warning_and_an_unknown_scale(tmp_path, caplog):
    from leukoedge.train.training_scale import training_scale

    rng = np.random.default_rng(0)
    paths = []
    for i in range(4):  # no red cells: flat pale fields with noise
        arr = np.clip(225 + rng.normal(0, 3, (64, 64, 3)), 0, 255).astype(np.uint8)
        paths.append(tmp_path / f"blank-{i}.png")
        Image.fromarray(arr).save(paths[-1])
    with caplog.at_level(logging.WARNING, logger="leukoedge.train.training_scale"):
        record = training_scale(paths)
    assert record["source"] == "unknown" and record["um_per_px"] is None and record["reason"]
    assert "training scale unknown" in caplog.text and "--um-per-px" in caplog.text


def test_a_new_run_measures_the_training_split(tmp_path):
    """The trainer wires the measurement to the TRAINING split (no training: only the run is opened)."""
    from leukoedge.data.split import make_manifest
    from leukoedge.data.synth import generate
    from leukoedge.train import trainer

    generate(tmp_path / "synth", 16, size=160, seed=training_seed())
    manifest = make_manifest(tmp_path / "synth", by="auto", seed=0)
    opts = trainer.TrainOptions(out=tmp_path / "run", model="leuko-tiny", manifest=manifest, input_size=32,
                                epochs=1, evaluate=False)
    config, _, _ = trainer._open_run(opts, RunDir(opts.out))
    assert config.scale["source"] == "measured" and config.scale["n_images"] == len(manifest.subset("train"))
    assert config.preprocess_spec.um_per_px == config.scale["um_per_px"]
    assert config.preprocess_spec.field_um == pytest.approx((config.scale["um_per_px"] * 160,) * 2)
