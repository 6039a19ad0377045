"""Abstention thresholds: how a score and a target rate on in-distribution images become one number.

Why here: the training report (max-softmax, ``ood.json``) and the conversion
step (the bundle's scorer, what the device decides by) each had a
``choose_threshold`` with the same name and different rules. Both rules live
here now, under names that say which rule they are:

- :func:`threshold_for_rate` (the bundle, hence the device): the threshold is
  one of the observed scores, and **at most** ``floor(rate * n)`` of the ``n``
  in-distribution scores lie strictly on the abstaining side of it (fewer when
  scores tie at the threshold). ``abstain_when="above"``: an image abstains
  when its score is ``> threshold`` (distances: high = foreign);
  ``"below"``: when ``< threshold`` (max-softmax: low = foreign). The rule
  counts images, so the rate measured on the same images never exceeds the target.
- :func:`quantile_threshold` (``leukoedge train`` / ``eval``'s ``ood.json``):
  ``np.quantile`` of the scores with linear interpolation, abstaining below it;
  about ``quantile`` of the images lie below, the threshold may fall between
  two observed scores.

Both raise :class:`~leukoedge.errors.UsageError` on no scores, non-finite
scores or a rate outside (0, 1).
"""
from __future__ import annotations

import numpy as np

from ..errors import UsageError

SIDES = ("below", "above")


def _scores(scores, who: str) -> np.ndarray:
    s = np.asarray(scores, dtype=np.float64).ravel()
    if s.size == 0 or not np.all(np.isfinite(s)):
        raise UsageError(f"{who} needs at least one finite in-distribution score, all of them finite")
    return s


def threshold_for_rate(scores, rate: float = 0.05, *, abstain_when: str = "above") -> float:
    """The observed score with at most ``floor(rate * n)`` scores strictly beyond it (see module docstring)."""
    if abstain_when not in SIDES:
        raise UsageError(f"abstain_when must be one of {', '.join(SIDES)}, got {abstain_when!r}")
    if not 0.0 < rate < 1.0:
        raise UsageError(f"target abstention rate must be in (0, 1), got {rate}")
    s = np.sort(_scores(scores, "threshold_for_rate"))
    k = int(np.floor(rate * s.size + 1e-9))
    # "below" is the mirror image: the k-th smallest leaves k scores strictly under it (negation is exact).
    return float(s[s.size - k - 1] if abstain_when == "above" else s[k])


def quantile_threshold(scores, quantile: float = 0.05) -> float:
    """``np.quantile(scores, quantile)`` (linear interpolation): abstain below it (see module docstring)."""
    if not 0.0 < quantile < 1.0:
        raise UsageError(f"abstention quantile must be in (0, 1), got {quantile}")
    return float(np.quantile(_scores(scores, "quantile_threshold"), quantile))


__all__ = ["SIDES", "quantile_threshold", "threshold_for_rate"]
