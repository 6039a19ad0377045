"""The model registry: every model builds, follows the contract, trains a step and has its documented size."""
from __future__ import annotations

import numpy as np
import pytest

keras = pytest.importorskip("keras")

from leukoedge.errors import ModelNotFoundError, UsageError  # noqa: E402
from leukoedge.models import count_macs, create_model, get_entry, list_models, model_info  # noqa: E402
from leukoedge.models.blocks import BN_MOMENTUM  # noqa: E402

#: Models whose default-size build + step takes seconds on 2 cores.
HEAVY = {"seed-vgg16", "seed-cnn6", "seed-cnn-aug", "efficientnet-lite0", "mobilenetv2-1.0", "seed-lenet"}


def _test_size(name: str) -> int:
    """Resizable (GAP-head) nets: their parameter count does not depend on size, so test small."""
    entry = get_entry(name)
    return max(entry.min_input, 32) if entry.resizable else entry.default_input


def _params(name):
    return [pytest.param(n, marks=pytest.mark.slow) if n in HEAVY else n for n in list_models()]


def test_registry_lists_paper_and_edge_nets():
    names = list_models()
    for required in ("seed-cnn6", "seed-cnn13", "seed-sequential", "seed-lenet", "seed-vgg16", "seed-cnn-aug",
                     "leuko-tiny", "leuko-small", "mobilenetv2-0.35", "mobilenetv2-1.0", "efficientnet-lite0"):
        assert required in names
    assert names.index("seed-cnn6") < names.index("leuko-tiny")  # paper nets first
    assert set(list_models("edge")) | set(list_models("paper")) == set(names)


def test_unknown_model_lists_valid_names():
    with pytest.raises(ModelNotFoundError) as err:
        create_model("resnet-9000")
    message = err.value.user_message()
    assert "resnet-9000" in message and "leuko-tiny" in message and "seed-vgg16" in message


def test_bad_sizes_are_refused():
    with pytest.raises(UsageError):
        create_model("seed-cnn13", input_size=48)  # five valid convs + pools need >= 96 px
    with pytest.raises(UsageError):
        create_model("leuko-tiny", num_classes=1)


@pytest.mark.parametrize("name", _params("all"))
def test_model_contract_params_and_one_step(name):
    entry = get_entry(name)
    size = _test_size(name)
    model = create_model(name, size, 4)
    # Contract: raw-pixel input named image, Rescaling(1/255) right after it, features, probabilities.
    assert model.inputs[0].name == "image" or model.layers[0].name == "image"
    assert tuple(model.input_shape) == (None, size, size, 3)
    rescale = model.layers[1]
    assert isinstance(rescale, keras.layers.Rescaling) and rescale.scale == pytest.approx(1 / 255)
    assert not [layer.name for layer in model.layers if type(layer).__name__.startswith("Random")]
    features = model.get_layer("features")
    assert len(features.output.shape) == 4  # a spatial map for heatmaps
    assert model.layers[-1].name == "probabilities"
    assert model.layers[-1].dtype_policy.compute_dtype == "float32"
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            assert layer.momentum == BN_MOMENTUM
    assert model.count_params() == entry.params, f"{name}: documented {entry.params:,}, built {model.count_params():,}"
    # One real training step on batch 2; probabilities stay a distribution.
    # Eager: one step does not repay tracing a graph of a 150-layer net on 2 busy cores.
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy", run_eagerly=True)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (2, size, size, 3)).astype("float32")
    before = [w.copy() for w in model.get_weights()]
    loss = model.train_on_batch(x, np.array([0, 3]))
    assert np.isfinite(loss)
    assert any(not np.array_equal(a, b) for a, b in zip(before, model.get_weights()))
    probs = keras.ops.convert_to_numpy(model(x, training=False))
    assert probs.shape == (2, 4)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)


def test_edge_budget_nets_meet_their_budgets():
    tiny = model_info("leuko-tiny")
    small = model_info("leuko-small")
    assert tiny["params"] <= 100_000
    assert small["params"] <= 150_000 and small["macs"] <= 25_000_000
    for name in list_models("edge"):
        model = create_model(name, 32)
        acts = {type(layer).__name__ for layer in model.layers}
        assert not acts & {"Multiply", "Lambda"}, f"{name} uses non int8-friendly ops {acts}"
        for layer in model.layers:
            act = getattr(layer, "activation", None)
            if act is not None and layer.name != "probabilities":
                assert act.__name__ in ("linear", "relu"), f"{name}.{layer.name} uses {act.__name__}"


def test_mobilenetv2_matches_keras_applications():
    """Our rebuild has the same parameter count as the reference implementation (plus the same head)."""
    for alpha, name in ((0.35, "mobilenetv2-0.35"), (1.0, "mobilenetv2-1.0")):
        ref = keras.applications.MobileNetV2(weights=None, include_top=False, input_shape=(96, 96, 3), alpha=alpha)
        assert get_entry(name).params == ref.count_params() + 1280 * 4 + 4


def test_macs_are_counted_from_layer_shapes():
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, padding="same")(inputs)          # 8*8*3*3*3*4 = 6912
    x = keras.layers.DepthwiseConv2D(3, strides=2, padding="same")(x)  # 4*4*3*3*4 = 576
    x = keras.layers.Conv2D(6, 1, groups=2)(x)                      # 4*4*1*1*(4/2)*6 = 192
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(2)(x)                              # 6*2 = 12
    assert count_macs(keras.Model(inputs, outputs)) == 6912 + 576 + 192 + 12


def test_two_class_sigmoid_paper_model_gives_two_probabilities(tmp_path):
    model = create_model("seed-cnn13", 96, num_classes=2)
    assert model.output_shape == (None, 2)
    x = np.random.default_rng(1).integers(0, 256, (3, 96, 96, 3)).astype("float32")
    probs = model.predict(x, verbose=0)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-6)
    sigmoid = keras.Model(model.inputs, model.get_layer("sigmoid").output).predict(x, verbose=0)
    np.testing.assert_allclose(probs[:, 1:], sigmoid, rtol=1e-6)
    model.save(tmp_path / "m.keras")
    again = keras.models.load_model(tmp_path / "m.keras")
    np.testing.assert_allclose(again.predict(x, verbose=0), probs, rtol=1e-6)


def test_model_info_reports_size_and_defaults():
    info = model_info("seed-cnn-aug", input_size=96)
    assert info["input_size"] == 96 and info["default_input"] == 224
    assert info["train_defaults"]["batch_size"] == 64 and info["train_defaults"]["augment"] == "paper003"
    assert info["macs"] > 0 and info["params"] != info["documented_params"]  # Flatten head: size-dependent
