"""Weight averaging (``--ema M``): validate, keep and export the moving average of the weights.

Why: with a stochastic augmentation recipe (``robust``: colour, blur, noise,
scale) the weights after any one step sit somewhere in a noisy valley; the
exponential moving average of the recent weights (Polyak averaging; Izmailov
et al. 2018 call the flat-average variant SWA) sits nearer its centre, and
the epoch that ``--select`` keeps is chosen from averaged weights too.

How it fits the trainer (one rule: the optimizer only ever sees the raw
weights, everything that reads the model after an epoch sees the average):

- after every training batch the average is updated in numpy:
  ``avg = M * avg + (1 - M) * w`` over the trainable variables, starting at
  the first step's weights (no bias towards the random initialisation);
- after the last batch of an epoch the average is swapped INTO the model
  (this callback is listed before :class:`~.trainer.PreciseBatchNorm`, so the
  BatchNorm statistics are then measured for the averaged weights), validation
  runs on it, and ``model.keras`` is saved from it when the epoch is kept;
- :meth:`WeightAverage.restore_training_weights` (called by the run
  checkpoint before ``last.keras``) puts the raw weights back and writes the
  average to ``last_average.npz`` atomically, so ``--resume`` continues the
  same average over the same raw weights.

BatchNorm's moving statistics are not averaged (they are not trainable); they
are re-measured for whatever weights are in the model. Works under any
distribution strategy: variables are read and assigned in cross-replica
context. Costs one copy of the trainable weights and a numpy update per step
(~0.1 M parameters for leuko-small: negligible beside the step).
"""
from __future__ import annotations

from pathlib import Path

import keras
import numpy as np

from ..errors import RunError, UsageError
from ..files import atomic_path

#: A horizon of ~1/(1-M) = 100 steps: ~3.5 epochs of the Taleqani train split at batch 64.
SUGGESTED_MOMENTUM = 0.99


def check_momentum(momentum: float) -> None:
    """``--ema`` must be a momentum in (0, 1): 0 would be the raw weights, 1 the first step's forever."""
    if not 0.0 < float(momentum) < 1.0:
        raise UsageError(f"--ema must be a momentum in (0, 1), got {momentum:g}",
                         hint=f"{SUGGESTED_MOMENTUM} averages over ~100 steps; 0.999 over ~1000")


def describe(momentum: float) -> dict:
    """The record in ``config.json["extra"]["averaging"]`` (and the card's line)."""
    return {"kind": "ema", "momentum": float(momentum), "horizon_steps": round(1.0 / (1.0 - float(momentum))),
            "what": "validation, the kept epoch and the exported model use the exponential moving average "
                    "of the trainable weights; BatchNorm statistics are re-measured for it"}


class WeightAverage(keras.callbacks.Callback):
    """Exponential moving average of the trainable weights; see the module docstring.

    Args:
        momentum: ``M`` in ``avg = M * avg + (1 - M) * w``.
        steps: training steps per epoch (the swap happens after the last one).
        path: where the average survives between epochs (``last_average.npz``).
        resume: continue from ``path`` (it must exist and match the model's variables).
    """

    def __init__(self, momentum: float, steps: int, path: Path, *, resume: bool = False) -> None:
        super().__init__()
        check_momentum(momentum)
        self.momentum, self.steps, self.path, self.resume = float(momentum), int(steps), Path(path), resume
        self.average: list[np.ndarray] | None = None
        self._raw: list[np.ndarray] | None = None

    def _variables(self):
        return self.model.trainable_variables

    def on_train_begin(self, logs=None):
        if self.resume and self.average is None:
            self.average = self.load(self.path, [v.shape for v in self._variables()])

    def on_train_batch_end(self, batch, logs=None):
        current = [np.asarray(keras.ops.convert_to_numpy(v), np.float32) for v in self._variables()]
        if self.average is None:
            self.average = [w.copy() for w in current]
        else:
            m = self.momentum
            for avg, w in zip(self.average, current):
                avg *= m
                avg += (1.0 - m) * w
        if batch == self.steps - 1:
            self._swap_in(current)

    def _swap_in(self, current: list[np.ndarray]) -> None:
        self._raw = current
        for var, avg in zip(self._variables(), self.average):
            var.assign(avg.astype(var.dtype))

    def restore_training_weights(self) -> None:
        """Raw weights back into the model (the optimizer continues from them); the average saved to disk."""
        if self._raw is not None:
            for var, raw in zip(self._variables(), self._raw):
                var.assign(raw.astype(var.dtype))
            self._raw = None
        if self.average is not None:
            with atomic_path(self.path) as tmp:
                with open(tmp, "wb") as fh:
                    np.savez(fh, *self.average)

    @staticmethod
    def load(path: Path, shapes) -> list[np.ndarray]:
        """The saved average, checked against the model's variable shapes (RunError if absent or another net's)."""
        try:
            with np.load(path) as data:
                arrays = [data[f"arr_{i}"].astype(np.float32) for i in range(len(data.files))]
        except (OSError, ValueError, KeyError) as err:
            raise RunError(f"cannot read the weight average {path}: {err}",
                           hint="the run was trained with --ema; its last_average.npz is missing or damaged") from None
        if [tuple(a.shape) for a in arrays] != [tuple(s) for s in shapes]:
            raise RunError(f"{path} does not match the model's weights",
                           hint="last_average.npz belongs to another run")
        return arrays
