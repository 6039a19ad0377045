"""The maths several stages share, in one TensorFlow-free place (train, convert, runtime and the app).

- :mod:`.intervals`: Wilson / Clopper-Pearson intervals for proportions, exact binomial
  and McNemar tests, verdicts that say "inconclusive" when n cannot decide.

numpy and the standard library only, so the device can import it.
"""
from .intervals import (LEVEL, PairedChange, Proportion, binomial_tail, clopper_pearson, exceeds_rate, paired_change,
                        verdict_on_drop, wilson)

__all__ = ["LEVEL", "PairedChange", "Proportion", "binomial_tail", "clopper_pearson", "exceeds_rate", "paired_change",
           "verdict_on_drop", "wilson"]
