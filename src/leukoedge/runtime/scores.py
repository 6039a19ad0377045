"""The registry of abstention scores by name: what ``bundle.json``'s ``abstention.score`` may say.

Why its own module: the registry used to live in :mod:`.postprocess`, and
:mod:`.ood` (the fitted scorers) registered its score names there while
``postprocess`` imported ``ood`` on demand to find them: an import circle. Both
now import this module, which imports neither.

Each entry is ``name -> (fn, default side)``: ``fn(probabilities (K,),
features or None, abstention dict) -> float`` and the side of the threshold
that abstains when the bundle does not say (``abstain_when``):

- ``max_softmax``: the largest probability (as ``leukoedge.train.ood`` defines
  it), so a LOW value abstains;
- ``entropy``: Shannon entropy normalised to [0, 1], so a HIGH value abstains;
- ``mahalanobis``, ``knn`` (:data:`FEATURE_METHODS`, issue 7): distances in
  feature space, a HIGH value abstains. They need arrays fitted at conversion
  time, so ``postprocess.abstain`` scores them with the bundle's
  :class:`~leukoedge.runtime.ood.OODScorer`; the entry here only gives their
  side and a clear error when no scorer was passed.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from ..errors import BundleError
from ..stats.thresholds import SIDES

#: Scores computed from the model's feature map by a scorer fitted at conversion time.
FEATURE_METHODS = ("mahalanobis", "knn")

ScoreFn = Callable[[np.ndarray, "np.ndarray | None", dict], float]
#: name -> (score function, default side of the threshold that abstains).
SCORES: dict[str, tuple[ScoreFn, str]] = {}
_EPS = 1e-12


def register_score(name: str, abstain_when: str):
    """Decorator adding an abstention score under ``name``."""
    if abstain_when not in SIDES:
        raise ValueError(f"abstain_when must be one of {SIDES}")

    def wrap(fn):
        SCORES[name] = (fn, abstain_when)
        return fn

    return wrap


def get_score(name: str) -> tuple[ScoreFn, str]:
    """The scoring function and default side for ``name``, or BundleError listing the known ones."""
    if name not in SCORES:
        raise BundleError(
            f"the bundle's abstention score {name!r} is unknown to this runtime; "
            f"known: {', '.join(sorted(SCORES))}",
            hint="update leukoedge on the device, or re-convert the run",
        )
    return SCORES[name]


@register_score("max_softmax", "below")
def _max_softmax(probs: np.ndarray, features, abstention: dict) -> float:
    """The largest probability (Hendrycks & Gimpel 2017; weak on foreign images, see issue 7)."""
    return float(np.max(probs))


@register_score("entropy", "above")
def _entropy(probs: np.ndarray, features, abstention: dict) -> float:
    """Shannon entropy normalised to [0, 1] by log(K)."""
    p = np.clip(probs.astype(np.float64), _EPS, 1.0)
    return float(-(p * np.log(p)).sum() / np.log(len(p)))


def _needs_fitted_scorer(name: str) -> ScoreFn:
    def score(probs, features, abstention):
        raise BundleError(
            f"the abstention score {name!r} needs the fitted scorer stored in the bundle "
            "(abstention.scorer); use Classifier, which loads it",
        )

    return score


for _name in FEATURE_METHODS:
    register_score(_name, "above")(_needs_fitted_scorer(_name))
