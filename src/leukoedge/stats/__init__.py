"""The maths several stages share, in one TensorFlow-free place (train, convert, runtime and the app).

- :mod:`.intervals`: Wilson / Clopper-Pearson intervals for proportions, exact binomial
  and McNemar tests, verdicts that say "inconclusive" when n cannot decide.
- :mod:`.metrics`: confusion matrix, per-class precision / recall / F1, accuracy, macro and
  weighted F1, ROC AUC with ties, one-vs-rest AUC (scikit-learn's conventions, see there).
- :mod:`.calibration`: reliability bins, ECE ``(probs, labels)``, temperature scaling of
  logits and of probabilities (with the int8 log-prob floor), and the temperature fit.
- :mod:`.thresholds`: abstention thresholds from a target rate on in-distribution scores.

numpy and the standard library only, so the device can import it. This package
itself imports only :mod:`.intervals` (pure Python); import the others by name
(``from leukoedge.stats.metrics import macro_f1``).
"""
from .intervals import (LEVEL, PairedChange, Proportion, binomial_tail, clopper_pearson, exceeds_rate, paired_change,
                        verdict_on_drop, wilson)

__all__ = ["LEVEL", "PairedChange", "Proportion", "binomial_tail", "clopper_pearson", "exceeds_rate", "paired_change",
           "verdict_on_drop", "wilson"]
