"""Mixup / CutMix (``train --mix``): the blends against their recorded shares, the loss, the pipeline, a real run."""
from __future__ import annotations

import json

import numpy as np
import pytest

keras = pytest.importorskip("keras")
tf = pytest.importorskip("tensorflow")

from conftest import training_seed  # noqa: E402
from leukoedge.cli import main  # noqa: E402
from leukoedge.errors import UsageError  # noqa: E402
from leukoedge.train.augment import recipe  # noqa: E402
from leukoedge.train.dataset import ImageCache, load_split, train_dataset  # noqa: E402
from leukoedge.train.mixing import MixedCrossEntropy, Mixer, check_mixing  # noqa: E402
from leukoedge.train.rundir import RunDir, read_json  # noqa: E402
from leukoedge.train.smoothing import SmoothedCrossEntropy  # noqa: E402
from leukoedge.train.trainer import TrainOptions, train  # noqa: E402
from test_train import make_toy  # noqa: E402

CLASS_WEIGHTS = {c: 0.5 + 0.25 * c for c in range(6)}


def _mix(method, images, labels, key=(7, 1), probability=1.0, alpha=None):
    mixer = Mixer.from_record(check_mixing(method, alpha, probability), CLASS_WEIGHTS)
    out, rows, weights = mixer(tf.constant(images, tf.float32), tf.constant(labels), tf.constant(key, tf.int64))
    return out.numpy(), rows.numpy(), weights.numpy()


def _one_per_class(seed=0, size=12):
    """Six images of random noise, one per class, so each target row names its partner."""
    rng = np.random.default_rng(seed)
    return rng.uniform(0, 255, (6, size, size, 3)).astype(np.float32), np.arange(6)


def _shares(rows, labels):
    """(own share lam, partner index) of every image, read from the target rows (labels are distinct)."""
    q = rows[:, 1:]
    lam = q[np.arange(len(labels)), labels]
    partner = np.array([np.argmax(np.where(np.arange(q.shape[1]) == y, -1, r)) if s < 1 else i
                        for i, (y, r, s) in enumerate(zip(labels, q, lam))])
    return lam, partner


@pytest.mark.parametrize("key", [(0, 0), (7, 1), (123, 45)])
def test_mixup_blends_pixels_labels_and_class_weights_in_one_share(key):
    x, y = _one_per_class()
    out, rows, weights = _mix("mixup", x, y, key, alpha=1.0)
    lam, partner = _shares(rows, y)
    assert np.all(partner != np.arange(6)), "an image is never paired with itself"
    np.testing.assert_allclose(rows[:, 1:].sum(1), 1.0, rtol=1e-6)
    for i in range(6):
        np.testing.assert_allclose(out[i], lam[i] * x[i] + (1 - lam[i]) * x[partner[i]], rtol=1e-5, atol=1e-3)
        assert weights[i] == pytest.approx(lam[i] * CLASS_WEIGHTS[i] + (1 - lam[i]) * CLASS_WEIGHTS[partner[i]])
        assert rows[i, 0] == (i if lam[i] >= 0.5 else partner[i])  # the major label
    # stateless: the same key mixes the same way, another key otherwise
    again = _mix("mixup", x, y, key, alpha=1.0)
    np.testing.assert_array_equal(again[0], out)
    assert not np.allclose(_mix("mixup", x, y, (key[0] + 1, key[1]), alpha=1.0)[1], rows)


@pytest.mark.parametrize("key", [(0, 0), (3, 9), (99, 2)])
def test_cutmix_pastes_one_rectangle_whose_area_is_the_recorded_share(key):
    x, y = _one_per_class(seed=key[0])
    out, rows, weights = _mix("cutmix", x, y, key)
    lam, partner = _shares(rows, y)
    for i in range(6):
        own = np.all(out[i] == x[i], axis=-1)
        pasted = np.all(out[i] == x[partner[i]], axis=-1)
        assert np.all(own | pasted), "every pixel comes from the image or its partner"
        assert own.mean() == pytest.approx(lam[i], abs=1e-6)
        rr, cc = np.nonzero(pasted & ~own)
        if len(rr):  # the pasted pixels fill their bounding box: one rectangle
            box = pasted[rr.min():rr.max() + 1, cc.min():cc.max() + 1]
            assert box.all()
        assert weights[i] == pytest.approx(lam[i] * CLASS_WEIGHTS[i] + (1 - lam[i]) * CLASS_WEIGHTS[partner[i]])


def test_the_probability_is_the_share_of_images_mixed():
    rng = np.random.default_rng(1)
    x = rng.uniform(0, 255, (400, 4, 4, 3)).astype(np.float32)
    y = np.arange(400) % 6  # partners of the same class still show in the pixels
    out, rows, _ = _mix("mixup", x, y, probability=0.5, alpha=1.0)
    unchanged = np.all(out == x, axis=(1, 2, 3))
    assert 0.4 < unchanged.mean() < 0.6
    one_hot = np.eye(6)[y]
    np.testing.assert_array_equal(rows[unchanged, 1:], one_hot[unchanged])
    assert np.all(rows[unchanged, 0] == y[unchanged])
    assert _mix("mixup", x, y, probability=1.0, alpha=1.0)[0].tolist() != x.tolist()


def test_the_loss_is_the_cross_entropy_to_the_blended_and_smoothed_target():
    rng = np.random.default_rng(0)
    z = rng.normal(0, 2, (5, 4))
    p = (np.exp(z) / np.exp(z).sum(-1, keepdims=True)).astype("float32")
    q = rng.dirichlet(np.ones(4), 5).astype("float32")
    rows = np.concatenate([q.argmax(1)[:, None].astype("float32"), q], 1)
    for eps in (0.0, 0.1):
        target = (1 - eps) * q + eps / 4
        got = keras.ops.convert_to_numpy(MixedCrossEntropy(eps, reduction=None)(rows, p))
        np.testing.assert_allclose(got, -(target * np.log(p)).sum(-1), rtol=1e-5)
        labels = np.array([0, 3, 1, 2, 0])  # validation: plain labels, the same as the smoothed loss
        np.testing.assert_allclose(keras.ops.convert_to_numpy(MixedCrossEntropy(eps, reduction=None)(labels, p)),
                                   keras.ops.convert_to_numpy(SmoothedCrossEntropy(eps, reduction=None)(labels, p)),
                                   rtol=1e-6)
    assert MixedCrossEntropy.from_config(MixedCrossEntropy(0.1).get_config()).epsilon == 0.1


@pytest.mark.parametrize("kw, match", [
    ({"mix": "blend"}, "must be one of"), ({"mix": "mixup", "mix_alpha": 0.0}, "--mix-alpha"),
    ({"mix": "cutmix", "mix_prob": 0.0}, "--mix-prob"), ({"mix": "cutmix", "mix_prob": 1.5}, "--mix-prob"),
    ({"mix": "mixup", "teachers": ("somewhere",)}, "cannot be combined"),
    ({"mix": "mixup", "consistency": 5.0}, "cannot be combined"),
    ({"mix_alpha": 0.4}, "need --mix"),
])
def test_bad_mixing_options_are_refused(kw, match, tmp_path):
    with pytest.raises(UsageError, match=match):
        TrainOptions(out=tmp_path / "x", model="leuko-tiny", manifest=object(), **kw)
    assert not (tmp_path / "x").exists()


def test_the_pipeline_yields_mixed_batches_and_a_resumed_epoch_mixes_the_same_pairs():
    rng = np.random.default_rng(2)
    x = rng.integers(0, 256, (20, 16, 16, 3), dtype=np.uint8)
    y = np.arange(20) % 4
    mixer = Mixer.from_record(check_mixing("cutmix", None, 1.0), {c: 1.0 + c for c in range(4)})
    args = dict(batch_size=8, seed=3, last_epoch=3, augment=recipe("default"), mixer=mixer)
    full = list(train_dataset(x, y, first_epoch=0, **args))
    resumed = list(train_dataset(x, y, first_epoch=1, **args))
    assert len(full) == 9 and len(resumed) == 6  # ceil(20 / 8) batches per epoch
    images, rows, weights = full[0]
    assert images.shape == (8, 16, 16, 3) and rows.shape == (8, 5) and weights.shape == (8,)
    for a, b in zip(full[3:], resumed):
        for got, want in zip(a, b):
            np.testing.assert_array_equal(got.numpy(), want.numpy())
    with pytest.raises(UsageError, match="paired"):
        train_dataset(x, y, first_epoch=0, paired=True, **args)


@pytest.mark.slow
def test_a_mixed_run_validates_unmixed_records_the_blend_and_refuses_another_on_resume(tmp_path, capsys):
    toy = make_toy(tmp_path / "toy", per_class=8, seed=training_seed())
    toy.save(tmp_path / "manifest.json")
    out = tmp_path / "run"
    rc = main(["train", "--data", str(toy.root), "--manifest", str(tmp_path / "manifest.json"), "--model", "leuko-tiny", "--input-size", "32", "--epochs", "1",
               "--batch", "8", "--seed", str(training_seed(6)), "--no-audit", "--mix", "cutmix", "--mix-prob", "0.75",
               "--out", str(out)])
    assert rc == 0
    config = read_json(out / "config.json")
    assert config["extra"]["mixing"] == {"method": "cutmix", "alpha": 1.0, "probability": 0.75}
    assert "cutmix blends (alpha 1, 75 % of the training images" in config["extra"]["loss"]
    assert "cutmix blends" in (out / "model_card.md").read_text()
    history = read_json(out / "history.json")["history"]
    assert np.isfinite(history["loss"][0]) and 0.0 <= history["accuracy"][0] <= 1.0
    # validation is never mixed: the recorded val_loss is the plain cross-entropy of the kept model on val
    model = keras.models.load_model(out / "model.keras", compile=False)
    manifest = RunDir(out).manifest()
    xv, yv, _ = load_split(manifest, "val", RunDir(out).config().preprocess_spec, ImageCache())
    p = np.clip(model.predict(xv.astype("float32"), batch_size=64, verbose=0).astype(np.float64), 1e-7, 1.0)
    assert history["val_loss"][0] == pytest.approx(float(np.mean(-np.log(p[np.arange(len(yv)), yv]))), rel=1e-3)
    capsys.readouterr()
    assert main(["train", "--model", "leuko-tiny", "--out", str(out), "--resume", "--mix", "mixup"]) == 2
    assert "mix=mixup (run has cutmix)" in capsys.readouterr().err
    assert json.loads((out / "config.json").read_text()) == config


@pytest.mark.slow
def test_mixing_trains_under_mirrored_strategy(tmp_path):
    """The (images, rows, weights) batches split across 2 logical CPUs, as over 2 GPUs."""
    from test_train import train_on_two_logical_cpus

    toy = make_toy(tmp_path / "toy", per_class=8, seed=training_seed())
    run = train_on_two_logical_cpus(toy, tmp_path, batch_size=8, seed=training_seed(7), mix="mixup", mix_prob=1.0)
    config = read_json(run / "config.json")
    assert config["extra"]["devices"] == "MirroredStrategy over 2 CPU device(s)"
    assert config["extra"]["mixing"]["method"] == "mixup"
    assert np.isfinite(read_json(run / "history.json")["history"]["loss"][0])
