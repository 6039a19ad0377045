"""Cross-validation over K folds (``leukoedge train --folds K``): the honest figure on a small dataset.

Why: on a lab's own few hundred images one held-out block is one draw of a
very noisy estimate. On a public 260-image set the same model scored 87.2 %
on one block split and 64-98 % over five block folds (82.4 +/- 15.1 %): which
block is held out matters more than most modelling choices. K folds test every
image exactly once (:func:`leukoedge.data.split.make_folds`: capture-order
blocks, or whole groups, with duplicate clusters kept together), so the
report is a mean, a spread and a pooled confusion matrix over all images.

How: each fold is an ordinary run directory ``RUN/fold-k/`` trained and
evaluated by :func:`.trainer.train` with the same options (a measured
training scale is measured on each fold's own training split and recorded in
its ``config.json``; ``--um-per-px`` applies to every fold), so a fold's card,
metrics, plots, audit and ``convert`` work exactly as for a single run. The
fold manifests and the options are saved in ``RUN`` first (``folds/``,
``cv_config.json``), so ``--resume`` needs only ``RUN``: it skips finished
folds, resumes an interrupted one from its ``last.keras`` and evaluates a
fold whose training finished but whose evaluation did not. ``cv.json`` and
the card are rewritten after every fold, marked incomplete until all are in.

Which model to deploy: the CV figure describes the recipe (model, options,
data), not one network. Every ``fold-k/`` is a complete run that can be
converted; its own test figure is one fold's, so quote the CV mean +/- sd.

The summary (:func:`summarize_folds`) is pure numpy and imports no
TensorFlow; :func:`train_folds` imports the trainer inside.

What can fail: :class:`UsageError` (an existing run without ``--resume``,
options that contradict the saved ones, evaluation switched off),
:class:`ManifestError` (folds that do not partition the data), and whatever
training a fold raises.
"""
from __future__ import annotations

import logging
import sys
import time
from dataclasses import fields, replace
from typing import TYPE_CHECKING, Sequence

import numpy as np
from tqdm import tqdm

from ..data.records import Manifest
from ..data.split import check_partition, load_folds, save_folds
from ..errors import UsageError
from ..files import atomic_write_text, write_json
from ..stats import wilson as stats_wilson
from ..stats.metrics import macro_f1_from_confusion, per_class_prf
from .predictions import pool_predictions
from .rundir import RunDir, read_json

if TYPE_CHECKING:  # pragma: no cover
    from .trainer import TrainOptions

log = logging.getLogger(__name__)
CV_VERSION = 1
#: TrainOptions fields saved in cv_config.json (the rest are per fold or per invocation).
SAVED_OPTIONS = ("model", "data_root", "epochs", "batch_size", "learning_rate", "input_size", "seed", "augment",
                 "colour", "patience", "distribute", "ood_dirs", "audit", "consistency", "select", "um_per_px",
                 "rbc_um", "scale_jitter", "init", "ema", "label_smoothing", "mix", "mix_alpha", "mix_prob")
#: Options a --resume may repeat but not change (as for a single run's --resume).
FIXED_ON_RESUME = ("model", "epochs", "batch_size", "learning_rate", "input_size", "colour", "consistency", "select",
                   "um_per_px", "rbc_um", "scale_jitter", "init", "ema", "label_smoothing", "mix", "mix_alpha",
                   "mix_prob")


def train_folds(opts: "TrainOptions", folds: Sequence[Manifest] | None = None) -> dict:
    """Train and evaluate every fold into ``opts.out``; returns ``{"run_dir", "cv"}``.

    ``folds``: the fold manifests of a new run (ignored on resume, where the
    run's saved ones are used). ``opts`` is applied to every fold.
    """
    from .trainer import DEFAULT_SELECT

    if not opts.evaluate:
        raise UsageError("cross-validation needs each fold's test evaluation; evaluate=False makes no figure")
    rd = RunDir(opts.out)
    if opts.resume:
        saved, folds = _open_saved(rd, opts)
    else:
        if folds is None:
            raise UsageError("a new cross-validation run needs its fold manifests",
                             hint="pass --data DIR --folds K, or --manifest DIR/folds.json")
        folds = list(folds)
        check_partition(folds)
        if rd.path.exists() and any(rd.path.iterdir()):
            raise UsageError(f"{rd.path} is not empty" + (" (a cross-validation run)" if rd.is_cv else ""),
                             hint="pass --resume to continue it, or choose another --out")
        saved = {name: getattr(opts, name) for name in SAVED_OPTIONS}
        saved["select"] = saved["select"] or DEFAULT_SELECT
        saved["ood_dirs"] = list(saved["ood_dirs"])
        save_folds(folds, rd.folds_dir)
        write_json(rd.cv_config_path, {"version": CV_VERSION, "folds": len(folds), "options": saved})

    base = _fold_options(opts, saved)
    k_total = len(folds)
    previous = rd.read(rd.cv_path) or {}
    wall_before = float(previous.get("wall_seconds") or 0.0) if opts.resume else 0.0
    t0 = time.perf_counter()
    summaries: list[dict] = []
    bar = tqdm(total=k_total, desc="folds", unit="fold", file=sys.stderr, disable=None, leave=True)
    try:
        for k, manifest in enumerate(folds, 1):
            fold_rd = RunDir(rd.fold_dir(k))
            counts = manifest.counts()
            sizes = {s: sum(c.values()) for s, c in counts.items()}
            status = fold_status(fold_rd)
            if status == "done":
                log.info("fold %d/%d: finished earlier, skipped (%s)", k, k_total, fold_rd.path)
            else:
                log.info("fold %d/%d: %s %s on %d images, validating on %d, testing on %d (%s)", k, k_total,
                         {"new": "training", "resume": "resuming", "evaluate": "evaluating"}[status],
                         base.model, sizes["train"], sizes["val"], sizes["test"], _test_description(manifest))
                _run_fold(base, manifest, fold_rd, status)
            if status == "evaluate" and base.audit:
                _audit_fold(fold_rd)
            summaries.append(fold_summary(fold_rd, k))
            s = summaries[-1]
            log.info("fold %d/%d: test accuracy %.4f, macro-F1 %.4f, kept epoch %s of %s", k, k_total,
                     s["accuracy"], s["macro_f1"], s["kept_epoch"], s["epochs_run"])
            _write(rd, summaries, k_total, folds[0], saved, wall_before + time.perf_counter() - t0)
            bar.update(1)
    finally:
        bar.close()
    cv = read_json(rd.cv_path)
    log.info("cross-validation over %d folds: accuracy %.4f +/- %.4f (mean +/- sd), pooled %.4f on %d images",
             k_total, cv["accuracy_mean"], cv["accuracy_sd"], cv["pooled"]["accuracy"], cv["pooled"]["n"])
    return {"run_dir": str(rd.path), "cv": cv}


def fold_status(rd: RunDir) -> str:
    """``new`` | ``resume`` (training interrupted) | ``evaluate`` (trained, not evaluated) | ``done``."""
    if not rd.state_path.exists():
        return "new"
    state = read_json(rd.state_path)
    if not state.get("finished"):
        return "resume"
    if not (rd.history_path.exists() and rd.metrics_path("test").exists() and rd.model_card_md.exists()):
        return "evaluate"
    return "done"


def _open_saved(rd: RunDir, opts: "TrainOptions") -> tuple[dict, list[Manifest]]:
    """The saved options and folds of the CV run being resumed; refuse contradicting options."""
    if not rd.is_cv:
        raise UsageError(f"{rd.path} is not a cross-validation run (no cv_config.json)",
                         hint="drop --folds to resume a single run, or start a new one with --folds K")
    saved = dict(read_json(rd.cv_config_path).get("options") or {})
    clashes = [f"{name}={getattr(opts, name)} (run has {saved.get(name)})" for name in FIXED_ON_RESUME
               if getattr(opts, name) is not None and getattr(opts, name) != saved.get(name)]
    if clashes:
        raise UsageError(f"--resume with options that differ from the run: {', '.join(clashes)}",
                         hint="drop those options, or start a new run with another --out")
    return saved, load_folds(rd.folds_dir)


def _fold_options(opts: "TrainOptions", saved: dict) -> "TrainOptions":
    """The options every fold trains with: the saved ones (on resume they win over CLI defaults)."""
    known = {f.name for f in fields(opts)}
    values = {k: v for k, v in saved.items() if k in known}
    values["ood_dirs"] = tuple(values.get("ood_dirs") or ())
    if isinstance(values.get("data_root"), list):  # several roots, as JSON keeps them
        values["data_root"] = tuple(values["data_root"])
    return replace(opts, **values)


def _run_fold(base: "TrainOptions", manifest: Manifest, rd: RunDir, status: str) -> None:
    import keras

    from . import trainer

    if status == "evaluate":
        from .evaluate import evaluate_run

        evaluate_run(rd.path, ("val", "test"), base.ood_dirs)
    else:
        trainer.train(replace(base, out=rd.path, manifest=None if status == "resume" else manifest,
                              resume=status == "resume"))
    keras.backend.clear_session()  # K models in one process: free each fold's graph before the next


def _audit_fold(rd: RunDir) -> None:
    """Run the shortcut audit a finished fold lacks (it failed, or the fold was evaluated on resume)."""
    import keras

    from .. import models  # noqa: F401  (registers SigmoidPair for loading)
    from .dataset import ImageCache
    from .trainer import _audit

    model = keras.models.load_model(rd.model_path, compile=False)
    _audit(rd.path, read_json(rd.metrics_path("test")), ImageCache(), model)


def _test_description(manifest: Manifest) -> str:
    """Where this fold's test set sits: the capture-order range per class for a block split."""
    test = manifest.subset("test")
    if manifest.split_kind == "block" and all(e.order is not None for e in test):
        parts = []
        for c in manifest.classes:
            orders = [e.order for e in test if e.label == c]
            if orders:
                parts.append(f"{c} {min(orders)}-{max(orders)}")
        return "capture numbers " + ", ".join(parts)
    if manifest.split_kind == "group":
        return f"{len({e.group for e in test})} whole group(s)"
    return f"{manifest.split_kind} split"


def fold_summary(rd: RunDir, k: int) -> dict:
    """One fold's row of ``cv.json``, read from its run directory."""
    rd.require(rd.metrics_path("test"), rd.history_path, rd.manifest_path)
    test = read_json(rd.metrics_path("test"))
    val = rd.read(rd.metrics_path("val")) or {}
    history = read_json(rd.history_path)
    counts = rd.manifest().counts()
    iv = test.get("intervals", {})
    return {
        "fold": k,
        "run_dir": rd.path.name,
        "n_train": sum(counts["train"].values()),
        "n_val": sum(counts["val"].values()),
        "n_test": int(test["n"]),
        "accuracy": test["accuracy"],
        "accuracy_interval": _low_high(iv.get("accuracy")),
        "macro_f1": test["macro_f1"],
        "macro_f1_interval": _low_high(iv.get("macro_f1")),
        "val_accuracy": val.get("accuracy"),
        "select": history.get("select", "val_loss"),
        "kept_epoch": history.get("kept_epoch", history.get("best_epoch")),
        "kept": history.get("kept") or {"val_loss": history.get("best_val_loss")},
        "epochs_run": history.get("epochs_run"),
        "stopped_early": history.get("stopped_early"),
        "train_seconds": history.get("train_seconds"),
        "confusion_matrix": test["confusion_matrix"],
        "collapsed_classes": test.get("collapsed_classes", []),
        "audit": "audit.json" if (rd.path / "audit.json").exists() else None,
    }


def _low_high(iv: dict | None) -> dict | None:
    return None if not iv else {"low": iv.get("low"), "high": iv.get("high"), "level": iv.get("level", 0.95),
                                "method": iv.get("method")}


def summarize_folds(folds: list[dict], classes: Sequence[str], k_total: int | None = None) -> dict:
    """Mean and sd over folds, and the pooled confusion matrix over every held-out image.

    The sd is the sample sd over folds (n - 1): the spread a single split of
    this data would show. The pooled accuracy counts every image once (each is
    in one test set); its Wilson interval treats images as independent and
    ignores that the K models differ, so it is narrower than the fold spread.
    """
    k_total = k_total or len(folds)
    acc = np.array([f["accuracy"] for f in folds], dtype=np.float64)
    f1 = np.array([f["macro_f1"] for f in folds], dtype=np.float64)
    cm = np.sum([np.asarray(f["confusion_matrix"], dtype=np.int64) for f in folds], axis=0)
    n = int(cm.sum())
    correct = int(np.trace(cm))
    prf = per_class_prf(cm)
    return {
        "version": CV_VERSION,
        "k": k_total,
        "complete": len(folds) == k_total,
        "folds_done": len(folds),
        "classes": list(classes),
        "folds": folds,
        "accuracy_mean": float(acc.mean()),
        "accuracy_sd": _sd(acc),
        "macro_f1_mean": float(f1.mean()),
        "macro_f1_sd": _sd(f1),
        "sd": "sample standard deviation over folds (n - 1)",
        "kept_epochs": [f["kept_epoch"] for f in folds],
        "pooled": {
            "n": n,
            "correct": correct,
            "accuracy": correct / n if n else None,
            "accuracy_interval": wilson(correct, n),
            "macro_f1": macro_f1_from_confusion(cm),
            "per_class": {c: {"precision": float(prf["precision"][i]), "recall": float(prf["recall"][i]),
                              "f1": float(prf["f1"][i]), "support": int(prf["support"][i])}
                          for i, c in enumerate(classes)},
            "confusion_matrix": cm.tolist(),
            "meaning": "every held-out image once, each predicted by the fold model that did not train on it",
        },
    }


def _sd(values: np.ndarray) -> float | None:
    return float(values.std(ddof=1)) if len(values) > 1 else None


def wilson(successes: int, n: int) -> dict | None:
    """Wilson score 95 % interval of the pooled accuracy (:func:`leukoedge.stats.wilson`)."""
    if n <= 0:
        return None
    low, high = stats_wilson(successes, n)
    return {"low": low, "high": high, "level": 0.95, "method": "Wilson score, images independent"}


def _write(rd: RunDir, summaries: list[dict], k_total: int, first: Manifest, saved: dict, wall: float) -> None:
    """cv.json and the CV model card, after every fold (marked incomplete until all are in)."""
    from .card import build_cv_card, render_cv_markdown

    cv = summarize_folds(summaries, first.classes, k_total)
    cv.update(
        split_kind=first.split_kind, leaky=first.leaky, seed=first.seed, root=first.root, layout=first.layout,
        n_images=len(first.entries), val_from=first.params.get("val_from"),
        duplicate_clusters=first.params.get("duplicate_clusters"),
        options={k: v for k, v in saved.items()},
        audit="run on each fold's test set (fold-k/audit.json, fold-k/model_card.md)" if saved.get("audit")
        else "skipped (--no-audit); run `leukoedge eval RUN/fold-k --audit` per fold",
        wall_seconds=round(wall, 1),
        train_seconds=round(sum(float(s.get("train_seconds") or 0.0) for s in summaries), 1),
    )
    config = RunDir(rd.fold_dir(1)).config() if RunDir(rd.fold_dir(1)).config_path.exists() else None
    pooled_rows = pool_predictions([(s["fold"], RunDir(rd.fold_dir(s["fold"])).predictions_path("test"))
                                    for s in summaries], rd.predictions_path("test"))
    cv["predictions_file"] = None if pooled_rows is None else rd.predictions_path("test").name
    write_json(rd.cv_path, cv)
    card = build_cv_card(cv, config, first)
    write_json(rd.model_card_json, card)
    atomic_write_text(rd.model_card_md, render_cv_markdown(card))
