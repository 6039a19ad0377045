"""Edge-first nets for full-integer (int8) TFLite and the Coral Edge TPU.

Design rules, shared by every net here (and why):

- Only ops that quantise cleanly and compile for the Edge TPU: Conv2D,
  DepthwiseConv2D, BatchNorm (folded at conversion), ReLU/ReLU6, Add, global
  average pooling, Dense, softmax. No swish/hard-swish, no squeeze-excitation
  (sigmoid gating and a per-channel multiply lose accuracy in int8 and fall
  back to the CPU on the Edge TPU), no dynamic shapes, no resize ops.
- ReLU6 where the original design uses it: a bounded range makes the int8
  activation scale insensitive to a few outlier pixels during calibration.
- Global average pooling heads: parameter count does not depend on the input
  size, so one net serves 96-224 px inputs, and the ``features`` map
  feeding the pool is exactly what class-activation heatmaps need.
- Default input sizes are chosen for a Raspberry Pi 4/5 budget; Taleqani
  fields are 224x224, and the small nets read them at 128-160 px.

Nets:

- ``leuko-tiny`` (<= 100k params): MobileNetV1-style depthwise-separable stack,
  widths 16-128, for the Pi Zero 2 / smallest Edge TPU budget.
- ``leuko-small`` (<= 150k params, <= 25M MACs at 160 px): the net designed
  for the Taleqani benchmark goal. Two stride-2 steps before any wide layer
  keep MACs low; widths 16-224; residual adds on the stride-1 blocks speed
  up from-scratch training on a CPU.
- ``mobilenetv2-0.35`` / ``mobilenetv2-1.0``: MobileNetV2 (Sandler et al.
  2018) rebuilt here rather than taken from ``keras.applications`` so the
  contract layers (``image``, ``features``, ``probabilities``) sit in one
  flat graph and BatchNorm momentum is 0.99 instead of 0.999 (see
  :mod:`.blocks`). Same layer widths and parameter count as the Keras
  application with ``include_top=False`` plus our 4-class head.
- ``efficientnet-lite0``: EfficientNet-Lite0 (Tan & Le, the TF Lite variant):
  EfficientNet-B0's MBConv stages with ReLU6 instead of swish, no SE, stem and
  head widths fixed.
"""
from __future__ import annotations

from . import blocks
from .registry import TrainDefaults, register_model

EDGE_TRAIN = TrainDefaults(epochs=40, batch_size=32, learning_rate=2e-3, optimizer="adam", augment="default")


@register_model("leuko-tiny", default_input=128, params=73_828, family="edge", source="this project",
                summary="depthwise-separable stack, ReLU6, <=100k params", train=EDGE_TRAIN)
def leuko_tiny(input_size: int, num_classes: int, dropout: float = 0.2):
    inputs, x = blocks.image_input(input_size)
    x = blocks.conv_bn_act(x, 16, 3, 2, "stem")
    for i, (filters, stride) in enumerate([(32, 2), (64, 2), (64, 1), (128, 2), (128, 1), (256, 1)]):
        x = blocks.depthwise_separable(x, filters, stride, f"ds{i + 1}")
    return blocks.gap_head(inputs, x, num_classes, dropout, "leuko_tiny")


@register_model("leuko-small", default_input=160, params=127_828, family="edge", source="this project",
                summary="benchmark net: <=150k params, <=25M MACs at 160 px", train=EDGE_TRAIN)
def leuko_small(input_size: int, num_classes: int, dropout: float = 0.2):
    inputs, x = blocks.image_input(input_size)
    x = blocks.conv_bn_act(x, 16, 3, 2, "stem")
    plan = [(32, 2), (48, 1), (96, 2), (96, 1), (192, 2), (192, 1), (224, 1)]
    for i, (filters, stride) in enumerate(plan):
        x = blocks.depthwise_separable(x, filters, stride, f"ds{i + 1}")
    return blocks.gap_head(inputs, x, num_classes, dropout, "leuko_small")


# (expansion, output channels, repeats, first stride) from the MobileNetV2 paper, table 2.
_MBV2_STAGES = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]


def _mobilenetv2(input_size: int, num_classes: int, alpha: float, dropout: float, name: str):
    inputs, x = blocks.image_input(input_size)
    x = blocks.conv_bn_act(x, blocks.make_divisible(32 * alpha), 3, 2, "stem")
    block = 0
    for expansion, channels, repeats, stride in _MBV2_STAGES:
        width = blocks.make_divisible(channels * alpha)
        for r in range(repeats):
            x = blocks.inverted_residual(x, width, stride if r == 0 else 1, expansion, f"block{block}")
            block += 1
    last = blocks.make_divisible(1280 * alpha) if alpha > 1.0 else 1280
    x = blocks.conv_bn_act(x, last, 1, 1, "head")
    return blocks.gap_head(inputs, x, num_classes, dropout, name)


@register_model("mobilenetv2-0.35", default_input=160, params=415_332, family="edge", source="Sandler et al. 2018",
                summary="MobileNetV2 width 0.35, ReLU6, from scratch", train=EDGE_TRAIN)
def mobilenetv2_035(input_size: int, num_classes: int, dropout: float = 0.2):
    return _mobilenetv2(input_size, num_classes, 0.35, dropout, "mobilenetv2_035")


@register_model("mobilenetv2-1.0", default_input=224, params=2_263_108, family="edge", source="Sandler et al. 2018",
                summary="MobileNetV2 width 1.0, ReLU6, from scratch", train=EDGE_TRAIN)
def mobilenetv2_100(input_size: int, num_classes: int, dropout: float = 0.2):
    return _mobilenetv2(input_size, num_classes, 1.0, dropout, "mobilenetv2_100")


# (expansion, kernel, first stride, output channels, repeats): EfficientNet-B0 stages.
_EFFNET_STAGES = [(1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3),
                  (6, 5, 1, 112, 3), (6, 5, 2, 192, 4), (6, 3, 1, 320, 1)]


@register_model("efficientnet-lite0", default_input=224, params=3_418_148, family="edge",
                source="Tan & Le 2019, TF Lite variant", summary="EfficientNet-Lite0: MBConv, ReLU6, no SE",
                train=EDGE_TRAIN)
def efficientnet_lite0(input_size: int, num_classes: int, dropout: float = 0.2):
    inputs, x = blocks.image_input(input_size)
    x = blocks.conv_bn_act(x, 32, 3, 2, "stem")
    block = 0
    for expansion, kernel, stride, channels, repeats in _EFFNET_STAGES:
        for r in range(repeats):
            x = blocks.inverted_residual(x, channels, stride if r == 0 else 1, expansion, f"mb{block}", kernel)
            block += 1
    x = blocks.conv_bn_act(x, 1280, 1, 1, "head")
    return blocks.gap_head(inputs, x, num_classes, dropout, "efficientnet_lite0")
