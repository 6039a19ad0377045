"""Keras -> TFLite: load the run's model, name its outputs, convert per mode.

The exported graph has a fixed batch of 1 (what the device feeds and what the
Edge TPU compiler requires) and its outputs are a dict, so the TFLite
signature names them ``probabilities`` (and ``features`` with
``--with-heatmap``): TFLite orders a multi-output model's tensors differently
from Keras, and the runtime selects by these names.

What can fail: :class:`RunError` (model missing or not following the
conventions: input ``image``, layers ``probabilities`` / ``features``),
:class:`ConversionError` (the converter itself fails).
"""
from __future__ import annotations

import contextlib
import importlib
import io
import logging
import warnings
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import ConversionError, RunError
from .modes import QuantMode

log = logging.getLogger(__name__)


def load_keras_model(path: Path):
    """Load ``model.keras`` (registry custom layers registered first, if any)."""
    import keras

    try:
        importlib.import_module("leukoedge.models")
    except ImportError as err:  # the registry is optional for plain Keras models
        log.debug("leukoedge.models not importable: %s", err)
    try:
        return keras.models.load_model(path, compile=False)
    except (OSError, ValueError, TypeError) as err:
        raise RunError(f"{path}: cannot load the Keras model ({err})") from None


def check_conventions(model, with_features: bool) -> None:
    """The layer names the converter and the device rely on (see DEVELOPERS.md)."""
    names = {layer.name for layer in model.layers}
    if "probabilities" not in names:
        raise RunError("the model has no layer named 'probabilities' (the softmax output); it does not follow the registry conventions")
    if with_features and "features" not in names:
        raise RunError(
            "--with-heatmap (or a feature-based abstention score) needs a layer named 'features' "
            "(the last spatial feature map); this model has none",
            hint="convert without --with-heatmap, or rebuild the model from the registry",
        )
    if len(model.inputs) != 1 or len(model.inputs[0].shape) != 4 or model.inputs[0].shape[-1] != 3:
        raise RunError(f"the model must take one (None, H, W, 3) image input, it takes {[tuple(i.shape) for i in model.inputs]}")


def build_export_model(model, with_features: bool):
    """Batch-1 model with named dict outputs (see module docstring)."""
    import keras

    outputs = {"probabilities": model.get_layer("probabilities").output}
    if with_features:
        outputs["features"] = model.get_layer("features").output
    named = keras.Model(model.inputs, outputs, name=f"{model.name}_export")
    height, width = int(model.inputs[0].shape[1]), int(model.inputs[0].shape[2])
    image = keras.Input(batch_shape=(1, height, width, 3), name="image", dtype="float32")
    return keras.Model(image, named(image), name=f"{model.name}_tflite")


def cam_weights(model) -> np.ndarray | None:
    """Dense kernel (channels x classes) when the head is features -> GAP -> [Dropout] -> Dense(softmax).

    Any other head returns None and the device shows the channel-mean map.
    """
    import keras

    dense = model.get_layer("probabilities")
    if not isinstance(dense, keras.layers.Dense) or getattr(dense.activation, "__name__", "") != "softmax":
        return None
    layer = _producer(dense)
    while isinstance(layer, keras.layers.Dropout):
        layer = _producer(layer)
    if not isinstance(layer, keras.layers.GlobalAveragePooling2D):
        return None
    if _producer(layer) is not model.get_layer("features"):
        return None
    kernel = np.asarray(dense.get_weights()[0], dtype=np.float32)
    return kernel if kernel.ndim == 2 else None


def _producer(layer):
    """The layer whose output feeds ``layer`` (None for multi-input layers)."""
    inputs = layer.input
    if isinstance(inputs, (list, tuple)):
        return None
    history = getattr(inputs, "_keras_history", None)
    return history[0] if history else None


def make_converter(export_model, mode: QuantMode, representative: Callable | None = None):
    """A ``tf.lite.TFLiteConverter.from_keras_model`` set up with the mode's settings.

    One place for the settings, so the diagnosis (:mod:`.diagnose`, which hands the
    converter to TensorFlow's QuantizationDebugger) quantises exactly like the bundle.
    """
    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_keras_model(export_model)
    if mode.optimize:
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if mode.float16_weights:
        converter.target_spec.supported_types = [tf.float16]
    if mode.full_integer:
        if representative is None:
            raise ConversionError(f"--quantize {mode.name} needs representative (calibration) data")
        io_type = io_dtype(mode)
        converter.representative_dataset = representative
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.inference_input_type = io_type
        converter.inference_output_type = io_type
    return converter


def io_dtype(mode: QuantMode):
    """The TensorFlow dtype of a full-integer mode's input and output tensors."""
    import tensorflow as tf

    return {"int8": tf.int8, "uint8": tf.uint8}[mode.io_dtype]


@contextlib.contextmanager
def quiet_converter():
    """Keep the converter's chatter for --verbose instead of burying the parity summary under it.

    Keras prints the whole SavedModel signature to stdout while exporting, and TF warns that
    "statistics for quantized inputs were expected": the input is raw pixels by design
    (Rescaling is inside the model), so that warning is noise here.
    """
    chatter = io.StringIO()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(chatter):
            warnings.filterwarnings("ignore", message="Statistics for quantized inputs")
            warnings.filterwarnings("ignore", message=".*tf.lite.Interpreter is deprecated")
            yield
    finally:
        if chatter.getvalue():
            log.debug("converter output:\n%s", chatter.getvalue())


def convert(export_model, mode: QuantMode, representative: Callable | None = None) -> bytes:
    """Run ``tf.lite.TFLiteConverter.from_keras_model`` with the mode's settings."""
    from tensorflow.lite.python.convert_phase import ConverterError  # not re-exported under tf.lite

    converter = make_converter(export_model, mode, representative)
    try:
        with quiet_converter():
            return bytes(converter.convert())
    except (ConverterError, ValueError, RuntimeError, TypeError) as err:
        raise ConversionError(
            f"TFLite conversion ({mode.name}) failed: {str(err).strip().splitlines()[-1] if str(err).strip() else err}",
            hint="an op without an int8 kernel makes full-integer conversion fail; try --quantize dynamic to locate it",
        ) from None
