"""Shared building blocks so every registry model keeps the same contract.

- :func:`image_input`: the ``image`` input (raw 0..255 RGB, float) followed by
  ``Rescaling(1/255)``: no normalisation constant ever lives outside a model.
- :func:`softmax_head`: the float32 ``probabilities`` layer (float32 even
  under mixed precision, so softmax never under/overflows in float16).
- :class:`SigmoidPair`: turns one sigmoid unit into two probabilities
  ``[1-p, p]`` for the two-class paper model, so all models share one output
  contract; it is a plain subtract + concat after conversion (int8-friendly).
- :func:`conv_bn_act`, :func:`depthwise_separable`, :func:`inverted_residual`:
  the edge-first blocks. Activations are ReLU/ReLU6 only (no swish, no SE):
  both quantise cleanly to int8 and map to single Edge TPU ops.

BatchNorm momentum is 0.99 everywhere: from-scratch training with Keras'
applications default (0.999) left the moving statistics far behind the
weights for the few hundred steps a CPU run gets, so validation diverged.
"""
from __future__ import annotations

import keras
from keras import layers

BN_MOMENTUM = 0.99
BN_EPSILON = 1e-3


def image_input(input_size: int):
    """Return ``(inputs, rescaled)`` for a square RGB input of ``input_size``."""
    inputs = keras.Input(shape=(input_size, input_size, 3), name="image")
    return inputs, layers.Rescaling(1.0 / 255.0, name="rescale")(inputs)


def softmax_head(x, num_classes: int):
    return layers.Dense(num_classes, activation="softmax", name="probabilities", dtype="float32")(x)


def batch_norm(name: str):
    return layers.BatchNormalization(momentum=BN_MOMENTUM, epsilon=BN_EPSILON, name=name)


@keras.saving.register_keras_serializable(package="leukoedge")
class SigmoidPair(layers.Layer):
    """``p -> [1 - p, p]``: two-class probabilities from one sigmoid unit."""

    def call(self, p):
        return keras.ops.concatenate([1.0 - p, p], axis=-1)

    def compute_output_shape(self, input_shape):
        return (*input_shape[:-1], 2)


def conv_bn_act(x, filters: int, kernel: int, stride: int, name: str, act: str = "relu6"):
    """Conv (no bias) + BN + ReLU/ReLU6."""
    x = layers.Conv2D(filters, kernel, strides=stride, padding="same", use_bias=False, name=f"{name}_conv")(x)
    x = batch_norm(f"{name}_bn")(x)
    return _act(x, act, name)


def _act(x, act: str, name: str):
    if act == "relu6":
        return layers.ReLU(6.0, name=f"{name}_relu6")(x)
    if act == "relu":
        return layers.ReLU(name=f"{name}_relu")(x)
    if act == "linear":
        return x
    raise ValueError(f"activation {act!r} is not int8/Edge TPU friendly here")


def depthwise_separable(x, filters: int, stride: int, name: str, kernel: int = 3, act: str = "relu6"):
    """MobileNetV1 block: depthwise kxk + BN + act, pointwise 1x1 + BN + act.

    A residual add is used when the shape is unchanged (stride 1, same width):
    cheap, int8-friendly and it helps short from-scratch training.
    """
    shortcut = x
    x = layers.DepthwiseConv2D(kernel, strides=stride, padding="same", use_bias=False, name=f"{name}_dw")(x)
    x = batch_norm(f"{name}_dw_bn")(x)
    x = _act(x, act, f"{name}_dw")
    x = layers.Conv2D(filters, 1, use_bias=False, name=f"{name}_pw")(x)
    x = batch_norm(f"{name}_pw_bn")(x)
    x = _act(x, act, f"{name}_pw")
    if stride == 1 and shortcut.shape[-1] == filters:
        x = layers.Add(name=f"{name}_add")([shortcut, x])
    return x


def inverted_residual(x, filters: int, stride: int, expansion: int, name: str, kernel: int = 3):
    """MobileNetV2 / EfficientNet-Lite MBConv: expand 1x1, depthwise kxk, linear project 1x1.

    ReLU6 after expand and depthwise, linear bottleneck, identity shortcut when
    stride is 1 and widths match. No squeeze-excitation (EfficientNet-Lite
    drops it too: its sigmoid gating quantises poorly and is not an Edge TPU op).
    """
    cin = x.shape[-1]
    shortcut = x
    if expansion != 1:
        x = layers.Conv2D(cin * expansion, 1, use_bias=False, name=f"{name}_expand")(x)
        x = batch_norm(f"{name}_expand_bn")(x)
        x = layers.ReLU(6.0, name=f"{name}_expand_relu6")(x)
    x = layers.DepthwiseConv2D(kernel, strides=stride, padding="same", use_bias=False, name=f"{name}_dw")(x)
    x = batch_norm(f"{name}_dw_bn")(x)
    x = layers.ReLU(6.0, name=f"{name}_dw_relu6")(x)
    x = layers.Conv2D(filters, 1, use_bias=False, name=f"{name}_project")(x)
    x = batch_norm(f"{name}_project_bn")(x)
    if stride == 1 and cin == filters:
        x = layers.Add(name=f"{name}_add")([shortcut, x])
    return x


def make_divisible(value: float, divisor: int = 8) -> int:
    """Round channel counts as MobileNetV2 does (never down by more than 10 %)."""
    new = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if new < 0.9 * value:
        new += divisor
    return new


def gap_head(inputs, x, num_classes: int, dropout: float, name: str):
    """``features`` (identity-named last map) -> GAP -> dropout -> softmax model.

    ``features`` is a linear Activation so heatmap code can read the last
    spatial map by name whatever block produced it; it converts to nothing.
    """
    x = layers.Activation("linear", name="features")(x)
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    if dropout:
        x = layers.Dropout(dropout, name="head_dropout")(x)
    return keras.Model(inputs, softmax_head(x, num_classes), name=name)
