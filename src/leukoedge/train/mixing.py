"""Mixup and CutMix (``--mix mixup|cutmix``): train on blends of two training images with a blended label.

Why: the colour-robust recipe leaves a single leuko-small at 96-97 % on the
next capture block, its errors almost all Benign <-> Early Pre-B. Hard labels
push the net to a sharp boundary placed by the few fields nearest it; training
on convex blends of fields (mixup, Zhang et al. 2018) or on a field with a
rectangle pasted from another (CutMix, Yun et al. 2019), each with the label
blended in the same proportion, asks for probabilities that change linearly
between fields, which regularises exactly that boundary.

How it runs (tf.data, after the per-image augmentation and batching, so it
costs a few tensor ops per batch and nothing on the device):

- each image ``i`` of a batch is paired with another image of the same batch
  (a random cyclic shift of a random order, so never with itself when the
  batch holds two or more);
- with probability ``probability`` it is mixed, with ``lam ~ Beta(alpha, alpha)``
  (unmixed images keep ``lam = 1``): mixup blends the pixels
  ``lam * x_i + (1 - lam) * x_j``; CutMix pastes a rectangle of ``x_j`` whose
  side is ``sqrt(1 - lam)`` of the image's at a uniform centre, clipped at the
  border, and ``lam`` becomes the share of pixels left from ``x_i``;
- the target row is ``[major label, lam * onehot(y_i) + (1 - lam) * onehot(y_j)]``
  (the major label, the one with the larger share, is what the training
  accuracy counts), and the image's weight is ``lam * w(y_i) + (1 - lam) * w(y_j)``
  from the class weights, so a rare class keeps its weight inside a blend.

Everything is drawn statelessly from (seed, epoch, batch), so a resumed run
mixes the same pairs as an uninterrupted one. :class:`MixedCrossEntropy`
scores the blended targets (with ``--label-smoothing`` on top) and plain
labels, so validation, which is never mixed, reports ordinary (smoothed)
cross-entropy.
"""
from __future__ import annotations

from dataclasses import dataclass

import keras

from ..errors import UsageError
from .smoothing import SmoothedCrossEntropy

METHODS = ("mixup", "cutmix")
#: The values of the papers for ImageNet-size training: mixup keeps most blends near one image.
DEFAULT_ALPHA = {"mixup": 0.2, "cutmix": 1.0}
DEFAULT_PROBABILITY = 0.5


def check_mixing(method: str, alpha: float | None = None, probability: float | None = None) -> dict:
    """The validated record of ``config.json["extra"]["mixing"]`` (defaults filled)."""
    if method not in METHODS:
        raise UsageError(f"--mix must be one of {', '.join(METHODS)}, got {method!r}")
    alpha = DEFAULT_ALPHA[method] if alpha is None else float(alpha)
    probability = DEFAULT_PROBABILITY if probability is None else float(probability)
    if not 0.0 < alpha <= 10.0:
        raise UsageError(f"--mix-alpha must be in (0, 10], got {alpha:g}",
                         hint=f"Beta(alpha, alpha) draws the share: {DEFAULT_ALPHA['mixup']} keeps most mixup blends "
                              f"near one image, {DEFAULT_ALPHA['cutmix']} makes any CutMix share equally likely")
    if not 0.0 < probability <= 1.0:
        raise UsageError(f"--mix-prob must be in (0, 1], got {probability:g}",
                         hint="the share of training images that are mixed; drop --mix to turn mixing off")
    return {"method": method, "alpha": alpha, "probability": probability}


def describe(record: dict) -> str:
    """The clause the loss line of ``config.json`` and the model card carry."""
    return (f"{record['method']} blends (alpha {record['alpha']:g}, {100 * record['probability']:.0f} % of the "
            f"training images; labels and class weights blended alike)")


@dataclass(frozen=True)
class Mixer:
    """Mixes one batch of ``(images, labels)`` into ``(images, target rows, weights)``; see the module docstring."""

    method: str
    alpha: float
    probability: float
    class_weights: tuple[float, ...]

    @classmethod
    def from_record(cls, record: dict, class_weights: dict[int, float]) -> "Mixer":
        checked = check_mixing(record["method"], record["alpha"], record["probability"])
        return cls(checked["method"], checked["alpha"], checked["probability"],
                   tuple(float(class_weights[c]) for c in range(len(class_weights))))

    @property
    def num_classes(self) -> int:
        return len(self.class_weights)

    def __call__(self, images, labels, key):
        """``key``: int64 ``[2]`` stateless seed of this batch. Images float32 ``[B, H, W, 3]``, labels int ``[B]``."""
        import tensorflow as tf

        labels = tf.cast(tf.reshape(labels, [-1]), tf.int32)
        b = tf.shape(labels)[0]
        keys = [key + tf.constant([k * 1_000_033, 0], tf.int64) for k in range(1, 6)]
        order = tf.argsort(tf.random.stateless_uniform([b], keys[0]))
        partner = tf.scatter_nd(order[:, None], tf.roll(order, -1, 0), [b])
        g1 = tf.random.stateless_gamma([b], keys[1], alpha=self.alpha)
        g2 = tf.random.stateless_gamma([b], keys[2], alpha=self.alpha)
        lam = g1 / tf.maximum(g1 + g2, 1e-12)
        mixed = tf.random.stateless_uniform([b], keys[3]) < self.probability
        lam = tf.where(mixed, lam, tf.ones_like(lam))
        other = tf.gather(images, partner)
        if self.method == "mixup":
            share = lam[:, None, None, None]
            images = share * images + (1.0 - share) * other
        else:
            images, lam = _paste_boxes(images, other, lam, keys[4])
        hot = tf.one_hot(labels, self.num_classes)
        target = lam[:, None] * hot + (1.0 - lam[:, None]) * tf.gather(hot, partner)
        major = tf.where(lam >= 0.5, labels, tf.gather(labels, partner))
        table = tf.constant(self.class_weights, tf.float32)
        weights = lam * tf.gather(table, labels) + (1.0 - lam) * tf.gather(table, tf.gather(labels, partner))
        rows = tf.concat([tf.cast(major, tf.float32)[:, None], target], axis=-1)
        return images, rows, weights


def _paste_boxes(images, other, lam, key):
    """CutMix: paste a box of ``other`` of area ~``(1 - lam)`` into each image; returns the true shares kept."""
    import tensorflow as tf

    shape = tf.shape(images)
    b, h, w = shape[0], shape[1], shape[2]
    hf, wf = tf.cast(h, tf.float32), tf.cast(w, tf.float32)
    side = tf.sqrt(1.0 - lam)
    centre = tf.random.stateless_uniform([b, 2], key)
    cy, cx = centre[:, 0] * hf, centre[:, 1] * wf
    y0 = tf.cast(tf.round(tf.clip_by_value(cy - side * hf / 2, 0.0, hf)), tf.int32)
    y1 = tf.cast(tf.round(tf.clip_by_value(cy + side * hf / 2, 0.0, hf)), tf.int32)
    x0 = tf.cast(tf.round(tf.clip_by_value(cx - side * wf / 2, 0.0, wf)), tf.int32)
    x1 = tf.cast(tf.round(tf.clip_by_value(cx + side * wf / 2, 0.0, wf)), tf.int32)
    rows = tf.range(h)[None, :, None]
    cols = tf.range(w)[None, None, :]
    box = (rows >= y0[:, None, None]) & (rows < y1[:, None, None]) & (cols >= x0[:, None, None]) & (
        cols < x1[:, None, None])
    kept = 1.0 - tf.cast((y1 - y0) * (x1 - x0), tf.float32) / (hf * wf)
    return tf.where(box[..., None], other, images), kept


@keras.saving.register_keras_serializable(package="leukoedge")
class MixedCrossEntropy(SmoothedCrossEntropy):
    """Cross-entropy to blended targets ``[label, q...]`` (training) or to plain labels (validation).

    ``epsilon`` smooths whichever target: ``(1 - E) q + E / C`` (``--label-smoothing``; 0 = off).
    """

    def __init__(self, epsilon: float = 0.0, name: str = "mixed_cross_entropy", **kwargs) -> None:
        super().__init__(epsilon, name=name, **kwargs)

    def call(self, y_true, y_pred):
        ops = keras.ops
        if not (len(y_true.shape) == 2 and y_true.shape[-1] == y_pred.shape[-1] + 1):
            return super().call(y_true, y_pred)  # plain labels: validation and evaluation
        nll = -ops.log(ops.clip(ops.cast(y_pred, "float32"), 1e-7, 1.0))
        q = ops.cast(y_true[:, 1:], "float32")
        return (1.0 - self.epsilon) * ops.sum(q * nll, axis=-1) + self.epsilon * ops.mean(nll, axis=-1)
