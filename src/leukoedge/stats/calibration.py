"""Calibration maths, numpy only: reliability bins, ECE, temperature scaling and its fit.

Why in ``stats``: training, the conversion step and the device all need it, and
the copies had drifted: two ECEs with opposite argument orders, two reliability
binnings, and two functions both called ``apply_temperature``, one taking
probabilities (the device) and one taking logits (the fit). Here there is one
ECE, ``expected_calibration_error(probs, labels)`` (keyword-friendly:
``probs=``, ``labels=``), one binning (:func:`reliability_diagram`), and two
temperature functions whose names say what they take:
:func:`temperature_scale_logits` and :func:`temperature_scale_probs`.

Temperature scaling (Guo et al. 2017) divides the logits by one number ``T``
fitted on validation data; it never changes the predicted class, only how sure
the model claims to be. A confident wrong answer is worse than an honest 60 %.

Probabilities instead of logits: the exported models (and TFLite) output
softmax probabilities. ``log p = z - logsumexp(z)`` differs from the logits
``z`` by a per-image constant, and softmax ignores per-image constants, so
``softmax(log p / T) == softmax(z / T)`` exactly. Every function here that takes
"logits" therefore also accepts ``log(probabilities)``, and
:func:`temperature_scale_probs` computes ``softmax(z / T)`` from ``p`` alone. One
caveat: int8 outputs round small probabilities to exactly 0; :func:`log_probs`
clips them at a floor (default :data:`INT8_LOG_PROB_FLOOR`, half an int8 step,
1/512) so the logs stay finite, and the temperature for an int8 model is fitted
on that model's own clipped outputs. The device then applies
``temperature_scale_probs(p, T, floor)``, the very formula that was fitted.

Reliability bins: equal-width confidence bins on [0, 1] (15 by default), an
image in ``(lo, hi]`` by its top probability (a confidence of exactly 0 goes to
the first bin); ECE is ``sum_b n_b / N * |accuracy_b - confidence_b|``. ECE of
no images is NaN.

Conservative temperature (:func:`fit_temperature_conservative`): with a
validation split the model almost never gets wrong, the NLL-optimal ``T`` rests
on a handful of errors and says little about a new capture block. On the
leuko-small Taleqani run (3 validation errors in 391) it sharpened the int8
model to T = 0.56 and made test ECE worse (0.0194 -> 0.0232). The conservative
fit bootstraps validation, takes the ``level`` interval of the fitted ``T`` and
keeps the end closest to 1 (exactly 1 when the interval contains 1): the model
is re-scaled only as far as validation is sure it should be. Still one scalar,
so the device applies it exactly as before.

Bad input (wrong shapes, NaN, a temperature <= 0) raises
:class:`~leukoedge.errors.UsageError`.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import UsageError

#: Search range for T: wider than any sensible model (T < 0.05 or > 20 means a broken model).
T_MIN, T_MAX = 0.05, 20.0
#: Half an int8 output step: the floor under which an int8 softmax's zeros are clipped before the log.
INT8_LOG_PROB_FLOOR = 1.0 / 512
#: Where :func:`temperature_scale_probs` without a floor clips before the log (zeros stay zero there).
_EPS = 1e-12


def _check(logits: np.ndarray, labels: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    z = np.asarray(logits, dtype=np.float64)
    if z.ndim != 2 or z.shape[0] == 0 or z.shape[1] < 2 or not np.all(np.isfinite(z)):
        raise UsageError(f"expected finite (N, classes >= 2) scores, got shape {np.shape(logits)}")
    if labels is None:
        return z, None
    return z, _check_labels(labels, z.shape)


def _check_labels(labels, shape: tuple[int, int]) -> np.ndarray:
    y = np.asarray(labels).ravel()
    n, k = shape
    if y.shape[0] != n or (n and (not np.issubdtype(y.dtype, np.integer) or y.min() < 0 or y.max() >= k)):
        raise UsageError(f"labels must be {n} integers in 0..{k - 1}")
    return y.astype(np.int64)


def _check_temperature(temperature: float) -> float:
    if isinstance(temperature, bool) or not (np.isfinite(temperature) and temperature > 0):
        raise UsageError(f"temperature must be a positive finite number, got {temperature!r}")
    return float(temperature)


def log_probs(probs: np.ndarray, eps: float = INT8_LOG_PROB_FLOOR) -> np.ndarray:
    """``log(max(p, eps))``: usable as logits (see module docstring)."""
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or not np.all(np.isfinite(p)) or np.any(p < 0):
        raise UsageError(f"expected non-negative finite (N, classes) probabilities, got shape {p.shape}")
    return np.log(np.maximum(p, eps))


def softmax(z: np.ndarray) -> np.ndarray:
    """Softmax over the last axis, shifted by the maximum so large logits cannot overflow."""
    z = np.asarray(z, dtype=np.float64)
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def temperature_scale_logits(logits: np.ndarray, temperature: float) -> np.ndarray:
    """Calibrated probabilities ``softmax(z / T)`` from ``(N, K)`` logits or log-probabilities (module docstring)."""
    t = _check_temperature(temperature)
    z, _ = _check(logits)
    return softmax(z / t)


def temperature_scale_probs(probs: np.ndarray, temperature: float, floor: float | None = None) -> np.ndarray:
    """``softmax(z / T)`` computed from ``p = softmax(z)`` alone, over the last axis: what the device applies.

    Without ``floor`` a zero probability stays zero, and ``T == 1`` returns
    ``probs`` itself. With ``floor`` (what ``convert --calibrate`` fits with),
    ``softmax(log(max(p, floor)) / T)``, i.e. exactly
    ``temperature_scale_logits(log_probs(p, floor), T)``: an int8 zero becomes
    the floor, as it was when the temperature was fitted.
    """
    t = _check_temperature(temperature)
    p = np.asarray(probs, dtype=np.float64)
    if floor is not None:
        if not 0.0 < floor < 1.0:
            raise UsageError(f"log_prob_floor must be in (0, 1), got {floor!r}")
        logp = np.log(np.maximum(p, floor)) / t
        e = np.exp(logp - logp.max(axis=-1, keepdims=True))
        return e / e.sum(axis=-1, keepdims=True)
    if t == 1.0:
        return probs
    logp = np.log(np.clip(p, _EPS, 1.0)) / t
    logp -= logp.max(axis=-1, keepdims=True)
    e = np.exp(logp) * (p > 0)
    return e / e.sum(axis=-1, keepdims=True)


def nll(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of ``softmax(z / T)``."""
    z, y = _check(logits, labels)
    zt = z / temperature
    m = zt.max(axis=1)
    lse = m + np.log(np.exp(zt - m[:, None]).sum(axis=1))
    return float(np.mean(lse - zt[np.arange(len(y)), y]))


@dataclass(frozen=True)
class TemperatureFit:
    """Result of :func:`fit_temperature`: ``temperature`` and the validation NLL before/after."""

    temperature: float
    nll_before: float
    nll_after: float

    def to_dict(self) -> dict:
        return {"temperature": self.temperature, "nll_before": self.nll_before, "nll_after": self.nll_after}


def fit_temperature(logits: np.ndarray, labels: np.ndarray, tol: float = 1e-5) -> TemperatureFit:
    """Minimise validation NLL over ``log T`` in ``[log T_MIN, log T_MAX]`` by golden-section search.

    The NLL is convex in ``1/T``, hence unimodal in ``log T``, so golden section
    finds the minimum without gradients or scipy. If the optimum is at a bound
    (e.g. a model that is right on every validation image wants ``T -> 0``), the
    bound is returned; it is still the best T in the allowed range.
    """
    z, y = _check(logits, labels)
    f = lambda log_t: nll(z, y, float(np.exp(log_t)))  # noqa: E731
    a, b = np.log(T_MIN), np.log(T_MAX)
    g = (np.sqrt(5.0) - 1.0) / 2.0
    c, d = b - g * (b - a), a + g * (b - a)
    fc, fd = f(c), f(d)
    while b - a > tol:
        if fc <= fd:
            b, d, fd = d, c, fc
            c = b - g * (b - a)
            fc = f(c)
        else:
            a, c, fc = c, d, fd
            d = a + g * (b - a)
            fd = f(d)
    best = (a + b) / 2.0
    # Golden section ignores the end points; compare them so a boundary optimum is not missed.
    candidates = [(f(best), best), (f(np.log(T_MIN)), np.log(T_MIN)), (f(np.log(T_MAX)), np.log(T_MAX))]
    loss, log_t = min(candidates)
    return TemperatureFit(temperature=float(np.exp(log_t)), nll_before=nll(z, y, 1.0), nll_after=float(loss))


@dataclass(frozen=True)
class ConservativeFit:
    """Result of :func:`fit_temperature_conservative`.

    ``temperature`` is the one to use; ``nll`` the plain NLL fit on all of
    validation; ``interval`` the bootstrap ``level`` interval of that fit.
    """

    temperature: float
    nll: TemperatureFit
    interval: tuple[float, float]
    level: float
    n_bootstrap: int

    def to_dict(self) -> dict:
        return {
            "temperature": self.temperature,
            "temperature_nll": self.nll.temperature,
            "temperature_interval": [self.interval[0], self.interval[1]],
            "interval_level": self.level,
            "n_bootstrap": self.n_bootstrap,
            "nll_val_before": self.nll.nll_before,
            "nll_val_after_nll_fit": self.nll.nll_after,
        }


def fit_temperature_conservative(
    logits: np.ndarray, labels: np.ndarray, *, n_bootstrap: int = 200, level: float = 0.9, seed: int = 0
) -> ConservativeFit:
    """The bootstrap-interval end of the NLL temperature closest to 1 (see module docstring).

    Each of ``n_bootstrap`` resamples of the validation images (with
    replacement, seeded) gets its own NLL fit; the central ``level`` quantile
    interval of those temperatures says how far validation pins ``T`` down. A
    resample without any error wants ``T -> T_MIN``; that only widens the
    interval on the sharp side, which the conservative choice never uses.
    """
    if n_bootstrap < 10 or not 0.0 < level < 1.0:
        raise UsageError(f"need n_bootstrap >= 10 and 0 < level < 1, got {n_bootstrap}, {level}")
    z, y = _check(logits, labels)
    plain = fit_temperature(z, y)
    rng = np.random.default_rng(seed)
    temps = np.empty(n_bootstrap)
    for b in range(n_bootstrap):
        idx = rng.integers(0, len(y), len(y))
        temps[b] = fit_temperature(z[idx], y[idx], tol=1e-3).temperature
    lo, hi = (float(v) for v in np.quantile(temps, [(1 - level) / 2, (1 + level) / 2]))
    chosen = 1.0 if lo <= 1.0 <= hi else (hi if hi < 1.0 else lo)
    return ConservativeFit(chosen, plain, (lo, hi), level, n_bootstrap)


def bootstrap_ece_sd(probs: np.ndarray, labels: np.ndarray, n_bins: int = 15, n_bootstrap: int = 200, seed: int = 0) -> float:
    """Standard deviation of the ECE over bootstrap resamples: how noisy one split's ECE is."""
    p, y = _check(probs, labels)
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(n_bootstrap):
        idx = rng.integers(0, len(y), len(y))
        values.append(reliability_diagram(p[idx], y[idx], n_bins).ece)
    return float(np.std(values))


@dataclass(frozen=True)
class ReliabilityData:
    """Per-bin data for a reliability diagram (equal-width confidence bins on [0, 1]).

    ``confidence[i]`` / ``accuracy[i]`` are NaN for empty bins (``to_dict`` gives None).
    """

    edges: np.ndarray
    confidence: np.ndarray
    accuracy: np.ndarray
    counts: np.ndarray

    @property
    def ece(self) -> float:
        """Count-weighted mean |accuracy - confidence| over the filled bins; NaN with no images."""
        n = self.counts.sum()
        if n == 0:
            return float("nan")
        filled = self.counts > 0
        return float(np.sum(self.counts[filled] / n * np.abs(self.accuracy[filled] - self.confidence[filled])))

    def to_dict(self) -> dict:
        nan_none = lambda a: [None if not np.isfinite(v) else float(v) for v in a]  # noqa: E731
        return {
            "edges": [float(v) for v in self.edges],
            "confidence": nan_none(self.confidence),
            "accuracy": nan_none(self.accuracy),
            "counts": [int(v) for v in self.counts],
            "ece": self.ece,
        }


def reliability_diagram(probs: np.ndarray, labels: np.ndarray, n_bins: int = 15) -> ReliabilityData:
    """Bin images by confidence (max probability) into ``(lo, hi]`` bins; mean confidence and accuracy per bin.

    ``probs`` is ``(N, K)`` with finite values (N may be 0: every bin empty, ECE NaN).
    """
    if isinstance(n_bins, bool) or not isinstance(n_bins, (int, np.integer)) or n_bins < 1:
        raise UsageError(f"n_bins must be an integer >= 1, got {n_bins!r}")
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] < 2 or not np.all(np.isfinite(p)):
        raise UsageError(f"expected finite (N, classes >= 2) probabilities, got shape {np.shape(probs)}")
    y = _check_labels(labels, p.shape)
    conf = p.max(axis=1)
    correct = (p.argmax(axis=1) == y).astype(np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    idx = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, n_bins - 1)
    counts = np.bincount(idx, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.bincount(idx, weights=conf, minlength=n_bins) / counts
        acc = np.bincount(idx, weights=correct, minlength=n_bins) / counts
    return ReliabilityData(edges=edges, confidence=mean_conf, accuracy=acc, counts=counts)


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, n_bins: int = 15) -> float:
    """ECE of ``probs`` ``(N, K)`` against integer ``labels``: see :class:`ReliabilityData`. NaN for no images."""
    return reliability_diagram(probs, labels, n_bins).ece
