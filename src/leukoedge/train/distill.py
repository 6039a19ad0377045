"""Knowledge distillation: a student trained on the answers of finished teacher runs as well as the labels.

Why (issue 18): the accurate nets read the stain and the stain-robust nets are
less accurate; an ensemble of both is accurate and robust but costs several
invokes per tile on the device. Distillation moves what a teacher knows into
one compact student (Hinton et al. 2015): the student is trained with strong
colour augmentation (it sees grayscale, re-stained, zoomed fields) while its
targets are the teachers' probabilities for the *un-augmented* image, so a
colour-reading teacher can teach a student that may not read colour.

How:

- Teachers are finished run directories (``--teacher RUN``, repeatable) with
  the student's classes in the student's order. Each reads the student's
  training images through its own preprocessing spec (its input size, colour
  step and scale), exactly as it was trained to see them; their probabilities
  are averaged (an ensemble teacher). The targets are computed once, before
  the first epoch (and again on ``--resume``, after checking that no teacher's
  ``model.keras`` changed): offline distillation, so a step costs what a plain
  step costs.
- Loss per image (:class:`DistillationLoss`)::

      (1 - alpha) * CE(label, p) + alpha * T^2 * KL(q_T || p_T)

  with ``q`` the teachers' mean probabilities and ``x_T`` the distribution
  re-tempered at ``T`` (``softmax(log x / T)``, which is the temperature on
  the logits, since the models end in a softmax). Class weights multiply it
  per image, as for the plain loss. Validation is scored with the plain
  cross-entropy on the true labels, so early stopping and the kept epoch
  answer the usual question.
- Honesty: a teacher that trained (or chose its checkpoint) on the student's
  test images, or trained on its validation images, would leak them into the
  student's figures; such a teacher is refused (paths compared within the
  dataset root). A teacher trained on the whole dataset cannot teach a
  cross-validation run for the same reason, so ``--folds`` with ``--teacher``
  is refused by the CLI.

Nothing of this travels to the device: the exported model is the plain student.
"""
from __future__ import annotations

import logging
from pathlib import Path

import keras
import numpy as np

from ..data.records import Manifest
from ..errors import RunError, UsageError
from ..files import sha256_file
from .rundir import RunDir, read_json

log = logging.getLogger(__name__)
#: Defaults of ``--distill-weight`` and ``--temperature``. Measured (benchmarks/results/accuracy.md, leuko-small,
#: robust augmentation, 4 teachers, int8 test block): T 1 gave 95.7 % +- 1.6 over 3 seeds, T 2 93.2 % over 2.
DEFAULT_ALPHA = 0.5
DEFAULT_TEMPERATURE = 1.0


def check_options(alpha: float, temperature: float) -> None:
    if not (0.0 <= alpha <= 1.0):
        raise UsageError(f"--distill-weight must be in [0, 1], got {alpha:g}",
                         hint="the share of the loss taken from the teachers; 0.5 is the default")
    if not (0.5 <= temperature <= 20.0):
        raise UsageError(f"--temperature must be in [0.5, 20], got {temperature:g}", hint="1-4 is the usual range")


class Teacher:
    """One finished run used as a teacher: its model, its preprocessing and the digest of its weights."""

    def __init__(self, run_dir: str | Path) -> None:
        rd = RunDir(Path(run_dir))
        if rd.is_cv:
            raise UsageError(f"--teacher {run_dir} is a cross-validation run",
                             hint="give one of its fold runs, or a run trained on one split")
        if not rd.path.is_dir():
            raise UsageError(f"--teacher {run_dir}: no such run directory")
        rd.require(rd.config_path, rd.manifest_path, rd.model_path)
        state = rd.path / "state.json"
        if state.exists():
            if not read_json(state).get("finished"):
                raise UsageError(f"--teacher {run_dir} has not finished training",
                                 hint=f"finish it first: leukoedge train --out {run_dir} --resume")
        self.path = rd.path.resolve()
        self.config = rd.config()
        self.manifest = rd.manifest()
        self.model_path = rd.model_path
        self.sha256 = sha256_file(rd.model_path)

    def check_student(self, classes: tuple[str, ...], manifest: Manifest) -> None:
        """Refuse a teacher with other classes, or one that has seen the student's held-out images."""
        if tuple(self.config.classes) != tuple(classes):
            raise UsageError(f"--teacher {self.path} predicts {', '.join(self.config.classes)}; the student's "
                             f"classes are {', '.join(classes)}",
                             hint="a teacher must have the student's classes in the same order")
        seen = {split: {(e.root, e.path) for e in self.manifest.subset(split)} for split in ("train", "val")}
        rules = (("test", ("train", "val")), ("val", ("train",)))
        for student_split, teacher_splits in rules:
            held = {(e.root, e.path) for e in manifest.subset(student_split)}
            for teacher_split in teacher_splits:
                both = sorted(held & seen[teacher_split])
                if both:
                    raise UsageError(
                        f"--teacher {self.path} used {len(both)} of the student's {student_split} images in its "
                        f"{teacher_split} split (e.g. {both[0][1]}): the student's {student_split} figures would "
                        "not be held out", hint="use teachers trained on the student's manifest (same train split)")

    def record(self) -> dict:
        return {"run": str(self.path), "model": self.config.model, "input_size": self.config.input_size,
                "colour": self.config.colour, "sha256": self.sha256}


def open_teachers(paths, classes: tuple[str, ...], manifest: Manifest) -> list[Teacher]:
    """The ``--teacher`` runs, opened and checked against the student before anything is written."""
    teachers = [Teacher(p) for p in paths]
    if len({t.path for t in teachers}) != len(teachers):
        raise UsageError("the same --teacher run is given twice")
    for t in teachers:
        t.check_student(classes, manifest)
    return teachers


def reopen_teachers(record: dict) -> list[Teacher]:
    """The teachers of a run being resumed, refused if any teacher's weights changed since it started."""
    teachers = []
    for entry in record["teachers"]:
        t = Teacher(entry["run"])
        if t.sha256 != entry["sha256"]:
            raise RunError(f"the teacher {entry['run']} changed since the run started "
                           f"(model.keras sha256 {t.sha256[:12]} vs {entry['sha256'][:12]})",
                           hint="start the run again with another --out")
        teachers.append(t)
    return teachers


def soft_targets(teachers: list[Teacher], manifest: Manifest, split: str, cache, root) -> tuple[np.ndarray, list]:
    """``(mean teacher probabilities [N, C] float32, per-teacher probabilities)`` on one split, un-augmented.

    Each teacher reads the images through its own preprocessing spec (the
    cache keys by spec, so a teacher with the student's spec reuses the
    student's arrays).
    """
    from .dataset import load_split

    each = []
    for t in teachers:
        x, _, _ = load_split(manifest, split, t.config.preprocess_spec, cache, root)
        model = keras.models.load_model(t.model_path, compile=False)
        probs = np.concatenate([np.asarray(model(x[i:i + 64].astype("float32"), training=False), dtype=np.float64)
                                for i in range(0, len(x), 64)])
        each.append(probs)
        del model
    return np.mean(each, axis=0).astype(np.float32), each


def target_rows(labels: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """``[label, q_1..q_C]`` per image: what :class:`DistillationLoss` reads as ``y_true``."""
    return np.concatenate([labels[:, None].astype(np.float32), probs.astype(np.float32)], axis=1)


def describe(teachers: list[Teacher], alpha: float, temperature: float, labels: np.ndarray,
             probs: np.ndarray, each: list) -> dict:
    """What goes into ``config.json`` (``extra.distill``): teachers, weights, and how good the targets are."""
    return {"teachers": [{**t.record(), "train_accuracy": round(float(np.mean(p.argmax(1) == labels)), 6)}
                         for t, p in zip(teachers, each)],
            "alpha": float(alpha), "temperature": float(temperature),
            "targets": "mean of the teachers' probabilities on the un-augmented training images (offline)",
            "target_train_accuracy": round(float(np.mean(probs.argmax(1) == labels)), 6),
            "target_mean_confidence": round(float(probs.max(1).mean()), 6)}


def describe_loss(alpha: float, temperature: float, n_teachers: int) -> str:
    return (f"{1 - alpha:g} x class-weighted cross-entropy + {alpha:g} x T^2 KL to {n_teachers} teacher(s) at "
            f"T = {temperature:g} (distillation; validation: cross-entropy)")


def _labels_of(y_true):
    ops = keras.ops
    return ops.reshape(y_true[:, 0], (-1,)) if len(y_true.shape) == 2 and y_true.shape[-1] != 1 \
        else ops.reshape(y_true, (-1,))


@keras.saving.register_keras_serializable(package="leukoedge")
class DistillationLoss(keras.losses.Loss):
    """``(1 - alpha) CE + alpha T^2 KL(q_T || p_T)`` on ``y_true = [label, q...]``; plain CE on bare labels."""

    def __init__(self, alpha: float = DEFAULT_ALPHA, temperature: float = DEFAULT_TEMPERATURE,
                 name: str = "distillation", **kwargs) -> None:
        super().__init__(name=name, **kwargs)
        self.alpha, self.temperature = float(alpha), float(temperature)

    def call(self, y_true, y_pred):
        ops = keras.ops
        p = ops.clip(ops.cast(y_pred, "float32"), 1e-7, 1.0)
        ce = keras.losses.sparse_categorical_crossentropy(_labels_of(y_true), p)
        if not (len(y_true.shape) == 2 and y_true.shape[-1] == p.shape[-1] + 1):
            return ce  # validation / evaluation: bare labels
        q = ops.clip(ops.cast(y_true[:, 1:], "float32"), 1e-7, 1.0)
        t = self.temperature
        log_p = ops.log_softmax(ops.log(p) / t, axis=-1)
        log_q = ops.log_softmax(ops.log(q) / t, axis=-1)
        kl = ops.sum(ops.exp(log_q) * (log_q - log_p), axis=-1)
        return (1.0 - self.alpha) * ce + self.alpha * t * t * kl

    def get_config(self) -> dict:
        return {**super().get_config(), "alpha": self.alpha, "temperature": self.temperature}


@keras.saving.register_keras_serializable(package="leukoedge")
class LabelAccuracy(keras.metrics.MeanMetricWrapper):
    """Accuracy against the label column of ``[label, q...]`` targets (or bare labels), named ``accuracy``."""

    def __init__(self, name: str = "accuracy", dtype=None) -> None:
        super().__init__(_label_accuracy, name=name, dtype=dtype)

    def get_config(self) -> dict:
        return {"name": self.name, "dtype": self.dtype}


def _label_accuracy(y_true, y_pred):
    ops = keras.ops
    labels = ops.cast(_labels_of(y_true), "int32")
    return ops.cast(ops.equal(ops.cast(ops.argmax(y_pred, axis=-1), "int32"), labels), "float32")
