"""Colour-consistency training: the paired loss, the paired pipeline, and a real run with it."""
from __future__ import annotations

import json

import numpy as np
import pytest

keras = pytest.importorskip("keras")

from leukoedge.errors import UsageError  # noqa: E402
from leukoedge.train import trainer  # noqa: E402
from leukoedge.train.augment import RECIPES  # noqa: E402
from leukoedge.train.consistency import PairedConsistencyLoss, check_replicas  # noqa: E402
from leukoedge.train.dataset import eval_dataset, train_dataset  # noqa: E402
from leukoedge.train.rundir import RunDir, read_json  # noqa: E402
from leukoedge.train.trainer import TrainOptions, train  # noqa: E402

from conftest import training_seed  # noqa: E402
from test_train import make_toy, train_on_two_logical_cpus  # noqa: E402


def _js(p: np.ndarray, q: np.ndarray) -> float:
    m = (p + q) / 2
    return float(0.5 * np.sum(p * np.log(p / m)) + 0.5 * np.sum(q * np.log(q / m)))


def test_loss_is_cross_entropy_plus_weighted_js_per_pair():
    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6], [0.5, 0.25, 0.25], [0.5, 0.25, 0.25]], np.float32)
    labels = np.array([0, 0, 1, 1])
    loss = PairedConsistencyLoss(weight=4.0, reduction=None)
    got = keras.ops.convert_to_numpy(loss(labels, probs))
    ce = -np.log(probs[np.arange(4), labels])
    js0 = _js(probs[0].astype(np.float64), probs[1].astype(np.float64))
    expected = ce + 4.0 * np.array([js0, js0, 0.0, 0.0])
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    # identical views: exactly the plain cross-entropy
    plain = keras.losses.SparseCategoricalCrossentropy(reduction=None)(labels[2:], probs[2:])
    np.testing.assert_allclose(keras.ops.convert_to_numpy(loss(labels[2:], probs[2:])),
                               keras.ops.convert_to_numpy(plain), rtol=1e-6)


def test_loss_survives_save_and_load(tmp_path):
    inp = keras.Input((4,))
    model = keras.Model(inp, keras.layers.Dense(3, activation="softmax")(inp))
    model.compile(optimizer="adam", loss=PairedConsistencyLoss(weight=7.5))
    model.optimizer.build(model.trainable_variables)
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    assert isinstance(loaded.loss, PairedConsistencyLoss) and loaded.loss.weight == 7.5


def _images(n=6, size=24, seed=0):
    rng = np.random.default_rng(seed)
    x = np.full((n, size, size, 3), 210, np.uint8)
    for i in range(n):  # a dark off-centre blob, so geometry is visible
        cy, cx = rng.integers(4, size - 8, 2)
        x[i, cy:cy + 6, cx:cx + 4] = (90, 40, 150)
    return x, np.arange(n, dtype=np.int32) % 3


def test_paired_batches_are_plain_view_plus_a_colour_only_twin():
    x, y = _images()
    aug = RECIPES["robust"]
    plain = next(iter(train_dataset(x, y, batch_size=6, seed=5, first_epoch=0, last_epoch=1, augment=aug)))
    pair_x, pair_y = next(iter(train_dataset(x, y, batch_size=6, seed=5, first_epoch=0, last_epoch=1, augment=aug,
                                             paired=True)))
    pair_x, pair_y = pair_x.numpy(), pair_y.numpy()
    assert pair_x.shape == (12, 24, 24, 3)
    np.testing.assert_array_equal(pair_y[0::2], plain[1].numpy())
    np.testing.assert_array_equal(pair_y[1::2], plain[1].numpy())
    # view a is exactly the unpaired augmentation of the same image
    np.testing.assert_allclose(pair_x[0::2], plain[0].numpy(), atol=1e-3)
    # view b has the same geometry (the blob in the same place) but other colours
    luma = lambda im: im @ np.array([0.299, 0.587, 0.114])  # noqa: E731
    for a, b in zip(pair_x[0::2], pair_x[1::2]):
        assert np.corrcoef(luma(a).ravel(), luma(b).ravel())[0, 1] > 0.8
    assert np.abs(pair_x[0::2] - pair_x[1::2]).mean() > 1.0


def test_geometry_is_shared_even_without_colour_in_the_recipe():
    x, y = _images(seed=1)
    pair_x, _ = next(iter(train_dataset(x, y, batch_size=6, seed=2, first_epoch=0, last_epoch=1,
                                        augment=RECIPES["paper003"], paired=True)))
    pair_x = pair_x.numpy()
    dark_a = pair_x[0::2].mean(-1) < 150
    dark_b = pair_x[1::2].mean(-1) < 170
    overlap = (dark_a & dark_b).sum() / max(dark_a.sum(), 1)
    assert overlap > 0.6


def test_paired_eval_dataset_duplicates_each_image():
    x, y = _images(n=5)
    xs, ys = zip(*[(a.numpy(), b.numpy()) for a, b in eval_dataset(x, y, batch_size=4, paired=True)])
    assert [len(b) for b in ys] == [8, 2]
    xs, ys = np.concatenate(xs), np.concatenate(ys)
    assert xs.shape[0] == 10
    np.testing.assert_array_equal(xs[0::2], xs[1::2])
    np.testing.assert_array_equal(xs[0::2], x.astype(np.float32))
    np.testing.assert_array_equal(ys[0::2], y)


def test_replica_check_and_weight_range():
    check_replicas(32, 2)
    check_replicas(7, 1)
    with pytest.raises(UsageError, match="divisible by 2"):
        check_replicas(7, 2)
    with pytest.raises(UsageError):
        TrainOptions(out="x", model="leuko-tiny", resume=True, consistency=-1.0)


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return make_toy(tmp_path_factory.mktemp("toy-consistency"), per_class=20, seed=training_seed())


def test_training_with_consistency_records_it_and_resumes(toy, tmp_path):
    out = tmp_path / "run"
    opts = dict(out=out, model="leuko-tiny", manifest=toy, input_size=32, epochs=2, batch_size=8,
                seed=training_seed(1), evaluate=False, augment="robust", consistency=10.0)
    first = train(TrainOptions(**{**opts, "epochs": 2}))
    config = read_json(RunDir(out).config_path)
    assert config["extra"]["consistency"]["weight"] == 10.0
    assert "Jensen-Shannon" in config["extra"]["loss"]
    hist = first["history"]
    assert len(hist["loss"]) == 2 and all(np.isfinite(hist["val_loss"]))
    # the saved best model is the plain classifier: loads without the loss and predicts 4 classes
    model = keras.models.load_model(out / "model.keras", compile=False)
    assert np.asarray(model(np.zeros((1, 32, 32, 3), np.float32))).shape == (1, 4)
    # a resume may not change the weight; a resume without it continues with the run's own
    with pytest.raises(UsageError, match="consistency"):
        trainer._check_resume(TrainOptions(out=out, model="leuko-tiny", resume=True, consistency=3.0),
                              RunDir(out).config())
    state = read_json(RunDir(out).state_path)
    state.pop("finished")
    RunDir(out).state_path.write_text(json.dumps(state))
    config["epochs"] = 3
    RunDir(out).config_path.write_text(json.dumps(config))
    resumed = train(TrainOptions(out=out, model="leuko-tiny", resume=True))
    assert len(resumed["history"]["loss"]) == 3
    # the model card says how it was trained
    card = read_json(RunDir(out).model_card_json)
    assert card["training"]["consistency"]["weight"] == 10.0
    assert "Jensen-Shannon colour consistency" in RunDir(out).model_card_md.read_text()


@pytest.mark.slow
def test_consistency_under_mirrored_strategy(toy, tmp_path):
    """Whole pairs per replica: two logical CPU devices, a batch that divides, no partial batch."""
    train_on_two_logical_cpus(toy, tmp_path, batch_size=6, consistency=5.0, seed=training_seed())
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    assert np.isfinite(history["history"]["loss"][0])
    assert "MirroredStrategy over 2" in history["devices"]
