"""Evaluate a run directory: metrics, plots, abstention threshold, model card.

``evaluate_run`` reads only the run directory (model, config, manifest), so
``leukoedge eval RUN_DIR`` reproduces what ``train`` wrote at its end. The
validation split is always evaluated too: the collapse check and the
abstention threshold are decided on it, never on test.

Outputs (see :mod:`.rundir`): ``metrics.json`` (test) / ``metrics_<split>.json``,
``predictions.csv`` / ``predictions_<split>.csv`` (every image's answer, :mod:`.predictions`),
``ood.json``, ``model_card.{md,json}``, ``plots/*.png`` (with ``errors.png``, the
misclassified images).

What can fail: :class:`RunError` (incomplete run directory),
:class:`DatasetError` (images missing or unreadable, empty split or OOD folder).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import numpy as np

from ..data.records import SPLITS
from ..errors import UsageError
from ..files import atomic_write_text, write_json
from ..stats.metrics import auroc
from ..stats.thresholds import quantile_threshold
from . import plots
from .card import build_card, render_markdown
from .dataset import ImageCache, eval_dataset, load_split
from .metrics import jsonable, summarize
from .ood import SCORE_NAME, load_folder, max_softmax
from .predictions import errors_by_confidence, gallery_examples, write_predictions
from .rundir import RunDir

log = logging.getLogger(__name__)

#: Fraction of in-distribution (validation) images allowed to abstain.
OOD_QUANTILE = 0.05


def predict(model, x: np.ndarray, batch_size: int = 64) -> np.ndarray:
    if not len(x):
        return np.zeros((0, model.output_shape[-1]), dtype=np.float64)
    return np.asarray(model.predict(eval_dataset(x, batch_size=batch_size), verbose=0), dtype=np.float64)


def warn_if_collapsed(summary: dict, split: str, model_name: str) -> None:
    """The loud warning: a class with recall 0 means the model is useless for it."""
    if summary["collapsed_classes"]:
        log.warning("!" * 72)
        log.warning("COLLAPSE: %s has recall 0 on the %s split for class(es) %s.", model_name, split,
                    ", ".join(summary["collapsed_classes"]))
        log.warning("It never predicts them correctly; do NOT use or convert this model.")
        log.warning("!" * 72)


def evaluate_run(run_dir: str | Path, splits: Sequence[str] = ("val", "test"), ood_dirs: Sequence[str | Path] = (),
                 *, cache: ImageCache | None = None, model=None, batch_size: int = 64,
                 n_resamples: int = 1000) -> dict:
    """Evaluate ``splits`` (val always included) and write every report file; returns metrics per split."""
    import keras

    from .. import models  # noqa: F401  (registers SigmoidPair for loading)

    for split in splits:
        if split not in SPLITS:
            raise UsageError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    rd = RunDir(run_dir)
    rd.require(rd.config_path, rd.manifest_path, rd.model_path)
    config, manifest = rd.config(), rd.manifest()
    spec = config.preprocess_spec
    cache = cache or ImageCache()
    if model is None:
        model = keras.models.load_model(rd.model_path, compile=False)
    root = config.data_root or manifest.root
    wanted = ["val"] + [s for s in splits if s != "val"]

    results: dict[str, dict] = {}
    probs_by_split: dict[str, np.ndarray] = {}
    for split in wanted:
        x, y, entries = load_split(manifest, split, spec, cache, root)
        probs = predict(model, x, batch_size)
        summary = summarize(y, probs, config.classes, n_resamples=n_resamples, seed=0)
        summary.update(split=split, split_kind=manifest.split_kind, leaky=manifest.leaky, model=config.model,
                       **_write_answers(rd, split, x, entries, y, probs, config.classes))
        if summary["collapsed_classes"]:
            summary["collapse_warning"] = (f"recall 0 for {', '.join(summary['collapsed_classes'])}: "
                                           "the model collapsed; do not use it")
        warn_if_collapsed(summary, split, config.model)
        results[split] = jsonable(summary)
        probs_by_split[split] = probs
        write_json(rd.metrics_path(split), results[split])
        _split_plots(rd, split, y, probs, summary, config.classes)

    # Without --ood, the folders of the last evaluation are scored again (never dropped silently);
    # one that has vanished keeps its old figure, marked stale.
    previous = {} if ood_dirs else (rd.read(rd.ood_path) or {}).get("auroc", {})
    ood_dirs = list(ood_dirs) or [e["path"] for e in previous.values() if Path(e.get("path", "")).is_dir()]
    ood = _ood_report(model, probs_by_split, ood_dirs, spec, batch_size)
    for name, entry in previous.items():
        if name not in ood["auroc"]:
            ood["auroc"][name] = {**entry, "stale": True,
                                  "note": "folder not found at this evaluation; the figure is from an earlier one"}
    write_json(rd.ood_path, jsonable(ood))
    history = rd.read(rd.history_path)
    if history and history.get("history"):
        plots.training_curves(history["history"], rd.plots_dir / "training_curves.png")
    write_card(rd.path, results, ood)
    return results


def write_card(run_dir: str | Path, results: dict[str, dict], ood: dict | None = None) -> dict:
    """(Re)write ``model_card.{json,md}`` from ``results`` (metrics per split) and the run directory's files.

    Picks up ``ood.json`` (when ``ood`` is None), the training summary and, when
    present, ``audit.json`` (the "Shortcut audit" section; flagged stale if
    ``model.keras`` changed since). ``eval --audit`` calls it again after the audit.
    """
    from .audit_run import load_audit

    rd = RunDir(run_dir)
    config, manifest = rd.config(), rd.manifest()
    ood = ood if ood is not None else rd.read(rd.ood_path)
    history = rd.read(rd.history_path)
    training = {k: history[k] for k in ("epochs_run", "best_epoch", "select", "kept", "best_val_loss",
                                        "stopped_early", "train_seconds", "devices")
                if history and k in history}
    card = jsonable(build_card(config, manifest, results, ood, training, audit=load_audit(rd.path)))
    write_json(rd.model_card_json, card)
    atomic_write_text(rd.model_card_md, render_markdown(card))
    return card


def _write_answers(rd: RunDir, split: str, x, entries, y, probs, classes) -> dict:
    """``predictions[_split].csv`` and the error gallery; returns what the metrics and the card say of them.

    A gallery left by an earlier evaluation is removed when this model makes no
    error, so no picture of another model's mistakes stays beside its metrics.
    """
    write_predictions(rd.predictions_path(split), entries, y, probs, classes)
    errors = errors_by_confidence(y, probs)
    wrong = len(errors)
    examples = gallery_examples(x, entries, y, probs, classes, errors)
    gallery = rd.errors_plot_path(split)
    if examples:
        shown = f"the {len(examples)} most confident of {wrong}" if wrong > len(examples) else f"all {wrong}"
        plots.audit_panel(examples, gallery, title=f"misclassified {split} images ({shown}): "
                          "true -> predicted (confidence)")
    else:
        gallery.unlink(missing_ok=True)
    return {"misclassified": wrong,
            "predictions_file": rd.predictions_path(split).name,
            "errors_plot": f"plots/{gallery.name}" if examples else None}


def _split_plots(rd: RunDir, split: str, y, probs, summary: dict, classes) -> None:
    suffix = "" if split == "test" else f"_{split}"
    plots.confusion(summary["confusion_matrix"], classes, rd.plots_dir / f"confusion_matrix{suffix}.png",
                    title=f"confusion matrix ({split}, {summary['split_kind']} split)")
    aucs = [summary["per_class"][c]["roc_auc"] for c in classes]
    plots.roc(y, probs, classes, rd.plots_dir / f"roc{suffix}.png", [a if a is not None else float("nan") for a in aucs])
    plots.reliability(jsonable(summary["reliability"]), summary["ece"], rd.plots_dir / f"reliability{suffix}.png")


def _ood_report(model, probs_by_split: dict, ood_dirs, spec, batch_size: int) -> dict:
    threshold = quantile_threshold(max_softmax(probs_by_split["val"]), OOD_QUANTILE)
    reference = "test" if "test" in probs_by_split else "val"
    id_scores = max_softmax(probs_by_split[reference])
    report = {
        "score": SCORE_NAME,
        "threshold": threshold,
        "abstain_when": "below",
        "quantile": OOD_QUANTILE,
        "chosen_on": "val",
        "val_abstain_rate": float(np.mean(max_softmax(probs_by_split["val"]) < threshold)),
        "test_abstain_rate": float(np.mean(id_scores < threshold)) if reference == "test" else None,
        "auroc_reference_split": reference,
        "auroc": {},
    }
    for folder in ood_dirs:
        x = load_folder(folder, spec)
        scores = max_softmax(predict(model, x, batch_size))
        report["auroc"][Path(folder).name] = {
            # A LOW max-softmax is foreign: negated, so that higher = more foreign as auroc expects.
            "path": str(folder), "n": int(len(x)), "auroc": auroc(-id_scores, -scores),
            "abstain_rate": float(np.mean(scores < threshold)),
        }
    return report
