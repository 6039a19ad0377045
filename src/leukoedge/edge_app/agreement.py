"""The device's agreement with its reviewers: the one accuracy figure measured on the lab's own smears.

What counts (issue 16):

- only reviewed results; a review of ``unusable`` says the capture is bad, not
  that the model was wrong, so it is left out (and counted apart);
- retakes are left out too: the device refused them for their quality and gave
  no label, so there is nothing to agree with;
- abstentions stay IN, with the model's top class as its answer. Leaving them
  out would flatter the device exactly where it is weakest (the fields unlike
  its training images), and the reviewer saw them first (the review queue puts
  them at the top). How many there are is reported (``abstained``) so a reader can
  weigh them.
- agreement = the model's top class equals the reviewer's label. Per label means
  per REVIEWER label (of the fields the reviewer called X, how many the device
  called X): the recall of each class against the lab's own truth.

Every figure comes with its Wilson 95 % interval (:mod:`leukoedge.stats.intervals`),
which never collapses to a point at small n: three agreeing reviews read
"100 % (44-100 %)", not "100 %". Figures with no reviews are null, never NaN
(which is not JSON).

Pure Python: computed from grouped counts (:meth:`ResultStore.review_pairs`),
so it costs one query however many results are stored.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from ..stats.intervals import LEVEL, Proportion
from .storage import REVIEW_UNUSABLE


@dataclass(frozen=True)
class Agreement:
    """Agreement overall and per reviewer label, with what was left out."""

    overall: Proportion
    per_label: dict[str, Proportion] = field(default_factory=dict)
    unusable: int = 0
    retakes: int = 0
    abstained: int = 0

    def to_dict(self) -> dict:
        return {
            "overall": proportion_dict(self.overall),
            "per_label": {label: proportion_dict(p) for label, p in self.per_label.items()},
            "excluded": {"unusable": self.unusable, "retake": self.retakes},
            "abstained_included": self.abstained,
            "level": self.overall.level,
            "method": "wilson",
            "meaning": ("share of reviewed results whose model top class equals the reviewer's label; "
                        "reviews of 'unusable' and retakes excluded, abstentions included with their top class"),
        }


def proportion_dict(p: Proportion) -> dict:
    """JSON-ready: value / low / high are null with no reviews (instead of NaN and a 0-1 interval)."""
    if p.n == 0:
        return {"value": None, "low": None, "high": None, "k": 0, "n": 0}
    lo, hi = p.interval
    return {"value": p.value, "low": lo, "high": hi, "k": p.k, "n": p.n}


def agreement(pairs: Iterable[tuple[str, str, bool, bool, int]], labels: Sequence[str] = (), *,
              level: float = LEVEL) -> Agreement:
    """Agreement from (predicted label, review label, retake, abstained, count) groups.

    ``labels`` (the bundle's classes) always appear in ``per_label``, with n = 0
    when nobody has reviewed one yet; review labels from an older bundle are added
    after them.
    """
    hits: dict[str, int] = {label: 0 for label in labels}
    totals: dict[str, int] = {label: 0 for label in labels}
    unusable = retakes = abstained = 0
    for predicted, reviewed, retake, abstain, count in pairs:
        if reviewed == REVIEW_UNUSABLE:
            unusable += count
        elif retake:
            retakes += count
        else:
            abstained += count if abstain else 0
            totals[reviewed] = totals.get(reviewed, 0) + count
            hits[reviewed] = hits.get(reviewed, 0) + (count if predicted == reviewed else 0)
    per_label = {label: Proportion(hits[label], totals[label], level) for label in totals}
    overall = Proportion(sum(hits.values()), sum(totals.values()), level)
    return Agreement(overall, per_label, unusable, retakes, abstained)


def format_agreement(p: Proportion) -> str:
    """ "83 % (12 of 14 reviewed; 95 % CI 60-95 %)", or "no reviews yet"."""
    if p.n == 0:
        return "no reviews yet"
    lo, hi = p.interval
    return (f"{p.value * 100:.0f} % ({p.k} of {p.n} reviewed; {p.level * 100:.0f} % CI "
            f"{lo * 100:.0f}-{hi * 100:.0f} %)")
