"""The evaluation summary of one split: every figure the reports need, with intervals (JSON-ready).

The formulas themselves live in :mod:`leukoedge.stats.metrics` (accuracy, F1,
AUC) and :mod:`leukoedge.stats.calibration` (reliability bins, ECE), shared
with the conversion parity gate; their conventions are documented there
(notably: macro-F1 averages over the classes present in the split's truth or
predictions; metrics of no images are NaN). This module adds the intervals:

- accuracy and per-class recall are proportions: Wilson score intervals;
- F1 and ECE are not: percentile bootstrap over images (resampled with
  replacement, fixed seed, 2.5 / 97.5 percentiles).

numpy only (no TensorFlow, no scikit-learn), so every figure can be checked
against hand-computed values in the tests.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from ..stats import wilson
from ..stats.calibration import expected_calibration_error, reliability_diagram
from ..stats.metrics import (accuracy, confusion_matrix, macro_f1, macro_f1_from_confusion, one_vs_rest_auc,
                             per_class_prf, present_classes, weighted_f1)


def bootstrap_ci(stat: Callable[[np.ndarray, np.ndarray], float], y: np.ndarray, probs: np.ndarray, *,
                 n_resamples: int = 1000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of ``stat(y, probs)`` over resampled images."""
    rng = np.random.default_rng(seed)
    n = len(y)
    values = []
    for _ in range(n_resamples):
        idx = rng.integers(0, n, n)
        values.append(stat(y[idx], probs[idx]))
    values = np.asarray(values, dtype=np.float64)
    values = values[~np.isnan(values)]
    if not len(values):
        return float("nan"), float("nan")
    alpha = (1.0 - level) / 2.0
    return float(np.quantile(values, alpha)), float(np.quantile(values, 1.0 - alpha))


def _wilson_dict(k: int, n: int) -> dict:
    lo, hi = wilson(k, n)
    return {"low": lo, "high": hi, "level": 0.95, "method": "wilson", "k": k, "n": n}


def collapsed_classes(recall: Sequence[float], support: Sequence[int], classes: Sequence[str]) -> list[str]:
    """Classes present in the data that the model never gets right (recall 0)."""
    return [c for c, r, s in zip(classes, recall, support) if s > 0 and r == 0.0]


def summarize(y: np.ndarray, probs: np.ndarray, classes: Sequence[str], *, n_resamples: int = 1000,
              seed: int = 0) -> dict:
    """Every metric the reports need, with 95 % intervals (JSON-ready).

    Accuracy and per-class recall are proportions: Wilson score intervals, which
    never collapse to [100 %, 100 %] on a small test split (issue 14). F1 and
    ECE are not proportions: percentile bootstrap over images. ``macro_f1``
    averages over ``macro_f1_classes``, the classes in the split's truth or
    predictions (a class the split lacks and the model never predicts has no
    F1; see :mod:`leukoedge.stats.metrics`).
    """
    y = np.asarray(y, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    k = len(classes)
    pred = probs.argmax(axis=1)
    cm = confusion_matrix(y, pred, k)
    prf = per_class_prf(cm)
    aucs = one_vs_rest_auc(y, probs)
    rel = reliability_diagram(probs, y)
    stats = {
        "macro_f1": lambda yy, pp: macro_f1(yy, pp.argmax(1), k),
        "weighted_f1": lambda yy, pp: weighted_f1(yy, pp.argmax(1), k),
        "ece": lambda yy, pp: expected_calibration_error(pp, yy),
    }
    intervals = {name: bootstrap_ci(fn, y, probs, n_resamples=n_resamples, seed=seed) for name, fn in stats.items()}
    finite = aucs[~np.isnan(aucs)]
    collapsed = collapsed_classes(prf["recall"], prf["support"], classes)
    return {
        "n": int(len(y)),
        "classes": list(classes),
        "accuracy": accuracy(y, pred),
        "macro_f1": macro_f1_from_confusion(cm),
        "macro_f1_classes": [c for c, present in zip(classes, present_classes(cm)) if present],
        "weighted_f1": weighted_f1(y, pred, k),
        "ece": rel.ece,
        "macro_auc": float(finite.mean()) if len(finite) else float("nan"),
        "intervals": {"accuracy": _wilson_dict(int(np.sum(pred == y)), len(y)),
                      **{name: {"low": lo, "high": hi, "level": 0.95, "method": f"bootstrap n={n_resamples} seed={seed}"}
                         for name, (lo, hi) in intervals.items()}},
        "per_class": {
            c: {"precision": float(prf["precision"][i]), "recall": float(prf["recall"][i]),
                "recall_interval": _wilson_dict(int(cm[i, i]), int(prf["support"][i])),
                "f1": float(prf["f1"][i]), "support": int(prf["support"][i]), "roc_auc": float(aucs[i])}
            for i, c in enumerate(classes)
        },
        "confusion_matrix": cm.tolist(),
        "reliability": {"edges": rel.edges.tolist(), "count": rel.counts.tolist(),
                        "confidence": rel.confidence.tolist(), "accuracy": rel.accuracy.tolist()},
        "collapsed_classes": collapsed,
    }


def jsonable(obj):
    """Replace NaN/inf floats by None (strict JSON) and numpy scalars by Python ones."""
    if isinstance(obj, dict):
        return {k: jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    return obj
