"""Pure post-processing: probabilities, temperature, top-1 and abstention.

No interpreter here, so every function is tested with plain arrays.

Why renormalise: an int8 softmax output is quantised in steps of 1/256, so its
dequantised values rarely sum to exactly 1; clipping negatives and dividing by
the sum gives a proper distribution without changing the ranking.

Temperature on probabilities: ``softmax(z / T)`` equals ``p ** (1 / T)``
renormalised, because ``log p = z - logsumexp(z)`` differs from ``z`` only by
a constant. So a temperature fitted on logits in training applies exactly to
the model's softmax output on the device.

Abstention ("not like the training images"): ``bundle.json`` names a score,
a threshold and on which side of it to abstain (``abstain_when``: ``"below"``
or ``"above"``; when absent, the score's own default). ``max_softmax`` is the
largest probability, as ``leukoedge.train.ood`` defines it, so a LOW value
abstains; ``entropy`` is normalised entropy, so a HIGH value abstains. Scores
are looked up in :data:`SCORES`; a module ``leukoedge.runtime.ood``
(feature-based scores such as Mahalanobis distance) may add more with
:func:`register_score` and is imported on demand the first time an unknown
name is asked for.

Fitted scores (``mahalanobis``, ``knn``; issue 7) need arrays fitted at
conversion time: ``convert`` stores an :class:`~leukoedge.runtime.ood.OODScorer`
state in the bundle and :func:`abstain` receives the rebuilt scorer. The
threshold and side always come from the bundle's abstention dict, so the
device and the conversion report take the very same decision.

Temperature with a floor: ``convert`` fits the temperature on the converted
model's own probabilities clipped at ``log_prob_floor`` (an int8 softmax rounds
small probabilities to exactly 0); :func:`apply_temperature` given that floor
computes exactly what was fitted.
"""
from __future__ import annotations

import importlib
from typing import Callable

import numpy as np

from ..errors import BundleError

#: name -> (fn(probabilities (K,), features (H, W, C) or None, abstention dict) -> float,
#:          default side of the threshold that abstains: "below" or "above")
SCORES: dict[str, tuple[Callable[[np.ndarray, np.ndarray | None, dict], float], str]] = {}
SIDES = ("below", "above")
_EPS = 1e-12


def register_score(name: str, abstain_when: str):
    """Decorator adding an abstention score under ``name``."""
    if abstain_when not in SIDES:
        raise ValueError(f"abstain_when must be one of {SIDES}")

    def wrap(fn):
        SCORES[name] = (fn, abstain_when)
        return fn

    return wrap


@register_score("max_softmax", "below")
def _max_softmax(probs: np.ndarray, features, abstention: dict) -> float:
    """The largest probability (Hendrycks & Gimpel 2017; weak on foreign images, see issue 7)."""
    return float(np.max(probs))


@register_score("entropy", "above")
def _entropy(probs: np.ndarray, features, abstention: dict) -> float:
    """Shannon entropy normalised to [0, 1] by log(K)."""
    p = np.clip(probs.astype(np.float64), _EPS, 1.0)
    return float(-(p * np.log(p)).sum() / np.log(len(p)))


def get_score(name: str):
    """The scoring function for ``name`` or BundleError listing the known ones."""
    if name not in SCORES:
        try:
            importlib.import_module("leukoedge.runtime.ood")
        except ImportError:
            pass
    if name not in SCORES:
        raise BundleError(
            f"the bundle's abstention score {name!r} is unknown to this runtime; "
            f"known: {', '.join(sorted(SCORES))}",
            hint="update leukoedge on the device, or re-convert the run",
        )
    return SCORES[name]


def normalise(raw: np.ndarray) -> np.ndarray:
    """Clip to >= 0 and divide by the sum (uniform if everything is zero)."""
    p = np.clip(np.asarray(raw, dtype=np.float64).reshape(-1), 0.0, None)
    total = p.sum()
    if total <= 0:
        return np.full(p.shape, 1.0 / p.size)
    return p / total


def apply_temperature(probs: np.ndarray, temperature: float, floor: float | None = None) -> np.ndarray:
    """``softmax(z / T)`` computed from ``p = softmax(z)``; see module docstring.

    Without ``floor`` a zero probability stays zero. With ``floor`` (what
    ``convert --calibrate`` fits with), ``softmax(log(max(p, floor)) / T)``,
    the same formula as :func:`leukoedge.train.calibration.apply_temperature`
    on :func:`~leukoedge.train.calibration.log_probs`.
    """
    if not temperature > 0:
        raise BundleError(f"calibration temperature must be > 0, got {temperature}")
    if floor is not None:
        if not 0.0 < floor < 1.0:
            raise BundleError(f"calibration log_prob_floor must be in (0, 1), got {floor}")
        logp = np.log(np.maximum(np.asarray(probs, dtype=np.float64), floor)) / temperature
        e = np.exp(logp - logp.max())
        return e / e.sum()
    if temperature == 1.0:
        return probs
    logp = np.log(np.clip(probs, _EPS, 1.0)) / temperature
    logp -= logp.max()
    e = np.exp(logp) * (probs > 0)
    return e / e.sum()


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
