"""Train one registry model on a manifest into a run directory.

The story is linear (keras-io style): options -> run directory -> cached
arrays -> tf.data -> model -> fit -> history -> evaluation. Choices:

- Determinism: ``keras.utils.set_random_seed`` + op determinism, and a data
  pipeline that is a pure function of ``(seed, epoch)`` (see :mod:`.dataset`).
  The same seed on the same machine gives identical weights and history.
- Imbalance: inverse-frequency class weights (recorded in ``config.json``).
- Schedule: cosine decay per epoch from the peak learning rate to 1 % of it,
  computed from the epoch number alone so a resumed run continues the same
  curve. Early stopping (patience in epochs) on the selection criterion,
  whose counter lives in ``state.json`` so it survives ``--resume``.
- Checkpoint selection (``--select``): ``val_loss`` keeps the epoch with the
  lowest validation loss; ``val_accuracy`` the highest validation accuracy,
  ties broken by the lower validation loss (on 40 validation images accuracy
  moves in steps of 2.5 % and ties are common). The kept epoch and its
  figures are logged and go to ``history.json`` (``kept_epoch``, ``kept``)
  and the model card, because "epochs 9 of max 40" alone hides that the
  model is epoch 1. On small data validation loss can rise from the first
  epoch while validation accuracy still improves (over-confident errors
  dominate the loss), so the loss alone may keep an under-trained epoch.
- "Precise" BatchNorm statistics (Wu & Johnson 2021): moving mean/variance
  start at 0/1 and, with momentum 0.99, keep ``0.99**steps`` of that start
  and lag the weights by ~100 steps. A net whose true activation variance is
  ~0.005 then predicts one class in inference mode for its first ~500
  steps, and early stopping stops it there. So before the first epoch and at
  the end of every epoch (before validation), one training-mode forward pass
  over up to 256 fixed, un-augmented training images sets every BN layer's
  moving statistics to the measured ones (:class:`BatchNormCalibrator`):
  validation, checkpoints and the converted model all use statistics of the
  current weights.
- Checkpoints: best by the selection criterion -> ``model.keras``; every epoch ->
  ``last.keras`` (with optimizer state) + ``state.json``; both written
  atomically (temp + rename).
- Scale (issue 15): a new run records the training images' um/px in
  ``config.json["scale"]``, given (``um_per_px``) or measured on the TRAINING
  split's red cells (:mod:`.training_scale`); a failed measurement is a
  warning and an unknown scale, never a failed run. The spec, the card and the
  bundle carry it; the pixels trained on do not depend on it.
- Initial weights (issue 18): random, or ``init`` (``--init leukoedge-smear``): a
  pretrained backbone copied into every layer but the classifier
  (:mod:`leukoedge.models.pretrained`), opened and checked before the run
  directory is written; its digest and data provenance go to ``config.json``
  and the card. Nothing else changes (the learning rate stays the model's:
  a quarter of it under-trained the new classifier on the 8-type PBC task,
  73 % against 81 % on fold 1 in 40 epochs). BatchNorm statistics are
  re-measured on the lab's images before the first epoch, as for any run.
- Distillation (issue 18): ``teachers`` (``--teacher RUN``) are finished runs
  whose mean probabilities on the un-augmented training images become soft
  targets beside the labels (:mod:`.distill`); the targets and their accuracy
  go to ``config.json["extra"]["distill"]``, the loss line of the card names
  them, and validation stays plain cross-entropy.
- Weight averaging (issue 18): ``ema`` (``--ema M``) validates, keeps and
  exports the exponential moving average of the weights while the optimizer
  continues from the raw ones (:mod:`.averaging`); the average survives
  ``--resume`` in ``last_average.npz``.
- Label smoothing (issue 18): ``label_smoothing`` (``--label-smoothing E``)
  trains towards ``(1 - E) one-hot + E / C`` (:mod:`.smoothing`); validation
  loss is the same smoothed loss.
- Mixup / CutMix (issue 18): ``mix`` (``--mix mixup|cutmix``, ``--mix-alpha``,
  ``--mix-prob``) blends augmented training batches with themselves and
  their labels and class weights in the same shares (:mod:`.mixing`); the
  class weights then travel inside the batches instead of ``class_weight``,
  and validation (never mixed) is plain (or smoothed) cross-entropy.
- Devices: ``MirroredStrategy`` over all GPUs when there are several, mixed
  float16 when any GPU is present (the ``probabilities`` layer stays float32);
  plain CPU otherwise. ``distribute="mirrored"`` forces MirroredStrategy over
  the visible logical devices (how the tests exercise the multi-device path).

What can fail: :class:`UsageError` (bad options, an existing run without
``--resume``, a resume whose options contradict the run), :class:`RunError`
(resume of an incomplete run), :class:`DatasetError` (empty split, unreadable
image, a class with no training images).

Imports Keras/TensorFlow: the CLI imports this module inside its handler only.
"""
from __future__ import annotations

import logging
import math
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import keras
import numpy as np
from tqdm import tqdm

from .. import __version__
from ..data.records import Manifest
from ..errors import DatasetError, LeukoEdgeError, RunError, UsageError
from ..files import atomic_path, write_json
from ..models.pretrained import apply_backbone, load_backbone, source_key
from ..preprocess import PreprocessSpec
from .augment import recipe, run_recipe
from .averaging import WeightAverage, check_momentum
from .averaging import describe as describe_averaging
from .consistency import PairedConsistencyLoss, check_replicas, check_weight, describe
from .dataset import (ImageCache, class_weights, eval_dataset, load_split, steps_per_epoch, train_dataset,
                      white_cell_masks)
from .distill import (DEFAULT_ALPHA, DEFAULT_TEMPERATURE, DistillationLoss, LabelAccuracy, check_options,
                      describe_loss, open_teachers, reopen_teachers, soft_targets, target_rows)
from .distill import describe as describe_distill
from .mixing import MixedCrossEntropy, Mixer, check_mixing
from .mixing import describe as describe_mixing
from .rundir import RunConfig, RunDir, read_json
from .smoothing import SmoothedCrossEntropy, check_epsilon
from .smoothing import describe_loss as describe_smoothed_loss
from .training_scale import check_rbc_um, check_um_per_px, training_scale

log = logging.getLogger(__name__)
DISTRIBUTE = ("auto", "mirrored", "none")
#: Checkpoint selection criteria (``--select``); see the module docstring.
SELECT_CHOICES = ("val_loss", "val_accuracy")
#: Measured (issue 14, DEVELOPERS.md): 5-fold CV of leuko-small on 260 Taleqani images gave the same test
#: accuracy under both criteria; val_accuracy on 40 val images mostly ties at 100 % and falls back to the loss.
DEFAULT_SELECT = "val_loss"


@dataclass(frozen=True)
class TrainOptions:
    """Everything ``train`` needs, built once from the CLI.

    Attributes:
        out: run directory to create (or continue with ``resume``).
        model: registry name.
        manifest: the split manifest (ignored on resume: the run's copy is used).
        data_root: dataset root, or one per root of a manifest of several (in its order); overrides
            the manifest's roots when the data moved (see ``Manifest.roots_for``).
        epochs / batch_size / learning_rate / input_size: None -> registry defaults.
        seed: seeds weights, order, augmentation and dropout.
        augment: recipe name (``default``, ``paper003``, ``robust``, ``none``); None -> registry default.
        colour: the preprocessing colour step (see ``leukoedge.preprocess.COLOUR_STEPS``); it
            travels in the run config and the bundle, so the device applies it too.
        resume: continue from ``last.keras`` + ``state.json``.
        patience: early-stopping patience in epochs (counted on the ``select`` criterion).
        select: checkpoint selection, one of :data:`SELECT_CHOICES`; None = :data:`DEFAULT_SELECT`
            for a new run and the run's own criterion on resume.
        distribute: ``auto`` | ``mirrored`` | ``none`` (see module docstring).
        evaluate: run ``evaluate_run`` on val + test at the end.
        ood_dirs: OOD folders for the final evaluation's AUROC.
        audit: after the evaluation, run the shortcut audit on test (``audit.json``
            and the card's "Shortcut audit" section), so every model card says
            what the model reads; off = the card tells how to run it later.
        consistency: weight of the colour-consistency loss (:mod:`.consistency`); 0 = off,
            None = 0 for a new run and the run's own value on resume.
        um_per_px: the training images' pixel size in micrometres (``--um-per-px``); None =
            measure it on the training split's red cells (:mod:`.training_scale`).
        rbc_um: red-cell diameter the measurement assumes (``--rbc-um``; None = 7.5 um).
        scale_jitter: max relative zoom of the scale-jitter augmentation (``--scale-jitter``,
            e.g. 0.15); None = 0 (off) for a new run and the run's own value on resume.
        init: a pretrained backbone to start from (``--init``: a shipped name such as
            ``leukoedge-smear``, or a backbone file; :mod:`leukoedge.models.pretrained`); None =
            from scratch.
        teachers: finished run directories to distil from (``--teacher``, :mod:`.distill`); empty = none.
        distill_alpha / temperature: the teachers' share of the loss and the softening temperature
            (None = :data:`~.distill.DEFAULT_ALPHA` / :data:`~.distill.DEFAULT_TEMPERATURE`).
        ema: momentum of the weight average (``--ema``, :mod:`.averaging`); None = no averaging for a
            new run and the run's own choice on resume.
        label_smoothing: ``E`` of :mod:`.smoothing` (``--label-smoothing``); None = 0 (off) for a new
            run and the run's own value on resume.
    """

    out: Path
    model: str
    manifest: Manifest | None = None
    data_root: str | tuple[str, ...] | None = None
    epochs: int | None = None
    batch_size: int | None = None
    learning_rate: float | None = None
    input_size: int | None = None
    seed: int = 0
    augment: str | None = None
    colour: str | None = None
    resume: bool = False
    patience: int = 8
    distribute: str = "auto"
    evaluate: bool = True
    ood_dirs: tuple = field(default_factory=tuple)
    audit: bool = True
    consistency: float | None = None
    select: str | None = None
    um_per_px: float | None = None
    rbc_um: float | None = None
    scale_jitter: float | None = None
    init: str | None = None
    teachers: tuple = ()
    distill_alpha: float | None = None
    temperature: float | None = None
    ema: float | None = None
    label_smoothing: float | None = None
    mix: str | None = None
    mix_alpha: float | None = None
    mix_prob: float | None = None

    def __post_init__(self) -> None:
        if self.mix is not None:
            check_mixing(self.mix, self.mix_alpha, self.mix_prob)
            if self.teachers or self.consistency:
                raise UsageError("--mix cannot be combined with --teacher or --consistency yet",
                                 hint="their losses score each training image against its own label or views")
        elif (self.mix_alpha is not None or self.mix_prob is not None) and not self.resume:
            raise UsageError("--mix-alpha / --mix-prob need --mix mixup|cutmix")
        if self.ema is not None:
            check_momentum(self.ema)
        if self.label_smoothing is not None:
            check_epsilon(self.label_smoothing)
            if self.label_smoothing and (self.teachers or self.consistency):
                raise UsageError("--label-smoothing cannot be combined with --teacher or --consistency yet",
                                 hint="those losses keep their own cross-entropy on the hard label")
        if self.teachers or self.distill_alpha is not None or self.temperature is not None:
            check_options(DEFAULT_ALPHA if self.distill_alpha is None else self.distill_alpha,
                          DEFAULT_TEMPERATURE if self.temperature is None else self.temperature)
            if not self.teachers and not self.resume:
                raise UsageError("--distill-weight / --temperature need --teacher RUN")
            if self.consistency:
                raise UsageError("--teacher and --consistency cannot be combined yet",
                                 hint="the teacher's targets already tie the colour views to one answer")
        check_um_per_px(self.um_per_px)
        check_rbc_um(self.rbc_um)
        if self.um_per_px is not None and self.rbc_um is not None:
            raise UsageError("--rbc-um applies to a measured scale, and --um-per-px gives it", hint="drop one of them")
        if self.scale_jitter is not None:
            recipe("none", self.scale_jitter)  # validates the range
        if self.select is not None and self.select not in SELECT_CHOICES:
            raise UsageError(f"--select must be one of {', '.join(SELECT_CHOICES)}, got {self.select!r}",
                             hint=f"the default, {DEFAULT_SELECT}, was chosen on small data (see the README)")
        if self.consistency is not None:
            check_weight(self.consistency)
        for name in ("epochs", "batch_size", "input_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
        if self.learning_rate is not None and not (0 < self.learning_rate < 10):
            raise UsageError(f"--lr must be in (0, 10), got {self.learning_rate}")
        if self.distribute not in DISTRIBUTE:
            raise UsageError(f"distribute must be one of {', '.join(DISTRIBUTE)}")
        if self.patience < 1:
            raise UsageError("patience must be >= 1 epoch")
        if not self.resume and self.manifest is None:
            raise UsageError("a manifest is needed to start a run", hint="pass --manifest M")


def resolve_config(opts: TrainOptions, scale: dict | None = None, backbone=None, teachers=()) -> RunConfig:
    """Fill registry defaults and freeze what will be trained; ``scale`` is the training-scale record,
    ``backbone`` the opened ``--init`` backbone (:class:`leukoedge.models.pretrained.Backbone`) or None,
    ``teachers`` the opened ``--teacher`` runs (:class:`.distill.Teacher`)."""
    import tensorflow as tf

    from ..models import get_entry

    entry = get_entry(opts.model)
    manifest = opts.manifest
    aug_name = opts.augment or entry.train.augment
    aug = recipe(aug_name, opts.scale_jitter or 0.0)
    weight = float(opts.consistency or 0.0)
    alpha = DEFAULT_ALPHA if opts.distill_alpha is None else float(opts.distill_alpha)
    temperature = DEFAULT_TEMPERATURE if opts.temperature is None else float(opts.temperature)
    smoothing = float(opts.label_smoothing or 0.0)
    loss = describe_smoothed_loss(smoothing) if smoothing else "sparse categorical cross-entropy, class-weighted" + (
        f" + {weight:g} x Jensen-Shannon colour consistency" if weight else "")
    mix_record = check_mixing(opts.mix, opts.mix_alpha, opts.mix_prob) if opts.mix else None
    if mix_record:
        loss += f", on {describe_mixing(mix_record)}"
    return RunConfig(
        model=opts.model,
        input_size=int(opts.input_size or entry.default_input),
        classes=tuple(manifest.classes),
        seed=int(opts.seed),
        epochs=int(opts.epochs or entry.train.epochs),
        batch_size=int(opts.batch_size or entry.train.batch_size),
        learning_rate=float(opts.learning_rate or entry.train.learning_rate),
        augmentation={"recipe": aug_name, "enabled": aug.enabled, "where": "tf.data", **aug.to_dict()},
        # the first root as the data is now (one root: as before); the saved manifest holds them all
        data_root=manifest.with_root(opts.data_root).root if opts.data_root else manifest.root,
        colour=PreprocessSpec.square(8, opts.colour or "as-captured").colour,
        scale=dict(scale or {}),
        extra={"optimizer": entry.train.optimizer, "patience": opts.patience, "schedule": "cosine per epoch to 1 %",
               "select": opts.select or DEFAULT_SELECT,
               "loss": describe_loss(alpha, temperature, len(teachers)) if teachers else loss,
               "distill": {"teachers": [t.record() for t in teachers], "alpha": alpha,
                           "temperature": temperature} if teachers else None,
               "consistency": describe(weight) if weight else None, "distribute": opts.distribute,
               "averaging": describe_averaging(opts.ema) if opts.ema is not None else None,
               "label_smoothing": smoothing or None, "mixing": mix_record,
               "init": backbone.record() if backbone is not None else None,
               "leukoedge_version": __version__, "tensorflow_version": tf.__version__,
               "python": platform.python_version(), "machine": platform.platform()},
    )


def _check_resume(opts: TrainOptions, config: RunConfig) -> None:
    """Refuse a --resume whose explicit options contradict the run (never rewrite silently)."""
    given = {"model": opts.model, "epochs": opts.epochs, "batch_size": opts.batch_size,
             "learning_rate": opts.learning_rate, "input_size": opts.input_size, "colour": opts.colour}
    clashes = [f"{k}={v} (run has {getattr(config, k)})" for k, v in given.items()
               if v is not None and v != getattr(config, k)]
    if opts.consistency is not None and opts.consistency != consistency_weight(config):
        clashes.append(f"consistency={opts.consistency:g} (run has {consistency_weight(config):g})")
    if opts.select is not None and opts.select != selection(config):
        clashes.append(f"select={opts.select} (run has {selection(config)})")
    if opts.scale_jitter is not None and opts.scale_jitter != config.scale_jitter:
        clashes.append(f"scale_jitter={opts.scale_jitter:g} (run has {config.scale_jitter:g})")
    recorded = (config.scale or {}).get("um_per_px")
    if opts.um_per_px is not None and opts.um_per_px != recorded:
        clashes.append(f"um_per_px={opts.um_per_px:g} (run has {recorded}, {(config.scale or {}).get('source')})")
    init = (config.extra.get("init") or {}).get("source")
    if opts.init is not None and source_key(opts.init) != init:
        clashes.append(f"init={opts.init} (run has {init or 'none: trained from scratch'})")
    distill = config.extra.get("distill") or {}
    if opts.teachers and sorted(str(Path(t).resolve()) for t in opts.teachers) != sorted(
            t["run"] for t in distill.get("teachers", [])):
        clashes.append(f"teachers={', '.join(map(str, opts.teachers))} (run has "
                       f"{', '.join(t['run'] for t in distill.get('teachers', [])) or 'none'})")
    for name, key in (("distill_alpha", "alpha"), ("temperature", "temperature")):
        if getattr(opts, name) is not None and getattr(opts, name) != distill.get(key):
            clashes.append(f"{name}={getattr(opts, name):g} (run has {distill.get(key, 'no distillation')})")
    if opts.label_smoothing is not None and opts.label_smoothing != label_smoothing(config):
        clashes.append(f"label_smoothing={opts.label_smoothing:g} (run has {label_smoothing(config):g})")
    recorded_mix = mixing_record(config) or {}
    for name, key in (("mix", "method"), ("mix_alpha", "alpha"), ("mix_prob", "probability")):
        if getattr(opts, name) is not None and getattr(opts, name) != recorded_mix.get(key):
            clashes.append(f"{name}={getattr(opts, name)} (run has {recorded_mix.get(key, 'no mixing')})")
    if opts.ema is not None and opts.ema != averaging_momentum(config):
        clashes.append(f"ema={opts.ema:g} (run has {averaging_momentum(config) or 'no weight averaging'})")
    if opts.rbc_um is not None and opts.rbc_um != (config.scale or {}).get("rbc_um"):
        clashes.append(f"rbc_um={opts.rbc_um:g} (run has {(config.scale or {}).get('rbc_um')})")
    if clashes:
        raise UsageError(f"--resume with options that differ from the run: {', '.join(clashes)}",
                         hint="drop those options, or start a new run with another --out")


def pick_strategy(distribute: str):
    """``(strategy, mixed_precision, device description)`` for this machine."""
    import tensorflow as tf

    gpus = tf.config.list_logical_devices("GPU")
    if distribute == "mirrored" or (distribute == "auto" and len(gpus) > 1):
        devices = [d.name for d in (gpus or tf.config.list_logical_devices("CPU"))]
        return tf.distribute.MirroredStrategy(devices=devices), bool(gpus), f"MirroredStrategy over {len(devices)} " \
            f"{'GPU' if gpus else 'CPU'} device(s)"
    if gpus and distribute == "auto":
        return tf.distribute.get_strategy(), True, "1 GPU (mixed float16)"
    return tf.distribute.get_strategy(), False, f"CPU ({_cpu_count()} cores)"


def _cpu_count() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def cosine_lr(epoch: int, epochs: int, peak: float) -> float:
    return peak * (0.01 + 0.99 * 0.5 * (1.0 + math.cos(math.pi * min(epoch, epochs) / max(epochs, 1))))


def _open_run(opts: TrainOptions, rd: RunDir) -> tuple[RunConfig, Manifest, dict]:
    """(config, manifest, state) of a new run, or of the run being resumed."""
    if opts.resume:
        rd.require(rd.config_path, rd.manifest_path, rd.state_path, rd.last_model_path)
        config, manifest = rd.config(), rd.manifest()
        _check_resume(opts, config)
        state = read_json(rd.state_path)
    else:
        if rd.state_path.exists() or rd.model_path.exists():
            raise UsageError(f"{rd.path} already holds a training run",
                             hint="pass --resume to continue it, or choose another --out")
        backbone = _open_backbone(opts)
        manifest = opts.manifest if not opts.data_root else opts.manifest.with_root(opts.data_root)
        teachers = open_teachers(opts.teachers, tuple(manifest.classes), manifest)
        train_paths = [manifest.resolve(e) for e in manifest.subset("train")]
        scale = training_scale(train_paths, um_per_px=opts.um_per_px, rbc_um=opts.rbc_um,
                               progress=sys.stderr.isatty())
        config = resolve_config(opts, scale, backbone, teachers)
        state = {"epoch": -1, "best_val_loss": None, "best_val_accuracy": None, "best_epoch": None, "wait": 0,
                 "history": {}, "train_seconds": 0.0}
    if state.get("finished"):
        raise UsageError(f"{rd.path} already finished training ({state['epoch'] + 1} epochs)",
                         hint="evaluate it with `leukoedge eval`, or start a new run")
    return config, manifest, state


def selection(config: RunConfig) -> str:
    """The run's checkpoint criterion (``val_loss`` for runs made before ``--select`` existed)."""
    return str(config.extra.get("select") or "val_loss")


def is_better(select: str, val_loss: float, val_accuracy: float, best_loss: float | None,
              best_accuracy: float | None) -> bool:
    """Does this epoch beat the kept one under ``select``? (A pure rule, so tests check it without training.)

    ``val_loss``: lower by more than 1e-7. ``val_accuracy``: higher, or equal
    (within 1e-9: accuracies are counts over the same images) with a lower
    loss. Non-finite figures never win.
    """
    if not math.isfinite(val_loss):
        return False
    if select == "val_loss":
        return best_loss is None or val_loss < best_loss - 1e-7
    if select != "val_accuracy":
        raise UsageError(f"unknown checkpoint criterion {select!r}; use one of {', '.join(SELECT_CHOICES)}")
    if not math.isfinite(val_accuracy):
        return False
    if best_accuracy is None or best_loss is None:
        return True
    if val_accuracy > best_accuracy + 1e-9:
        return True
    return abs(val_accuracy - best_accuracy) <= 1e-9 and val_loss < best_loss - 1e-7


def averaging_momentum(config: RunConfig) -> float | None:
    """The run's weight-average momentum, or None for a run without ``--ema``."""
    averaging = config.extra.get("averaging")
    return float(averaging["momentum"]) if averaging else None


def label_smoothing(config: RunConfig) -> float:
    """The run's label-smoothing ``E`` (0 for runs without it)."""
    return float(config.extra.get("label_smoothing") or 0.0)


def mixing_record(config: RunConfig) -> dict | None:
    """The run's ``--mix`` record (:func:`.mixing.check_mixing`), or None for a run without mixing."""
    return config.extra.get("mixing") or None


def consistency_weight(config: RunConfig) -> float:
    """The run's colour-consistency weight (0 for runs made before it existed)."""
    return float((config.extra.get("consistency") or {}).get("weight", 0.0))


def _open_backbone(opts: TrainOptions):
    """The ``--init`` backbone, opened and checked against the model before anything is written (or None)."""
    if opts.init is None:
        return None
    backbone = load_backbone(opts.init)
    backbone.check_model(opts.model)
    colour = opts.colour or "as-captured"
    if colour != backbone.meta["colour"]:
        log.warning("--init %s was trained on %s images and this run uses --colour %s: its first layers see "
                    "other inputs than they learned on (fine-tuning adapts them; the card says so)",
                    opts.init, backbone.meta["colour"], colour)
    return backbone


def _new_model(config: RunConfig):
    from ..models import create_model

    model = create_model(config.model, config.input_size, len(config.classes))
    init = config.extra.get("init")
    if init:
        backbone = load_backbone(init["source"])
        if backbone.sha256 != init["sha256"]:
            raise RunError(f"the backbone {init['source']} changed since the run was configured "
                           f"(sha256 {backbone.sha256[:12]} vs {init['sha256'][:12]})",
                           hint="start the run again with another --out")
        layers = apply_backbone(model, backbone, config.model)
        log.info("initialised %d layers from backbone %s v%s (sha256 %s...); the classifier is new",
                 layers, backbone.name, backbone.meta["version"], backbone.sha256[:12])
    optimizer = keras.optimizers.Adam(config.learning_rate) if config.extra.get("optimizer", "adam") == "adam" \
        else keras.optimizers.SGD(config.learning_rate, momentum=0.9)
    weight = consistency_weight(config)
    distill = config.extra.get("distill")
    if distill:
        model.compile(optimizer=optimizer, loss=DistillationLoss(distill["alpha"], distill["temperature"]),
                      metrics=[LabelAccuracy()])
        return model
    smoothing = label_smoothing(config)
    if mixing_record(config):
        model.compile(optimizer=optimizer, loss=MixedCrossEntropy(smoothing), metrics=[LabelAccuracy()])
        return model
    loss = PairedConsistencyLoss(weight) if weight else SmoothedCrossEntropy(smoothing) if smoothing \
        else keras.losses.SparseCategoricalCrossentropy()
    model.compile(optimizer=optimizer, loss=loss, metrics=["accuracy"])
    return model


def train(opts: TrainOptions) -> dict:
    """Run training (evaluation and shortcut audit); returns ``{"run_dir", "history", "metrics"[, "audit"]}``."""
    import tensorflow as tf

    rd = RunDir(opts.out)
    config, manifest, state = _open_run(opts, rd)

    keras.utils.set_random_seed(config.seed)
    tf.config.experimental.enable_op_determinism()
    strategy, mixed, devices = pick_strategy(opts.distribute)
    if mixed:
        keras.mixed_precision.set_global_policy("mixed_float16")

    cache = ImageCache()
    spec = config.preprocess_spec
    root = config.data_root or manifest.root
    x_train, y_train, _ = load_split(manifest, "train", spec, cache, root)
    x_val, y_val, _ = load_split(manifest, "val", spec, cache, root)
    missing = [c for i, c in enumerate(config.classes) if not np.any(y_train == i)]
    if missing:
        raise DatasetError(f"no training images for class(es) {', '.join(missing)}",
                           hint="check the manifest's train split")
    weights = class_weights(y_train, len(config.classes))
    targets = _distill_targets(config, manifest, y_train, cache, root)
    if not opts.resume:
        distill = config.extra.get("distill")
        if distill:
            distill = {**distill, **targets[1]}
        config = RunConfig.from_dict({**config.to_dict(), "extra": {**config.extra, "class_weights": {
            c: round(weights[i], 6) for i, c in enumerate(config.classes)}, "devices": devices, "distill": distill}})
        rd.path.mkdir(parents=True, exist_ok=True)
        write_json(rd.config_path, config.to_dict())
        manifest.save(rd.manifest_path)

    with strategy.scope():
        model = keras.models.load_model(rd.last_model_path) if opts.resume else _new_model(config)

    first = int(state["epoch"]) + 1
    calibrator = BatchNormCalibrator(model, x_train, seed=config.seed)
    if first == 0:
        calibrator.calibrate()
    paired = consistency_weight(config) > 0
    replicas = int(strategy.num_replicas_in_sync)
    if paired:
        check_replicas(config.batch_size, replicas)
    drop_remainder = paired and replicas > 1
    steps = len(y_train) // config.batch_size if drop_remainder else steps_per_epoch(len(y_train), config.batch_size)
    if steps < 1:
        raise UsageError(f"--batch {config.batch_size} is larger than the {len(y_train)} training images")
    log.info("training %s (%d params) on %d images, validating on %d, %s, epochs %d..%d",
             config.model, model.count_params(), len(y_train), len(y_val), devices, first + 1, config.epochs)
    log.info("training scale: %s%s", "unknown" if spec.um_per_px is None else f"{spec.um_per_px:.4g} um/px",
             f"; scale jitter +-{100 * config.scale_jitter:.0f} %" if config.scale_jitter else "")
    momentum = averaging_momentum(config)
    average = None if momentum is None else WeightAverage(momentum, steps, rd.average_path, resume=opts.resume)
    checkpoint = RunCheckpoint(rd, state, opts.patience, config, average)
    callbacks = [
        keras.callbacks.LearningRateScheduler(lambda e, _lr: cosine_lr(e, config.epochs, config.learning_rate)),
        keras.callbacks.TerminateOnNaN(),
        *([average] if average is not None else []),  # before PreciseBatchNorm: BN is measured for the average
        PreciseBatchNorm(calibrator, steps),
        checkpoint,
        TqdmProgress(steps, config.epochs),
    ]
    if first < config.epochs:
        aug = run_recipe(config.augmentation)
        masks = white_cell_masks(manifest, "train", spec, cache, root) if aug.needs_cells else None
        rows = None if targets is None else targets[0]
        sample_weights = None if rows is None else np.array([weights[int(c)] for c in y_train], np.float32)
        mixer = Mixer.from_record(mix, weights) if (mix := mixing_record(config)) else None
        ds = train_dataset(x_train, y_train, batch_size=config.batch_size, seed=config.seed, first_epoch=first,
                           last_epoch=config.epochs, augment=aug, paired=paired, drop_remainder=drop_remainder,
                           masks=masks, targets=rows, sample_weights=sample_weights, mixer=mixer)
        model.fit(ds, validation_data=eval_dataset(x_val, y_val, batch_size=max(config.batch_size, 32),
                                                      paired=paired),
                  epochs=config.epochs, initial_epoch=first, steps_per_epoch=steps,
                  class_weight=weights if rows is None and mixer is None else None,  # else inside the batches
                  callbacks=callbacks, verbose=0, shuffle=False)
    checkpoint.finish(devices)
    result = {"run_dir": str(rd.path), "history": checkpoint.state["history"], "metrics": None}
    if opts.evaluate:
        from .evaluate import evaluate_run

        best = keras.models.load_model(rd.model_path, compile=False)
        result["metrics"] = evaluate_run(rd.path, ("val", "test"), opts.ood_dirs, cache=cache, model=best)
        if opts.audit:
            result["audit"] = _audit(rd.path, result["metrics"], cache, best)
    return result


def _distill_targets(config: RunConfig, manifest: Manifest, y_train: np.ndarray, cache: ImageCache,
                     root) -> tuple[np.ndarray, dict] | None:
    """``(target rows [N, 1 + C], their record)`` from the run's teachers, or None without distillation.

    The teachers are reopened from the run's record (their weights' digests
    checked), so a new run and a resumed one compute the same targets.
    """
    distill = config.extra.get("distill")
    if not distill:
        return None
    teachers = reopen_teachers(distill)
    probs, each = soft_targets(teachers, manifest, "train", cache, root)
    record = describe_distill(teachers, distill["alpha"], distill["temperature"], y_train, probs, each)
    log.info("distilling from %d teacher(s): their mean gets %.1f %% of the training images right (mean "
             "confidence %.3f); alpha %g, T %g", len(teachers), 100 * record["target_train_accuracy"],
             record["target_mean_confidence"], distill["alpha"], distill["temperature"])
    return target_rows(y_train, probs), record


def _audit(run_dir: Path, metrics: dict, cache: ImageCache, model) -> dict | None:
    """Shortcut audit of the finished run on test; the card is rewritten to carry it.

    A typed failure (e.g. a test split the audit cannot use) is logged with the
    command to retry, not raised: the trained and evaluated run is already
    complete on disk and must not look failed.
    """
    from .audit_run import audit_run
    from .evaluate import write_card

    try:
        report = audit_run(run_dir, "test", cache=cache, model=model)
    except LeukoEdgeError as err:
        log.warning("shortcut audit skipped: %s (retry: leukoedge eval %s --audit)", err.user_message(), run_dir)
        return None
    write_card(run_dir, metrics)
    log.info("shortcut audit: %s", "; ".join(report["readings"][:2]))
    return report


class BatchNormCalibrator:
    """Sets BatchNorm moving statistics from a fixed sample of training images.

    The inputs of all BN layers are read in one training-mode pass (batch
    statistics, as during training), pooled over the sample; models without
    BN are left untouched.
    """

    def __init__(self, model, x: np.ndarray, *, seed: int, max_images: int = 256, batch_size: int = 64) -> None:
        self.bns = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
        idx = np.sort(np.random.default_rng(seed).permutation(len(x))[:max_images])
        self.sample = x[idx]
        self.batch_size = batch_size
        self.probe = keras.Model(model.inputs, [bn.input for bn in self.bns]) if self.bns else None

    def calibrate(self) -> int:
        """Assign measured mean/variance to every BN layer; returns how many were set."""
        if not self.bns:
            return 0
        sums = [np.zeros((2, bn.moving_mean.shape[0])) for bn in self.bns]
        for start in range(0, len(self.sample), self.batch_size):
            batch = self.sample[start:start + self.batch_size].astype("float32")
            outs = self.probe([batch], training=True)
            outs = outs if isinstance(outs, (list, tuple)) else [outs]
            for i, out in enumerate(outs):
                out = keras.ops.convert_to_numpy(out).astype(np.float64)
                axes = tuple(range(out.ndim - 1))
                sums[i] += np.stack([out.mean(axis=axes), (out ** 2).mean(axis=axes)]) * len(batch)
        for bn, total in zip(self.bns, sums):
            mean = total[0] / len(self.sample)
            var = np.maximum(total[1] / len(self.sample) - mean ** 2, 0.0)
            bn.moving_mean.assign(mean.astype(bn.moving_mean.dtype))
            bn.moving_variance.assign(var.astype(bn.moving_variance.dtype))
        return len(self.bns)


class PreciseBatchNorm(keras.callbacks.Callback):
    """Recalibrate BN statistics after the last training batch of each epoch (before validation)."""

    def __init__(self, calibrator: BatchNormCalibrator, steps: int) -> None:
        super().__init__()
        self.calibrator, self.steps = calibrator, steps

    def on_train_batch_end(self, batch, logs=None):
        if batch == self.steps - 1:
            self.calibrator.calibrate()


class RunCheckpoint(keras.callbacks.Callback):
    """Best/last checkpoints, state.json, history and early stopping.

    ``state["best_epoch"]`` (0-based) is the kept epoch under the run's
    criterion; ``best_val_loss`` / ``best_val_accuracy`` are that epoch's
    figures (so under ``val_accuracy`` the loss is the kept epoch's, not the
    lowest seen). With a weight ``average`` (:class:`.averaging.WeightAverage`)
    the model holds the average at epoch end: ``model.keras`` is saved from it,
    then the raw weights go back before ``last.keras`` (which resumes training).
    """

    def __init__(self, rd: RunDir, state: dict, patience: int, config: RunConfig, average=None) -> None:
        super().__init__()
        self.rd, self.state, self.patience, self.config = rd, dict(state), patience, config
        self.average = average
        self.select = selection(config)
        self._t0 = None

    def on_epoch_begin(self, epoch, logs=None):
        self._t0 = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        logs = dict(logs or {})
        lr = float(np.asarray(self.model.optimizer.learning_rate))
        logs["learning_rate"] = lr
        history = self.state.setdefault("history", {})
        for key, value in logs.items():
            history.setdefault(key, []).append(float(value))
        seconds = time.perf_counter() - self._t0
        history.setdefault("epoch_seconds", []).append(round(seconds, 2))
        self.state["train_seconds"] = float(self.state.get("train_seconds", 0.0)) + seconds
        val_loss = float(logs.get("val_loss", float("nan")))
        val_acc = float(logs.get("val_accuracy", float("nan")))
        improved = is_better(self.select, val_loss, val_acc, self.state.get("best_val_loss"),
                             self.state.get("best_val_accuracy"))
        if improved:
            self.state.update(best_val_loss=val_loss, best_val_accuracy=val_acc if math.isfinite(val_acc) else None,
                              best_epoch=epoch, wait=0)
            _save_model(self.model, self.rd.model_path)
        else:
            self.state["wait"] = int(self.state.get("wait", 0)) + 1
        self.state["epoch"] = epoch
        if self.average is not None:
            self.average.restore_training_weights()
        _save_model(self.model, self.rd.last_model_path)
        log.info("epoch %d/%d: loss %.4f acc %.4f val_loss %.4f val_acc %.4f lr %.2e%s", epoch + 1, self.config.epochs,
                 logs.get("loss", float("nan")), logs.get("accuracy", float("nan")), val_loss, val_acc, lr,
                 f"  [best {self.select} so far: kept]" if improved else "")
        if self.state["wait"] >= self.patience:
            self.state["stopped_early"] = True
            self.model.stop_training = True
            kept = self.state.get("best_epoch")
            log.info("early stopping after epoch %d: no %s improvement for %d epochs; keeping epoch %s", epoch + 1,
                     self.select, self.patience, "none" if kept is None else int(kept) + 1)
        write_json(self.rd.state_path, self.state)

    def finish(self, devices: str) -> None:
        """Mark the run finished and write history.json (+ the training-curves plot)."""
        if not self.rd.model_path.exists():
            raise DatasetError("training produced no finite validation loss, so no best checkpoint was saved",
                               hint="lower --lr; check the images and labels")
        self.state["finished"] = True
        write_json(self.rd.state_path, self.state)
        kept = None if self.state.get("best_epoch") is None else int(self.state["best_epoch"]) + 1
        history = {
            "history": self.state.get("history", {}),
            "epochs_run": int(self.state["epoch"]) + 1,
            "select": self.select,
            "kept_epoch": kept,
            "kept": {"val_loss": self.state.get("best_val_loss"), "val_accuracy": self.state.get("best_val_accuracy")},
            "best_epoch": kept,
            "best_val_loss": self.state.get("best_val_loss"),
            "stopped_early": bool(self.state.get("stopped_early", False)),
            "train_seconds": round(float(self.state.get("train_seconds", 0.0)), 2),
            "devices": devices,
        }
        write_json(self.rd.history_path, history)
        figures = ", ".join(f"{k} {v:.4f}" for k, v in history["kept"].items() if v is not None)
        log.info("kept epoch %s of %d (best %s; %s): model.keras is that epoch", kept, history["epochs_run"],
                 self.select, figures)
        from .plots import training_curves

        training_curves(history["history"], self.rd.plots_dir / "training_curves.png")


class TqdmProgress(keras.callbacks.Callback):
    """Per-epoch tqdm bar on stderr, only when stderr is a terminal.

    Redirected to a log file, a bar writes hundreds of carriage-return updates
    per epoch and buries the one line per epoch that the trainer logs anyway.
    """

    def __init__(self, steps: int, epochs: int) -> None:
        super().__init__()
        self.steps, self.epochs, self.bar = steps, epochs, None

    def on_epoch_begin(self, epoch, logs=None):
        self.bar = tqdm(total=self.steps, desc=f"epoch {epoch + 1}/{self.epochs}", unit="batch", file=sys.stderr,
                        leave=False, mininterval=1.0, disable=None)

    def on_train_batch_end(self, batch, logs=None):
        self.bar.update(1)
        if logs and batch % 5 == 0:
            self.bar.set_postfix(loss=f"{float(logs.get('loss', 0)):.3f}", acc=f"{float(logs.get('accuracy', 0)):.3f}")

    def on_epoch_end(self, epoch, logs=None):
        if self.bar is not None:
            self.bar.close()


def _save_model(model, path: Path) -> None:
    """Keras writes a temp ``.keras`` next to ``path``, renamed once whole: an interrupted save keeps the old model."""
    with atomic_path(path) as tmp:
        model.save(tmp)
