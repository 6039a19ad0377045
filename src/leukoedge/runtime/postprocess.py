"""Pure post-processing: probabilities, top-1 and abstention.

No interpreter here, so every function is tested with plain arrays.

Why renormalise: an int8 softmax output is quantised in steps of 1/256, so its
dequantised values rarely sum to exactly 1; clipping negatives and dividing by
the sum gives a proper distribution without changing the ranking.

Temperature: the classifier applies
:func:`leukoedge.stats.calibration.temperature_scale_probs` (``softmax(z / T)``
from the probabilities alone, with the bundle's ``log_prob_floor``: the
formula ``convert`` fitted the temperature with).

Abstention ("not like the training images"): ``bundle.json`` names a score,
a threshold and on which side of it to abstain (``abstain_when``: ``"below"``
or ``"above"``; when absent, the score's own default). Scores are looked up in
the registry of :mod:`.scores` (``max_softmax``: a LOW value abstains;
``entropy`` and the feature distances: a HIGH value abstains).

Fitted scores (``mahalanobis``, ``knn``; issue 7) need arrays fitted at
conversion time: ``convert`` stores an :class:`~leukoedge.runtime.ood.OODScorer`
state in the bundle and :func:`abstain` receives the rebuilt scorer. The
threshold and side always come from the bundle's abstention dict, so the
device and the conversion report take the very same decision.
"""
from __future__ import annotations

import numpy as np

from ..errors import BundleError
from ..stats.thresholds import SIDES
from .scores import get_score


def normalise(raw: np.ndarray) -> np.ndarray:
    """Clip to >= 0 and divide by the sum (uniform if everything is zero)."""
    p = np.clip(np.asarray(raw, dtype=np.float64).reshape(-1), 0.0, None)
    total = p.sum()
    if total <= 0:
        return np.full(p.shape, 1.0 / p.size)
    return p / total


def top1(probs: np.ndarray, labels: tuple[str, ...]) -> tuple[int, str, float]:
    """(index, label, confidence); ties go to the lower index like argmax."""
    if len(probs) != len(labels):
        raise BundleError(f"the model gives {len(probs)} scores but the bundle has {len(labels)} labels")
    idx = int(np.argmax(probs))
    return idx, labels[idx], float(probs[idx])


def abstain_side(abstention: dict) -> str:
    """``"below"`` or ``"above"``: the bundle's explicit choice, else the score's default."""
    side = abstention.get("abstain_when") or get_score(abstention["score"])[1]
    if side not in SIDES:
        raise BundleError(f"abstain_when must be one of {', '.join(SIDES)}, got {side!r}")
    return side


def abstain(
    probs: np.ndarray, features: np.ndarray | None, abstention: dict | None, scorer=None
) -> tuple[float | None, bool]:
    """(ood_score, abstained); (None, False) when the bundle has no abstention.

    Args:
        probs: the model's probabilities BEFORE temperature scaling.
        features: the dequantised feature map (H, W, C) or vector, or None.
        abstention: the bundle's abstention dict (score, threshold, abstain_when).
        scorer: a fitted :class:`~leukoedge.runtime.ood.OODScorer` for fitted
            scores (mahalanobis, knn); its input is ``features`` or ``probabilities``.
    """
    if not abstention or not abstention.get("score"):
        return None, False
    if scorer is not None:
        values = features if scorer.input == "features" else probs
        if values is None:
            raise BundleError(f"the abstention score {abstention['score']!r} needs the model's {scorer.input} output")
        score = float(scorer.score(np.asarray(values)[None, ...])[0])
    else:
        fn, _ = get_score(abstention["score"])
        score = fn(probs, features, abstention)
    threshold = abstention.get("threshold")
    if threshold is None:
        return score, False
    if abstain_side(abstention) == "below":
        return score, bool(score < float(threshold))
    return score, bool(score > float(threshold))
