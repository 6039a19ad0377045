"""Weight averaging (``train --ema M``): the average's arithmetic, what each checkpoint holds, resume, refusals."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

keras = pytest.importorskip("keras")

from conftest import training_seed  # noqa: E402
from leukoedge.errors import RunError, UsageError  # noqa: E402
from leukoedge.train.averaging import WeightAverage  # noqa: E402
from leukoedge.train.rundir import read_json  # noqa: E402
from leukoedge.train.trainer import TrainOptions, train  # noqa: E402
from test_train import interrupt_after_first_epoch, make_toy  # noqa: E402


def _tiny_model():
    inputs = keras.Input((3,))
    return keras.Model(inputs, keras.layers.Dense(2)(inputs))


def _set(model, value: float):
    for v in model.trainable_variables:
        v.assign(np.full(v.shape, value, np.float32))


def test_the_average_starts_at_the_first_step_is_swapped_in_after_the_last_and_restored(tmp_path):
    model = _tiny_model()
    avg = WeightAverage(0.9, steps=3, path=tmp_path / "avg.npz")
    avg.set_model(model)
    for step, value in enumerate((1.0, 2.0, 4.0)):  # the raw weights after each of 3 steps
        _set(model, value)
        avg.on_train_batch_end(step)
    expected = 0.9 * (0.9 * 1.0 + 0.1 * 2.0) + 0.1 * 4.0  # starts at step 1's weights, not the initialisation
    for v in model.trainable_variables:  # after the epoch's last step the model holds the average
        np.testing.assert_allclose(keras.ops.convert_to_numpy(v), expected, rtol=1e-6)
    avg.restore_training_weights()
    for v in model.trainable_variables:  # ... and the raw weights again before training continues
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(v), 4.0)
    saved = WeightAverage.load(tmp_path / "avg.npz", [v.shape for v in model.trainable_variables])
    for a in saved:
        np.testing.assert_allclose(a, expected, rtol=1e-6)
    with pytest.raises(RunError, match="does not match"):
        WeightAverage.load(tmp_path / "avg.npz", [(5, 5), (5,)])
    (tmp_path / "bad.npz").write_bytes(b"not an npz")
    with pytest.raises(RunError, match="cannot read the weight average"):
        WeightAverage.load(tmp_path / "bad.npz", [(3, 2), (2,)])


@pytest.mark.parametrize("bad", [0.0, 1.0, -0.5, 1.5])
def test_the_momentum_must_lie_strictly_between_0_and_1(bad, tmp_path):
    with pytest.raises(UsageError, match="--ema must be a momentum"):
        TrainOptions(out=tmp_path / "x", model="leuko-tiny", resume=True, ema=bad)
    assert not (tmp_path / "x").exists()


def _trainable(path):
    return [keras.ops.convert_to_numpy(v) for v in keras.models.load_model(path, compile=False).trainable_variables]


@pytest.mark.slow
def test_an_averaged_run_keeps_the_average_trains_on_and_resumes_the_raw_weights(tmp_path, monkeypatch):
    toy = make_toy(tmp_path / "toy", per_class=8, seed=training_seed())
    out = tmp_path / "run"
    opts = TrainOptions(out=out, model="leuko-tiny", manifest=toy, input_size=32, epochs=2, batch_size=8,
                        seed=training_seed(4), evaluate=False, ema=0.8)
    interrupt_after_first_epoch(monkeypatch, opts)
    config = read_json(out / "config.json")
    assert config["extra"]["averaging"]["momentum"] == 0.8 and config["extra"]["averaging"]["kind"] == "ema"
    # after epoch 1 (always kept: the first finite val_loss), model.keras is the average, last.keras the raw weights
    shapes = [a.shape for a in _trainable(out / "model.keras")]
    average = WeightAverage.load(out / "last_average.npz", shapes)
    for kept, avg in zip(_trainable(out / "model.keras"), average):
        np.testing.assert_allclose(kept, avg, rtol=1e-6, atol=1e-7)
    assert any(not np.allclose(raw, avg) for raw, avg in zip(_trainable(out / "last.keras"), average))

    # --resume refuses another momentum, then continues the SAVED average (not a fresh one from the raw weights)
    with pytest.raises(UsageError, match="ema=0.5"):
        train(TrainOptions(out=out, model="leuko-tiny", resume=True, ema=0.5))
    loaded = []
    begin = WeightAverage.on_train_begin

    def record(self, logs=None):
        begin(self, logs)
        loaded.append([a.copy() for a in self.average])

    monkeypatch.setattr(WeightAverage, "on_train_begin", record)
    train(TrainOptions(out=out, model="leuko-tiny", resume=True, evaluate=False))
    for got, want in zip(loaded[0], average):
        np.testing.assert_array_equal(got, want)
    assert read_json(out / "history.json")["epochs_run"] == 2

    # a resumed averaged run without its average is refused (RunError), never restarted silently
    monkeypatch.setattr(WeightAverage, "on_train_begin", begin)
    state = read_json(out / "state.json")
    state.update(finished=False, epoch=0)
    (out / "state.json").write_text(json.dumps(state))
    (out / "last_average.npz").unlink()
    with pytest.raises(RunError, match="weight average"):
        train(TrainOptions(out=out, model="leuko-tiny", resume=True, evaluate=False))


@pytest.mark.slow
def test_the_card_names_the_average_and_the_cli_passes_ema(tmp_path):
    toy = make_toy(tmp_path / "toy", per_class=8, seed=training_seed())
    manifest = tmp_path / "manifest.json"
    toy.save(manifest)
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "leukoedge", "train", "--manifest", str(manifest), "--model",
                           "leuko-tiny", "--input-size", "32", "--epochs", "1", "--batch", "8", "--no-audit",
                           "--ema", "0.9", "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert read_json(out / "config.json")["extra"]["averaging"]["momentum"] == 0.9
    card = (out / "model_card.md").read_text()
    assert "exponential moving average, momentum 0.9 (~10 steps)" in card
    bad = subprocess.run([sys.executable, "-m", "leukoedge", "train", "--manifest", str(manifest), "--model",
                          "leuko-tiny", "--ema", "1", "--out", str(tmp_path / "bad")], capture_output=True, text=True,
                         timeout=300)
    assert bad.returncode == 2 and "--ema must be a momentum" in bad.stderr and not (tmp_path / "bad").exists()


@pytest.mark.slow
def test_the_average_works_under_mirrored_strategy(tmp_path):
    """Variables read and assigned in cross-replica context: 2 logical CPUs, the kept model is the average."""
    from test_train import train_on_two_logical_cpus

    toy = make_toy(tmp_path / "toy", per_class=8, seed=training_seed())
    run = train_on_two_logical_cpus(toy, tmp_path, batch_size=8, seed=training_seed(6), ema=0.9)
    assert read_json(run / "config.json")["extra"]["devices"] == "MirroredStrategy over 2 CPU device(s)"
    kept = _trainable(run / "model.keras")
    for a, b in zip(kept, WeightAverage.load(run / "last_average.npz", [k.shape for k in kept])):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
