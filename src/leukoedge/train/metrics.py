"""Classification metrics in pure numpy (no scikit-learn in the package).

Kept free of TensorFlow and sklearn so every formula can be checked against
hand-computed values in the tests and reused by the conversion parity report.

Conventions:
- ``y``: int labels ``[N]``; ``probs``: ``[N, K]`` rows summing to ~1.
- 0/0 in precision/recall/F1 is 0.0 (a class never predicted has precision 0,
  as scikit-learn's ``zero_division=0``).
- ROC AUC is the Mann-Whitney statistic with ties counted as 1/2; it is NaN
  when a class has no positives or no negatives in the data.
- ECE uses equal-width confidence bins (15 by default):
  ``sum_b |acc_b - conf_b| * n_b / N``.
- Bootstrap intervals resample images with replacement, fixed seed, and take
  the 2.5 / 97.5 percentiles.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from ..stats import wilson


def confusion_matrix(y: np.ndarray, pred: np.ndarray, num_classes: int) -> np.ndarray:
    """Rows: true class; columns: predicted class."""
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (np.asarray(y, dtype=np.int64), np.asarray(pred, dtype=np.int64)), 1)
    return cm


def _safe_div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return np.divide(a, b, out=np.zeros_like(a), where=b != 0)


def per_class_prf(cm: np.ndarray) -> dict[str, np.ndarray]:
    tp = np.diag(cm).astype(np.float64)
    precision = _safe_div(tp, cm.sum(axis=0))
    recall = _safe_div(tp, cm.sum(axis=1))
    f1 = _safe_div(2 * precision * recall, precision + recall)
    return {"precision": precision, "recall": recall, "f1": f1, "support": cm.sum(axis=1)}


def accuracy(y: np.ndarray, pred: np.ndarray) -> float:
    y = np.asarray(y)
    return float(np.mean(y == np.asarray(pred))) if len(y) else float("nan")


def macro_f1(y: np.ndarray, pred: np.ndarray, num_classes: int) -> float:
    return float(per_class_prf(confusion_matrix(y, pred, num_classes))["f1"].mean())


def weighted_f1(y: np.ndarray, pred: np.ndarray, num_classes: int) -> float:
    prf = per_class_prf(confusion_matrix(y, pred, num_classes))
    support = prf["support"]
    return float((prf["f1"] * support).sum() / support.sum()) if support.sum() else float("nan")


def roc_auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve of ``scores`` for boolean ``positive`` (ties = 1/2)."""
    scores = np.asarray(scores, dtype=np.float64)
    positive = np.asarray(positive, dtype=bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = _average_ranks(scores)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks with ties given their average rank."""
    order = np.argsort(values, kind="mergesort")
    sorted_vals = values[order]
    ranks = np.empty(len(values), dtype=np.float64)
    start = 0
    while start < len(values):
        end = start
        while end + 1 < len(values) and sorted_vals[end + 1] == sorted_vals[start]:
            end += 1
        ranks[order[start:end + 1]] = (start + end) / 2.0 + 1.0
        start = end + 1
    return ranks


def roc_curve(scores: np.ndarray, positive: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(fpr, tpr) at every distinct threshold, from (0, 0) to (1, 1)."""
    scores = np.asarray(scores, dtype=np.float64)
    positive = np.asarray(positive, dtype=bool)
    order = np.argsort(-scores, kind="mergesort")
    s, p = scores[order], positive[order]
    distinct = np.r_[np.nonzero(np.diff(s))[0], len(s) - 1]
    tps = np.cumsum(p)[distinct]
    fps = (distinct + 1) - tps
    tpr = np.r_[0.0, tps / max(p.sum(), 1)]
    fpr = np.r_[0.0, fps / max((~p).sum(), 1)]
    return fpr, tpr


def one_vs_rest_auc(y: np.ndarray, probs: np.ndarray) -> np.ndarray:
    return np.array([roc_auc(probs[:, c], np.asarray(y) == c) for c in range(probs.shape[1])])


def reliability_bins(y: np.ndarray, probs: np.ndarray, n_bins: int = 15) -> dict[str, np.ndarray]:
    """Per confidence bin: count, mean confidence, accuracy (NaN when empty)."""
    conf = probs.max(axis=1)
    correct = probs.argmax(axis=1) == np.asarray(y)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    idx = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, n_bins - 1)
    count = np.bincount(idx, minlength=n_bins)
    conf_sum = np.bincount(idx, weights=conf, minlength=n_bins)
    acc_sum = np.bincount(idx, weights=correct.astype(np.float64), minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        return {"edges": edges, "count": count, "confidence": conf_sum / count, "accuracy": acc_sum / count}


def expected_calibration_error(y: np.ndarray, probs: np.ndarray, n_bins: int = 15) -> float:
    bins = reliability_bins(y, probs, n_bins)
    mask = bins["count"] > 0
    gaps = np.abs(bins["accuracy"][mask] - bins["confidence"][mask])
    return float((gaps * bins["count"][mask]).sum() / bins["count"].sum())


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
    ECE are not proportions: percentile bootstrap over images.
    """
    y = np.asarray(y, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    k = len(classes)
    pred = probs.argmax(axis=1)
    cm = confusion_matrix(y, pred, k)
    prf = per_class_prf(cm)
    aucs = one_vs_rest_auc(y, probs)
    bins = reliability_bins(y, probs)
    stats = {
        "macro_f1": lambda yy, pp: macro_f1(yy, pp.argmax(1), k),
        "weighted_f1": lambda yy, pp: weighted_f1(yy, pp.argmax(1), k),
        "ece": lambda yy, pp: expected_calibration_error(yy, pp),
    }
    intervals = {name: bootstrap_ci(fn, y, probs, n_resamples=n_resamples, seed=seed) for name, fn in stats.items()}
    finite = aucs[~np.isnan(aucs)]
    collapsed = collapsed_classes(prf["recall"], prf["support"], classes)
    return {
        "n": int(len(y)),
        "classes": list(classes),
        "accuracy": accuracy(y, pred),
        "macro_f1": float(prf["f1"].mean()),
        "weighted_f1": weighted_f1(y, pred, k),
        "ece": expected_calibration_error(y, probs),
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
        "reliability": {"edges": bins["edges"].tolist(), "count": bins["count"].tolist(),
                        "confidence": bins["confidence"].tolist(), "accuracy": bins["accuracy"].tolist()},
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
