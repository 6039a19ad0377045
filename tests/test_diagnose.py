"""`leukoedge convert --diagnose`: which layer makes the int8 model flip, measured by keeping it in float.

The planted model is the session's tiny trained model with one defect added by
construction, so the float model answers exactly as the trained one (the gate
compares against a model that learned the task) and the int8 damage is fixed by
arithmetic, not by training: the first conv gets a 9th channel that is always
exactly 0 (zero weights, bias -1, ReLU), and the planted conv reads it with a
weight of 1000 in every output channel. In float 0 x 1000 adds nothing; int8
weights are quantised per output channel, so each channel's step becomes
1000/127 ~ 7.9 and every real weight (|w| < 1) rounds to 0: the layer's output
is its bias alone and the model answers one class for everything. Keeping that
layer alone in float restores every answer, whatever the CPU.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from bundle_factory import CLASSES, SIZE, shared_tiny_run

from leukoedge import cli
from leukoedge.convert import diagnose
from leukoedge.convert.modes import MODES
from leukoedge.convert.options import ConvertOptions
from leukoedge.convert.pipeline import convert_run
from leukoedge.errors import ParityError, UsageError

PLANTED = "planted"
OUTLIER = 1000.0


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    return shared_tiny_run(tmp_path_factory)


def _planted_model(base):
    """The trained tiny model with a weight outlier on an always-zero input channel (see the module docstring)."""
    import keras

    conv1, conv2, feats = [layer for layer in base.layers if isinstance(layer, keras.layers.Conv2D)]
    n1 = conv1.filters
    image = keras.Input((SIZE, SIZE, 3), name="image")
    x = keras.layers.Rescaling(1 / 255, name="rescale")(image)
    x = keras.layers.Conv2D(n1 + 1, 3, padding="same", activation="relu", name="conv_in")(x)
    x = keras.layers.MaxPooling2D(name="pool_in")(x)
    x = keras.layers.Conv2D(conv2.filters, 3, padding="same", activation="relu", name=PLANTED)(x)
    x = keras.layers.MaxPooling2D(name="pool_planted")(x)
    x = keras.layers.Conv2D(feats.filters, 3, padding="same", activation="relu", name="features")(x)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    out = keras.layers.Dense(len(CLASSES), activation="softmax", name="probabilities")(x)
    model = keras.Model(image, out, name="planted_cnn")
    k1, b1 = conv1.get_weights()
    k2, b2 = conv2.get_weights()
    kernel1 = np.concatenate([k1, np.zeros((*k1.shape[:3], 1), np.float32)], axis=3)
    bias1 = np.append(b1, -1.0).astype(np.float32)  # the extra channel: ReLU(0 - 1) = exactly 0
    kernel2 = np.concatenate([k2, np.zeros((*k2.shape[:2], 1, k2.shape[3]), np.float32)], axis=2)
    kernel2[1, 1, n1, :] = OUTLIER
    assert np.abs(k2).max() < OUTLIER / 127 / 2  # every real weight rounds to 0 at the outlier's step
    model.get_layer("conv_in").set_weights([kernel1, bias1])
    model.get_layer(PLANTED).set_weights([kernel2, b2])
    model.get_layer("features").set_weights(feats.get_weights())
    model.get_layer("probabilities").set_weights(base.get_layer("probabilities").get_weights())
    return model


@pytest.fixture(scope="session")
def planted_run(tiny_run, tmp_path_factory) -> Path:
    import keras

    run = Path(shutil.copytree(tiny_run, tmp_path_factory.mktemp("planted") / "run"))
    base = keras.models.load_model(tiny_run / "model.keras", compile=False)
    model = _planted_model(base)
    probe = np.random.default_rng(0).integers(0, 256, (8, SIZE, SIZE, 3)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(model(probe)), np.asarray(base(probe)), atol=1e-5)  # same float model
    (run / "model.keras").unlink()
    model.save(run / "model.keras")
    return run


def test_failed_gate_is_diagnosed_and_the_planted_layer_is_blamed(planted_run, tmp_path, record_property):
    out = tmp_path / "planted-int8"
    with pytest.raises(ParityError) as info:
        convert_run(ConvertOptions(run_dir=planted_run, out=out, quantize="int8", calibration=64))
    result = info.value.result
    diag = json.loads((out / diagnose.DIAGNOSIS_NAME).read_text())
    assert result.diagnosis == diag
    m = diag["gate_flips"]
    record_property("gate_flips", m)
    record_property("n_test", diag["gate_images"])
    assert m == result.parity.flips > 0 and diag["reproduced_flips"] == m  # the debugger's model is the bundle's
    assert len(diag["flipped_images"]) == m
    assert {w["path"] for w in result.parity.worst if not w["agree"]} <= {f["path"] for f in diag["flipped_images"]}
    first = diag["layers"][0]
    assert first["layer"] == PLANTED and first["op"] == "CONV_2D" and first["tested"]
    assert first["rmse_per_step"] > 10 * max(r["rmse_per_step"] for r in diag["layers"][1:])
    record_property("planted_share_removed", first["share_removed"])
    assert first["share_removed"] >= 0.5 and first["flips_removed"] == m - len(first["still_flipped"])
    assert diag["blame"]["layer"] == PLANTED and diag["tested_layers"] == diagnose.TESTED_LAYERS
    assert sum(r["tested"] for r in diag["layers"]) == diagnose.TESTED_LAYERS
    sentence = f"keeping layer {PLANTED} (CONV_2D) in float removes {first['flips_removed']} of {m} flips"
    assert diag["verdict"] == sentence and sentence in info.value.hint
    md = (out / "parity.md").read_text()
    assert "## Diagnosis" in md and sentence in md and md.rstrip().endswith("not a diagnostic device.")
    assert md.index(f"| 1 | {PLANTED} |") > md.index("## Diagnosis")


def test_diagnose_layers_zero_tests_every_layer_from_the_cli(planted_run, tmp_path, monkeypatch, capsys):
    """``--diagnose-layers 0``: every layer kept in float in turn, so "no layer removes half" is a finding, not a guess."""
    monkeypatch.setattr(cli, "COMMAND_MODULES", (("convert", "leukoedge.convert.cli"),))
    out = tmp_path / "all-layers"
    code = cli.main(["convert", str(planted_run), "--quantize", "int8", "--calibration", "64", "--diagnose-layers", "0",
                     "--out", str(out)])
    diag = json.loads((out / diagnose.DIAGNOSIS_NAME).read_text())
    assert code != 0 and diag["gate_flips"] > 0  # the planted layer still breaks full int8
    assert diag["tested_layers"] == len(diag["layers"]) > diagnose.TESTED_LAYERS
    assert all(r["tested"] for r in diag["layers"]) and diag["blame"]["layer"] == PLANTED
    with pytest.raises(UsageError, match="--diagnose-layers"):
        ConvertOptions(run_dir=planted_run, out=tmp_path / "x", diagnose_layers=-1)


def test_clean_model_with_diagnose_flag_has_nothing_to_blame(tiny_run, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cli, "COMMAND_MODULES", (("convert", "leukoedge.convert.cli"),))
    out = tmp_path / "clean"
    code = cli.main(["convert", str(tiny_run), "--quantize", "int8", "--calibration", "64", "--diagnose", "--out", str(out)])
    diag = json.loads((out / diagnose.DIAGNOSIS_NAME).read_text())
    assert code == 0 and diag["layers"] and all(r["op"] for r in diag["layers"])
    assert "diagnosis:" in capsys.readouterr().out and "## Diagnosis" in (out / "parity.md").read_text()
    if diag["gate_flips"] == 0:  # what the parity tests assert for this model (agreement >= 0.99 of 40)
        assert diag["blame"] is None and diag["tested_layers"] == 0 and "nothing to blame" in diag["verdict"]


def test_no_flips_means_nothing_to_blame_without_any_fallback_conversion(tiny_run, tmp_path):
    """Zero flips by construction (converted = float): the per-layer table, no blame, no re-quantisation."""
    import keras

    from leukoedge.convert import export

    model = keras.models.load_model(tiny_run / "model.keras", compile=False)
    images = np.random.default_rng(1).integers(0, 256, (40, SIZE, SIZE, 3)).astype(np.uint8)
    probs = np.full((6, len(CLASSES)), 0.1)
    probs[:, 0] = 0.7
    diag = diagnose.diagnose(
        model, export.build_export_model(model, False), MODES["int8"],
        calibration_images=images[:32], error_images=images, gate_images=images[:6],
        gate_paths=[f"{i}.png" for i in range(6)], float_probs=probs, quant_probs=probs.copy(),
        bundle_dir=tmp_path / "never-read", classes=list(CLASSES), y_true=np.zeros(6, dtype=np.int64),
    )
    assert diag["gate_flips"] == 0 and diag["blame"] is None and diag["reproduced_flips"] is None
    assert diag["verdict"].endswith("nothing to blame") and not any(r["tested"] for r in diag["layers"])
    assert "nothing to blame" in diagnose.to_markdown(diag)


def test_diagnose_is_refused_for_modes_without_activation_quantisation():
    with pytest.raises(UsageError, match="--diagnose explains full-integer"):
        ConvertOptions(run_dir=Path("r"), out=Path("b"), quantize="float16", diagnose=True)


def test_tensor_names_map_back_to_keras_layers():
    names = {"conv2d", "conv2d_1", "features", "probabilities", "max_pooling2d_2"}
    outputs = ["features", "probabilities"]
    assert diagnose._layer_name("m_tflite_1/m_export_1/conv2d_1/Relu;m_tflite_1/x/BiasAdd", names, outputs) == "conv2d"
    assert diagnose._layer_name("m_tflite_1/m_export_1/conv2d_1_2/Relu", names, outputs) == "conv2d_1"
    assert diagnose._layer_name("m_tflite_1/m_export_1/max_pooling2d_2_1/MaxPool2d", names, outputs) == "max_pooling2d_2"
    assert diagnose._layer_name("StatefulPartitionedCall_1:1", names, outputs) == "probabilities"
    assert diagnose._layer_name("StatefulPartitionedCall_1:0", names, ["probabilities"]) == "probabilities"
    assert diagnose._layer_name("something/else", names, outputs) == "something/else"
