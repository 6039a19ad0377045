"""Label smoothing (``--label-smoothing E``): train towards ``(1 - E) one-hot + E / C`` instead of the one-hot label.

Why: cross-entropy on hard labels keeps pushing an already right answer
towards probability 1, which on a few thousand fields means fitting the last
few ambiguous (or mislabelled) images with large weights; smoothing caps the
target at ``1 - E + E / C`` (Szegedy et al. 2016, Mueller et al. 2019).

The loss per image, from the model's softmax probabilities ``p`` over ``C``
classes and the integer label ``y``::

    (1 - E) * -log p_y  +  E * mean_c(-log p_c)

which is the cross-entropy to the smoothed target written without building
it. Class weights apply per image as for the plain loss. Keras scores
validation with the training loss, so ``val_loss`` (and the epoch that
``--select val_loss`` keeps) is the smoothed loss too: the criterion the net
was trained for. Nothing of this reaches the bundle: the OOD threshold is a
percentile of validation confidence, measured on the smoothed net itself.
"""
from __future__ import annotations

import keras

from ..errors import UsageError

#: The usual value (Inception v3, Mueller et al.): the target of the true class becomes 0.9 + 0.1 / C.
SUGGESTED_EPSILON = 0.1


def check_epsilon(epsilon: float) -> float:
    """``E`` in [0, 0.5): 0 is the plain loss; at 0.5 and above the label no longer dominates a 2-class target."""
    if not 0.0 <= float(epsilon) < 0.5:
        raise UsageError(f"--label-smoothing must be in [0, 0.5), got {epsilon:g}",
                         hint=f"{SUGGESTED_EPSILON} is the usual value; 0 turns it off")
    return float(epsilon)


def describe_loss(epsilon: float) -> str:
    """The loss line of ``config.json`` and the model card."""
    return f"sparse categorical cross-entropy with label smoothing {epsilon:g}, class-weighted"


@keras.saving.register_keras_serializable(package="leukoedge")
class SmoothedCrossEntropy(keras.losses.Loss):
    """Cross-entropy from probabilities to the label smoothed by ``epsilon`` (see the module docstring)."""

    def __init__(self, epsilon: float = SUGGESTED_EPSILON, name: str = "smoothed_cross_entropy", **kwargs) -> None:
        super().__init__(name=name, **kwargs)
        self.epsilon = check_epsilon(epsilon)

    def call(self, y_true, y_pred):
        ops = keras.ops
        p = ops.clip(ops.cast(y_pred, "float32"), 1e-7, 1.0)
        nll = -ops.log(p)
        label = ops.cast(ops.reshape(y_true, (-1,)), "int32")
        hard = ops.take_along_axis(nll, label[:, None], axis=-1)[:, 0]
        return (1.0 - self.epsilon) * hard + self.epsilon * ops.mean(nll, axis=-1)

    def get_config(self) -> dict:
        return {**super().get_config(), "epsilon": self.epsilon}
