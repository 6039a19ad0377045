"""Colour-consistency training: two views of each image that differ only in colour must agree.

Why: augmentation alone (HED jitter, random grayscale) shows the net colour
changes, but nothing asks it to give the *same* answer to the same cells in
another colour. Here each training image appears twice in its batch, with one
geometric transform and two independent colour draws, and the loss adds the
Jensen-Shannon divergence between the two predicted distributions
(AugMix, Hendrycks et al. 2020, used with two views):

    loss_i = CE(y_i, p_i) + weight * JS(p_a, p_b)   for both views i of a pair

so a net that reads the stain pays for every colour-dependent answer, while
the labels stay the usual cross-entropy.

How it stays inside ``model.fit``: the pipeline emits batches of interleaved
pairs ``[a0, b0, a1, b1, ...]`` (twice the images per step) and
:class:`PairedConsistencyLoss` reshapes the predictions to ``(pairs, 2,
classes)``. The model, its checkpoints and the exported TFLite file are the
plain classifier; nothing of this travels to the device. Under
MirroredStrategy each replica must receive whole pairs, so the trainer drops
the last partial batch and requires the pair batch to divide evenly over the
replicas (checked in :func:`check_replicas`).

The second view's colour recipe is :data:`PAIR_VIEW`: the strongest colour
changes of the ``robust`` recipe with grayscale half of the time. Geometry is
shared, so the only difference between the views is colour.
"""
from __future__ import annotations

from dataclasses import replace

import keras

from ..errors import UsageError
from .augment import AugmentConfig

#: Colour-only changes for the second view (geometry is taken from the first).
PAIR_VIEW = AugmentConfig(flip=False, rot90=False, rotation_deg=0.0, shift=0.0, zoom=0.0, shear_deg=0.0,
                          brightness=0.15, contrast=0.2, hue=0.05, stain=0.1, hed=0.2, grayscale=0.5)


def colour_only(cfg: AugmentConfig) -> AugmentConfig:
    """The colour part of a recipe (geometry, scale jitter included, switched off)."""
    return replace(cfg, flip=False, rot90=False, rotation_deg=0.0, shift=0.0, zoom=0.0, shear_deg=0.0,
                   scale_jitter=0.0)


def geometry_only(cfg: AugmentConfig) -> AugmentConfig:
    """The geometric part of a recipe (colour switched off)."""
    return replace(cfg, brightness=0.0, contrast=0.0, hue=0.0, stain=0.0, hed=0.0, grayscale=0.0)


def describe(weight: float) -> dict:
    """What goes into ``config.json`` (``extra.consistency``)."""
    return {"weight": float(weight), "divergence": "Jensen-Shannon between two colour views (AugMix)",
            "second_view": {k: v for k, v in PAIR_VIEW.to_dict().items() if v}, "images_per_step": "2 x batch"}


def check_weight(weight: float) -> float:
    if not (0.0 <= weight <= 100.0):
        raise UsageError(f"--consistency must be in [0, 100], got {weight}",
                         hint="0 turns it off; 5-20 is the usual range")
    return float(weight)


def check_replicas(batch_size: int, replicas: int) -> None:
    """Every replica must get whole pairs: ``2 * batch`` images split evenly, an even number each."""
    if replicas > 1 and batch_size % replicas:
        raise UsageError(f"--consistency with {replicas} devices needs --batch divisible by {replicas} "
                         f"(got {batch_size}), so that no pair of views is split across devices")


@keras.saving.register_keras_serializable(package="leukoedge")
class PairedConsistencyLoss(keras.losses.Loss):
    """Cross-entropy per image plus ``weight`` x Jensen-Shannon divergence within each adjacent pair.

    ``y_pred`` holds probabilities for ``[a0, b0, a1, b1, ...]``; the
    divergence of pair ``k`` is added to both of its images, so class weights
    (applied per image by Keras) weight it like the label loss.
    """

    def __init__(self, weight: float = 10.0, name: str = "paired_consistency", **kwargs) -> None:
        super().__init__(name=name, **kwargs)
        self.weight = float(weight)

    def call(self, y_true, y_pred):
        ops = keras.ops
        y_pred = ops.cast(y_pred, "float32")
        ce = keras.losses.sparse_categorical_crossentropy(y_true, y_pred)
        p = ops.clip(y_pred, 1e-7, 1.0)
        pairs = ops.reshape(p, (-1, 2, ops.shape(p)[-1]))
        mix = ops.mean(pairs, axis=1, keepdims=True)
        kl = ops.sum(pairs * (ops.log(pairs) - ops.log(mix)), axis=-1)  # (pairs, 2)
        js = ops.mean(kl, axis=1)  # (pairs,)
        return ce + self.weight * ops.reshape(ops.repeat(js[:, None], 2, axis=1), (-1,))

    def get_config(self) -> dict:
        return {**super().get_config(), "weight": self.weight}
