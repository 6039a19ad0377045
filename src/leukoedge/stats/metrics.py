"""Classification metrics in pure numpy: the ONE implementation train, convert and the reports use.

Why here: training's evaluation and the conversion parity gate each had their
own accuracy and macro-F1, and they disagreed (empty input gave NaN in one and
0.0 in the other; macro-F1 averaged over all classes in one and over the
classes present in the other), so the same predictions could print two
different macro-F1 values in the model card and the parity report.

Conventions (those of scikit-learn, so any figure can be checked against it):

- ``y_true`` / ``y_pred``: integer labels ``0 .. num_classes - 1``; anything
  else is a :class:`~leukoedge.errors.UsageError`.
- Empty input: accuracy, macro-F1 and weighted F1 of no images are **NaN**
  (undefined, as ``0 / 0``), never 0.0: a report of an empty split must not read
  as "the model is always wrong".
- 0/0 in a class's precision, recall or F1 is **0.0** (a class never predicted
  has precision 0; scikit-learn's ``zero_division=0``).
- Macro-F1 is the unweighted mean of per-class F1 over the labels **present in
  y_true or y_pred** (scikit-learn's ``f1_score(average="macro")`` with
  ``labels=None``). A class absent from a split and never predicted on it has
  no F1 to average: counting it as 0 would punish the model for the split. A
  class present but never predicted (a collapsed class) still counts as 0.
- Weighted F1 weights each class by its support; classes without support weigh 0.
- ROC AUC is the Mann-Whitney statistic with ties counted 1/2 (midranks). It is
  **NaN** when undefined: no positives, no negatives, or a non-finite score (a
  per-class table must still carry a value for a class missing from a split).

numpy only; importable on the device.
"""
from __future__ import annotations

import numpy as np

from ..errors import UsageError


def _labels(values, name: str) -> np.ndarray:
    a = np.asarray(values).ravel()
    if a.size and not (np.issubdtype(a.dtype, np.integer) or np.issubdtype(a.dtype, np.bool_)):
        if not np.all(np.isfinite(a)) or not np.all(a == np.round(a)):
            raise UsageError(f"{name} must be integer class labels")
    return a.astype(np.int64)


def confusion_matrix(y_true, y_pred, num_classes: int) -> np.ndarray:
    """``(K, K)`` counts; rows: true class, columns: predicted class."""
    y, p = _labels(y_true, "y_true"), _labels(y_pred, "y_pred")
    if y.shape != p.shape:
        raise UsageError(f"y_true and y_pred differ in length ({y.size} vs {p.size})")
    if y.size and (min(y.min(), p.min()) < 0 or max(y.max(), p.max()) >= num_classes):
        raise UsageError(f"labels must lie in 0..{num_classes - 1}")
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (y, p), 1)
    return cm


def _safe_div(a, b) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return np.divide(a, b, out=np.zeros_like(a), where=b != 0)


def per_class_prf(cm: np.ndarray) -> dict[str, np.ndarray]:
    """Per class ``precision``, ``recall``, ``f1`` (0/0 -> 0) and ``support`` (true count) from a confusion matrix."""
    cm = np.asarray(cm)
    tp = np.diag(cm).astype(np.float64)
    precision = _safe_div(tp, cm.sum(axis=0))
    recall = _safe_div(tp, cm.sum(axis=1))
    f1 = _safe_div(2 * precision * recall, precision + recall)
    return {"precision": precision, "recall": recall, "f1": f1, "support": cm.sum(axis=1)}


def present_classes(cm: np.ndarray) -> np.ndarray:
    """Boolean ``(K,)``: classes that occur in the truth or in the predictions (what macro-F1 averages over)."""
    cm = np.asarray(cm)
    return (cm.sum(axis=0) + cm.sum(axis=1)) > 0


def macro_f1_from_confusion(cm: np.ndarray) -> float:
    """Mean F1 over :func:`present_classes`; NaN for an empty matrix (see module docstring)."""
    present = present_classes(cm)
    if not present.any():
        return float("nan")
    return float(per_class_prf(cm)["f1"][present].mean())


def accuracy(y_true, y_pred) -> float:
    """Fraction of equal labels; NaN for empty input."""
    y, p = np.asarray(y_true).ravel(), np.asarray(y_pred).ravel()
    if y.shape != p.shape:
        raise UsageError(f"y_true and y_pred differ in length ({y.size} vs {p.size})")
    return float(np.mean(y == p)) if y.size else float("nan")


def macro_f1(y_true, y_pred, num_classes: int) -> float:
    """Unweighted mean F1 over the labels present in ``y_true`` or ``y_pred``; NaN for empty input."""
    return macro_f1_from_confusion(confusion_matrix(y_true, y_pred, num_classes))


def weighted_f1(y_true, y_pred, num_classes: int) -> float:
    """Support-weighted mean F1; NaN for empty input."""
    prf = per_class_prf(confusion_matrix(y_true, y_pred, num_classes))
    support = prf["support"]
    return float((prf["f1"] * support).sum() / support.sum()) if support.sum() else float("nan")


def midranks(values) -> np.ndarray:
    """1-based ranks, tied values sharing the mean of their ranks."""
    x = np.asarray(values, dtype=np.float64).ravel()
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    starts = np.flatnonzero(np.r_[True, xs[1:] != xs[:-1]])
    ends = np.r_[starts[1:], xs.size]
    ranks = np.empty(x.size, dtype=np.float64)
    ranks[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)
    return ranks


def roc_auc(scores, positive) -> float:
    """Area under the ROC curve of ``scores`` for boolean ``positive`` (higher score = more positive, ties 1/2).

    NaN when there are no positives or no negatives, or a score is not finite.
    """
    s = np.asarray(scores, dtype=np.float64).ravel()
    pos = np.asarray(positive, dtype=bool).ravel()
    if s.shape != pos.shape:
        raise UsageError(f"{s.size} scores but {pos.size} labels")
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0 or not np.all(np.isfinite(s)):
        return float("nan")
    return float((midranks(s)[pos].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def auroc(in_scores, out_scores) -> float:
    """Two-sample AUROC: P(out > in) + 1/2 P(tie), the out-of-distribution side as the positive class.

    The same statistic as :func:`roc_auc` (so the same NaN convention); scores
    are oriented "higher = more foreign": negate scores where a LOW value is
    foreign (max-softmax) before calling.
    """
    a = np.asarray(in_scores, dtype=np.float64).ravel()
    b = np.asarray(out_scores, dtype=np.float64).ravel()
    return roc_auc(np.r_[a, b], np.r_[np.zeros(a.size, bool), np.ones(b.size, bool)])


def roc_curve(scores, positive) -> tuple[np.ndarray, np.ndarray]:
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


def one_vs_rest_auc(y_true, probs) -> np.ndarray:
    """``(K,)`` ROC AUC of each class's probability against the rest (NaN for a class absent or always present)."""
    y = np.asarray(y_true)
    probs = np.asarray(probs, dtype=np.float64)
    return np.array([roc_auc(probs[:, c], y == c) for c in range(probs.shape[1])])


__all__ = [
    "accuracy",
    "auroc",
    "confusion_matrix",
    "macro_f1",
    "macro_f1_from_confusion",
    "midranks",
    "one_vs_rest_auc",
    "per_class_prf",
    "present_classes",
    "roc_auc",
    "roc_curve",
    "weighted_f1",
]
