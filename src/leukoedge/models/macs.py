"""Analytic multiply-accumulate (MAC) counts from layer shapes.

Counted: ``Conv2D`` (``Ho*Wo*kh*kw*Cin/groups*Cout``), ``DepthwiseConv2D``
(``Ho*Wo*kh*kw*Cin*multiplier``), ``SeparableConv2D`` (depthwise + pointwise)
and ``Dense`` (``prod(leading dims)*in*units``), per image. Biases,
BatchNorm, activations, pooling and adds are not counted: they are a few
percent of the total for these nets and vanish into fused ops after int8
conversion. Nested models are walked recursively. A layer whose output shape
is unknown (a subclassed model never called) makes the count fail loudly.
"""
from __future__ import annotations

import math

import keras

from ..errors import UsageError


def _shape(tensor) -> tuple:
    shape = tuple(tensor.shape)
    if any(d is None for d in shape[1:]):
        raise UsageError(f"cannot count MACs with dynamic shape {shape}; build with a fixed input size")
    return shape


def layer_macs(layer) -> int:
    """MACs of one layer for a single image (0 for uncounted layer types)."""
    if isinstance(layer, keras.layers.DepthwiseConv2D):
        _, ho, wo, _ = _shape(layer.output)
        cin = _shape(layer.input)[-1]
        kh, kw = layer.kernel_size
        return ho * wo * kh * kw * cin * layer.depth_multiplier
    if isinstance(layer, keras.layers.SeparableConv2D):
        _, ho, wo, cout = _shape(layer.output)
        cin = _shape(layer.input)[-1]
        kh, kw = layer.kernel_size
        return ho * wo * kh * kw * cin * layer.depth_multiplier + ho * wo * cin * layer.depth_multiplier * cout
    if isinstance(layer, keras.layers.Conv2D):
        _, ho, wo, cout = _shape(layer.output)
        cin = _shape(layer.input)[-1]
        kh, kw = layer.kernel_size
        return ho * wo * kh * kw * (cin // layer.groups) * cout
    if isinstance(layer, keras.layers.Dense):
        in_shape = _shape(layer.input)
        return math.prod(in_shape[1:-1]) * in_shape[-1] * layer.units
    return 0


def count_macs(model) -> int:
    """Total MACs per image of a built functional/sequential model."""
    total = 0
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            total += count_macs(layer)
        else:
            total += layer_macs(layer)
    return total
