"""The colour step of the ONE preprocessing path, and the colour-robust augmentation.

Why these matter (issue 7): a colour step trained with must be applied by the
device too, byte for byte, or the int8 model sees other pixels than it was
validated on. So the step travels in the run config and the bundle spec, and
the runtime applies it through ``leukoedge.preprocess``.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from leukoedge import stain
from leukoedge.errors import UsageError
from leukoedge.preprocess import COLOUR_STEPS, PreprocessSpec, apply_colour, load_image, prepare
from leukoedge.train.augment import RECIPES, AugmentConfig, augment_image


def _smear(tint=(0, 0, 0), seed=0, size=(90, 70)):
    """A pale field with a purple nucleus; ``tint`` shifts the whole slide's colour."""
    rng = np.random.default_rng(seed)
    h, w = size
    yy, xx = np.mgrid[:h, :w]
    img = np.zeros((h, w, 3)) + (232, 214, 226) + np.asarray(tint, float)
    img[(yy - h // 2) ** 2 + (xx - w // 2) ** 2 < 15**2] = np.asarray((115, 60, 160)) + np.asarray(tint, float)
    img += rng.normal(0, 4, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def test_spec_carries_the_colour_step_and_old_specs_mean_as_captured():
    spec = PreprocessSpec.square(48, "reinhard")
    assert PreprocessSpec.from_dict(spec.to_dict()) == spec
    old = {k: v for k, v in spec.to_dict().items() if k != "colour"}
    assert PreprocessSpec.from_dict(old).colour == "as-captured"
    assert spec.geometry_only() == PreprocessSpec.square(48)
    with pytest.raises(UsageError, match="unknown colour step"):
        PreprocessSpec.square(48, "sepia")


@pytest.mark.parametrize("colour", sorted(COLOUR_STEPS))
def test_load_image_and_prepare_apply_the_same_colour_step(tmp_path, colour):
    img = _smear()
    path = tmp_path / "field.png"
    Image.fromarray(img).save(path)
    spec = PreprocessSpec.square(40, colour)
    from_file, from_frame = load_image(path, spec), prepare(img, spec)
    np.testing.assert_array_equal(from_file, from_frame)
    np.testing.assert_array_equal(from_frame, apply_colour(prepare(img, spec.geometry_only()), spec))
    assert from_frame.dtype == np.uint8 and from_frame.shape == (40, 40, 3)


def test_grayscale_step_removes_colour_and_normalisation_removes_slide_differences():
    pink, blue = _smear((12, -6, -10)), _smear((-14, -4, 12))
    gray = prepare(pink, PreprocessSpec.square(40, "grayscale"))
    assert np.array_equal(gray[..., 0], gray[..., 1]) and np.array_equal(gray[..., 1], gray[..., 2])

    def gap(a, b, spec):
        return np.abs(prepare(a, spec).astype(float).mean((0, 1)) - prepare(b, spec).astype(float).mean((0, 1))).max()

    # Reinhard: a colour cast of the whole slide (lamp, white balance).
    assert gap(pink, blue, PreprocessSpec.square(40, "reinhard")) < gap(pink, blue, PreprocessSpec.square(40)) / 3
    # Macenko: a stronger stain (every optical density x 1.5), what a new stain batch does.
    base = _smear()
    strong = stain.od_to_rgb(stain.rgb_to_od(base) * 1.5)
    assert gap(base, strong, PreprocessSpec.square(40, "macenko")) < gap(base, strong, PreprocessSpec.square(40)) / 5


def test_robust_recipe_is_recorded_and_validated():
    cfg = RECIPES["robust"]
    assert cfg.hed > 0 and 0 < cfg.grayscale < 1 and cfg.to_dict()["grayscale"] == cfg.grayscale
    with pytest.raises(UsageError):
        AugmentConfig(grayscale=1.5)
    with pytest.raises(UsageError):
        AugmentConfig(hed=-0.1)


def test_hed_and_grayscale_augmentation_in_tf_data():
    import tensorflow as tf

    img = tf.constant(_smear(size=(24, 24)).astype("float32"))
    seed = tf.constant([4, 5], tf.int64)
    always_gray = AugmentConfig(flip=False, rot90=False, rotation_deg=0, shift=0, zoom=0, shear_deg=0, brightness=0,
                                contrast=0, hue=0, stain=0, grayscale=1.0)
    out = augment_image(img, seed, always_gray).numpy()
    np.testing.assert_allclose(out[..., 0], out[..., 2], atol=1e-3)
    expected = stain.grayscale(img.numpy().astype(np.uint8))[..., 0]
    assert np.abs(out[..., 0] - expected).max() <= 1.0
    hed_only = AugmentConfig(flip=False, rot90=False, rotation_deg=0, shift=0, zoom=0, shear_deg=0, brightness=0,
                             contrast=0, hue=0, stain=0, hed=0.2)
    a, b = augment_image(img, seed, hed_only).numpy(), augment_image(img, seed, hed_only).numpy()
    np.testing.assert_array_equal(a, b)
    assert a.min() >= 0 and a.max() <= 255 and not np.allclose(a, img.numpy(), atol=2)
    # The TF twin follows stain.hed_jitter's formula: with strength 0 it is the identity.
    no_jitter = AugmentConfig(flip=False, rot90=False, rotation_deg=0, shift=0, zoom=0, shear_deg=0, brightness=0,
                              contrast=0, hue=0, stain=0, hed=1e-9)
    np.testing.assert_allclose(augment_image(img, seed, no_jitter).numpy(), img.numpy(), atol=0.05)


@pytest.mark.slow
def test_colour_step_travels_from_training_to_the_bundle_and_the_device(tmp_path):
    """Train with --colour grayscale, convert, and classify: the device feeds the model gray pixels."""
    from leukoedge.bundle import load_bundle
    from leukoedge.convert.options import ConvertOptions
    from leukoedge.convert.pipeline import convert_run
    from leukoedge.runtime import Classifier
    from leukoedge.train.rundir import RunDir
    from leukoedge.train.trainer import TrainOptions, train

    from leukoedge.data.records import Manifest

    from bundle_factory import CLASSES, write_images

    data = tmp_path / "data"
    entries = write_images(data, n=120, seed=1)
    manifest = Manifest(root=str(data.resolve()), layout="class_folders", classes=CLASSES, split_kind="block",
                        seed=1, entries=tuple(entries), params={})
    run = tmp_path / "run"
    train(TrainOptions(out=run, model="leuko-tiny", manifest=manifest, input_size=32, epochs=2, batch_size=16,
                       colour="grayscale", evaluate=False))
    config = json.loads((run / "config.json").read_text())
    assert config["colour"] == "grayscale"
    assert RunDir(run).config().preprocess_spec.colour == "grayscale"

    out = tmp_path / "bundle"
    convert_run(ConvertOptions(run_dir=run, out=out, quantize="none", min_agreement=0.0, max_drop=100.0))
    bundle = load_bundle(out)
    assert bundle.spec.colour == "grayscale"
    clf = Classifier(out)
    colourful = _smear((30, -20, 20), seed=3, size=(32, 32))  # input size: no resize rounding
    gray = stain.grayscale(colourful)
    a, b = clf.classify(colourful, heatmap=False), clf.classify(gray, heatmap=False)
    assert a.probabilities == pytest.approx(b.probabilities, abs=1e-6)
    # ...and the colour of the input did matter before the step (else this test proves nothing).
    assert not np.array_equal(prepare(colourful, bundle.spec.geometry_only()), prepare(gray, bundle.spec.geometry_only()))
