"""The source papers' CNNs (``seed-*``), rebuilt from their text.

The papers (../shared/papers) give layer types and some sizes but rarely
every width; where they are silent the choice below is the plain textbook one
and is named in each builder's docstring, so results can be compared with
the figures the papers report without pretending to be exact replicas.
All follow the registry contract (``image`` input, ``Rescaling(1/255)``,
``features``, float32 ``probabilities``); none has Random* layers:
augmentation happens in tf.data only. Their Flatten heads make the parameter
count depend on the input size (``resizable=False`` in the registry), so
documented counts are at the paper's own input size.
"""
from __future__ import annotations

import keras
from keras import layers, regularizers

from . import blocks
from .registry import TrainDefaults, register_model


@register_model("seed-cnn6", default_input=200, params=1_485_652, family="paper",
                source="000_ae4262740b6fabdd.txt", resizable=False, min_input=64,
                summary="six Conv-BN-ReLU-Conv blocks + pool + dropout, flatten, softmax",
                train=TrainDefaults(epochs=100, batch_size=32, learning_rate=1e-3))
def seed_cnn6(input_size: int, num_classes: int):
    """Paper 000 "modified CNN": 200x200 RGB, six blocks, dense softmax.

    Each block: Conv3x3 - BN - ReLU - Conv3x3 (ReLU) - MaxPool2 - Dropout(0.25).
    Widths 16, 32, 64, 128, 128, 256 (unstated in the paper: doubling, capped).
    """
    inputs, x = blocks.image_input(input_size)
    widths = [16, 32, 64, 128, 128, 256]
    for i, filters in enumerate(widths):
        x = layers.Conv2D(filters, 3, padding="same", name=f"b{i + 1}_conv1")(x)
        x = blocks.batch_norm(f"b{i + 1}_bn")(x)
        x = layers.ReLU(name=f"b{i + 1}_relu")(x)
        last = i == len(widths) - 1
        x = layers.Conv2D(filters, 3, padding="same", activation="relu",
                          name="features" if last else f"b{i + 1}_conv2")(x)
        x = layers.MaxPooling2D(2, name=f"b{i + 1}_pool")(x)
        x = layers.Dropout(0.25, name=f"b{i + 1}_dropout")(x)
    x = layers.Flatten(name="flatten")(x)
    return keras.Model(inputs, blocks.softmax_head(x, num_classes), name="seed_cnn6")


@register_model("seed-cnn13", default_input=256, params=429_604, family="paper",
                source="001_4b5976a559ffb472.txt", resizable=False, min_input=96,
                summary="13 layers: 5x(Conv valid ReLU + pool), flatten, dense(L2), output",
                train=TrainDefaults(epochs=20, batch_size=32, learning_rate=1e-3))
def seed_cnn13(input_size: int, num_classes: int):
    """Paper 001: 256x256x3, Conv16 3x3 valid ReLU + max-pool, alternating conv/pool.

    13 layers = 5 conv + 5 max-pool + flatten + 2 dense. Widths 16, 32, 64,
    64, 128 and a 64-unit first dense with L2(1e-3) (widths unstated).
    Two classes: one sigmoid unit wrapped by :class:`~.blocks.SigmoidPair`
    into two probabilities (the paper's output, our contract); otherwise softmax.
    """
    inputs, x = blocks.image_input(input_size)
    widths = [16, 32, 64, 64, 128]
    for i, filters in enumerate(widths):
        last = i == len(widths) - 1
        x = layers.Conv2D(filters, 3, padding="valid", activation="relu",
                          name="features" if last else f"conv{i + 1}")(x)
        x = layers.MaxPooling2D(2, name=f"pool{i + 1}")(x)
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dense(64, activation="relu", kernel_regularizer=regularizers.L2(1e-3), name="dense1")(x)
    if num_classes == 2:
        p = layers.Dense(1, activation="sigmoid", name="sigmoid", dtype="float32")(x)
        outputs = blocks.SigmoidPair(name="probabilities", dtype="float32")(p)
    else:
        outputs = blocks.softmax_head(x, num_classes)
    return keras.Model(inputs, outputs, name="seed_cnn13")


@register_model("seed-sequential", default_input=224, params=1_577_988, family="paper",
                source="002_514a77b691e08fb0.txt", resizable=False,
                summary="1 conv, 1 pool, flatten, dense softmax",
                train=TrainDefaults(epochs=20, batch_size=32, learning_rate=1e-3))
def seed_sequential(input_size: int, num_classes: int):
    """Paper 002 "Sequential model": Conv2D(32, 3x3, ReLU), MaxPool2, Flatten, Dense softmax."""
    inputs, x = blocks.image_input(input_size)
    x = layers.Conv2D(32, 3, activation="relu", name="features")(x)
    x = layers.MaxPooling2D(2, name="pool")(x)
    x = layers.Flatten(name="flatten")(x)
    return keras.Model(inputs, blocks.softmax_head(x, num_classes), name="seed_sequential")


@register_model("seed-lenet", default_input=150, params=9_123_416, family="paper",
                source="002_514a77b691e08fb0.txt", resizable=False,
                summary="LeNet-5 on 150 px RGB: conv6-pool-conv16-pool-conv120, dense 84, softmax",
                train=TrainDefaults(epochs=40, batch_size=32, learning_rate=1e-3))
def seed_lenet(input_size: int, num_classes: int):
    """Paper 002 LeNet (img 150, 40 epochs, batch 32): LeNet-5 layers on RGB.

    Conv 6@5x5 - MaxPool2 - Conv 16@5x5 - MaxPool2 - Conv 120@5x5 - Flatten -
    Dense 84 - softmax; ReLU instead of tanh (as the paper's Keras code would).
    """
    inputs, x = blocks.image_input(input_size)
    x = layers.Conv2D(6, 5, activation="relu", name="conv1")(x)
    x = layers.MaxPooling2D(2, name="pool1")(x)
    x = layers.Conv2D(16, 5, activation="relu", name="conv2")(x)
    x = layers.MaxPooling2D(2, name="pool2")(x)
    x = layers.Conv2D(120, 5, activation="relu", name="features")(x)
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dense(84, activation="relu", name="fc1")(x)
    return keras.Model(inputs, blocks.softmax_head(x, num_classes), name="seed_lenet")


@register_model("seed-vgg16", default_input=224, params=134_276_932, family="paper",
                source="002_514a77b691e08fb0.txt", resizable=False,
                summary="VGG16 (13 conv, 3 dense of 4096/4096/classes), no pretrained weights",
                train=TrainDefaults(epochs=10, batch_size=128, learning_rate=1e-4))
def seed_vgg16(input_size: int, num_classes: int):
    """Paper 002 VGGNet: VGG16 at 224 px, trained from scratch (no ImageNet weights).

    Same layers and parameter count as ``keras.applications.VGG16(weights=None)``
    with a ``num_classes`` top; the paper's 10 epochs, batch 128 are the defaults.
    """
    inputs, x = blocks.image_input(input_size)
    for stage, (filters, convs) in enumerate([(64, 2), (128, 2), (256, 3), (512, 3), (512, 3)]):
        for c in range(convs):
            last = stage == 4 and c == convs - 1
            x = layers.Conv2D(filters, 3, padding="same", activation="relu",
                              name="features" if last else f"block{stage + 1}_conv{c + 1}")(x)
        x = layers.MaxPooling2D(2, name=f"block{stage + 1}_pool")(x)
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dense(4096, activation="relu", name="fc1")(x)
    x = layers.Dense(4096, activation="relu", name="fc2")(x)
    return keras.Model(inputs, blocks.softmax_head(x, num_classes), name="seed_vgg16")


@register_model("seed-cnn-aug", default_input=224, params=4_960_708, family="paper",
                source="003_b42d0886fe7605f0.txt", resizable=False,
                summary="Conv/MaxPool/Dropout/Dense Sequential CNN + its augmentation, batch 64, Adam",
                train=TrainDefaults(epochs=30, batch_size=64, learning_rate=1e-3, optimizer="adam",
                                    augment="paper003"))
def seed_cnn_aug(input_size: int, num_classes: int):
    """Paper 003: Sequential Conv2D/MaxPool/Dropout/Dense, trained with augmentation.

    Conv 32/64/128/128 3x3 valid ReLU each + MaxPool2, Dropout(0.5), Flatten,
    Dense 256 ReLU, Dropout(0.5), softmax. The paper's ImageDataGenerator
    recipe (rotation, shifts, shear, zoom, horizontal flip) is the registry's
    ``paper003`` augmentation; batch 64 and Adam are its training defaults.
    """
    inputs, x = blocks.image_input(input_size)
    widths = [32, 64, 128, 128]
    for i, filters in enumerate(widths):
        x = layers.Conv2D(filters, 3, activation="relu",
                          name="features" if i == len(widths) - 1 else f"conv{i + 1}")(x)
        x = layers.MaxPooling2D(2, name=f"pool{i + 1}")(x)
    x = layers.Dropout(0.5, name="dropout1")(x)
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dense(256, activation="relu", name="fc1")(x)
    x = layers.Dropout(0.5, name="dropout2")(x)
    return keras.Model(inputs, blocks.softmax_head(x, num_classes), name="seed_cnn_aug")
