"""Label smoothing (``train --label-smoothing E``): the loss against numpy, a real run scored with it, refusals."""
from __future__ import annotations

import numpy as np
import pytest

keras = pytest.importorskip("keras")

from conftest import training_seed  # noqa: E402
from leukoedge.errors import UsageError  # noqa: E402
from leukoedge.train.dataset import ImageCache, load_split  # noqa: E402
from leukoedge.train.rundir import RunDir, read_json  # noqa: E402
from leukoedge.train.smoothing import SmoothedCrossEntropy  # noqa: E402
from leukoedge.train.trainer import TrainOptions, train  # noqa: E402
from test_train import make_toy  # noqa: E402


def _expected(labels, p, eps):
    target = np.full(p.shape, eps / p.shape[1])
    target[np.arange(len(p)), labels] += 1 - eps
    return -(target * np.log(p)).sum(-1)


def test_the_loss_is_the_cross_entropy_to_the_smoothed_target():
    rng = np.random.default_rng(0)
    z = rng.normal(0, 2, (7, 4))
    p = (np.exp(z) / np.exp(z).sum(-1, keepdims=True)).astype("float32")
    labels = np.array([0, 1, 2, 3, 0, 2, 1])
    for eps in (0.0, 0.1, 0.3):
        got = keras.ops.convert_to_numpy(SmoothedCrossEntropy(eps, reduction=None)(labels, p))
        np.testing.assert_allclose(got, _expected(labels, p, eps), rtol=1e-5)
    plain = keras.ops.convert_to_numpy(keras.losses.SparseCategoricalCrossentropy(reduction=None)(labels, p))
    np.testing.assert_allclose(keras.ops.convert_to_numpy(SmoothedCrossEntropy(0.0, reduction=None)(labels, p)),
                               plain, rtol=1e-5)
    # labels as a column (as some pipelines give them) mean the same
    column = keras.ops.convert_to_numpy(SmoothedCrossEntropy(0.1, reduction=None)(labels[:, None], p))
    np.testing.assert_allclose(column, _expected(labels, p, 0.1), rtol=1e-5)
    assert SmoothedCrossEntropy.from_config(SmoothedCrossEntropy(0.2).get_config()).epsilon == 0.2


@pytest.mark.parametrize("kw, match", [
    ({"label_smoothing": 0.5}, "must be in"), ({"label_smoothing": -0.1}, "must be in"),
    ({"label_smoothing": 0.1, "consistency": 5.0}, "cannot be combined"),
    ({"label_smoothing": 0.1, "teachers": ("somewhere",)}, "cannot be combined"),
])
def test_bad_smoothing_options_are_refused(kw, match, tmp_path):
    with pytest.raises(UsageError, match=match):
        TrainOptions(out=tmp_path / "x", model="leuko-tiny", resume=True, **kw)
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_a_smoothed_run_is_validated_with_the_smoothed_loss_and_records_it(tmp_path):
    toy = make_toy(tmp_path / "toy", per_class=8, seed=training_seed())
    out = tmp_path / "run"
    train(TrainOptions(out=out, model="leuko-tiny", manifest=toy, input_size=32, epochs=1, batch_size=8,
                       seed=training_seed(5), audit=False, label_smoothing=0.2))
    config = read_json(out / "config.json")
    assert config["extra"]["label_smoothing"] == 0.2
    assert "label smoothing 0.2" in config["extra"]["loss"] and "label smoothing 0.2" in (
        out / "model_card.md").read_text()
    # the recorded validation loss is the smoothed loss of the kept model on the val images, computed here
    model = keras.models.load_model(out / "model.keras", compile=False)
    x, y, _ = load_split(toy, "val", RunDir(out).config().preprocess_spec, ImageCache())
    p = np.clip(model.predict(x.astype("float32"), batch_size=64, verbose=0).astype(np.float64), 1e-7, 1.0)
    val_loss = read_json(out / "history.json")["history"]["val_loss"][0]
    assert val_loss == pytest.approx(float(np.mean(_expected(y, p, 0.2))), rel=1e-3)
    with pytest.raises(UsageError, match="label_smoothing=0.1"):
        train(TrainOptions(out=out, model="leuko-tiny", resume=True, label_smoothing=0.1))
