"""Intervals and tests for proportions that stay right at the n a lab has (n = 20-400).

Why not the bootstrap: resampling 39 images that are all right gives
``[100.00 %, 100.00 %]``, an interval that claims certainty from 39 images
(issue 14). For a proportion ``k / n`` the Wilson score interval never
collapses, and Clopper-Pearson (exact) is the conservative choice for
decisions. Paired comparisons (the same images before and after a change:
float vs int8, clean vs grayscale) are decided on their discordant pairs
(exact McNemar), never on whether two marginal intervals overlap.

Pure Python + math: importable everywhere, the Raspberry Pi included.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

#: Two-sided level used throughout the reports.
LEVEL = 0.95


def _z(level: float) -> float:
    """Standard normal quantile for a two-sided ``level`` (0.95 -> 1.95996)."""
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    return _normal_quantile(0.5 + level / 2.0)


def _normal_quantile(p: float) -> float:
    """Inverse of the standard normal CDF (Acklam's rational approximation, |error| < 1.2e-9 after refinement)."""
    if not 0.0 < p < 1.0:
        raise ValueError("p must be in (0, 1)")
    a = (-3.969683028665376e01, 2.209460984245205e02, -2.759285104469687e02, 1.383577518672690e02,
         -3.066479806614716e01, 2.506628277459239e00)
    b = (-5.447609879822406e01, 1.615858368580409e02, -1.556989798598866e02, 6.680131188771972e01,
         -1.328068155288572e01)
    c = (-7.784894002430293e-03, -3.223964580411365e-01, -2.400758277161838e00, -2.549732539343734e00,
         4.374664141464968e00, 2.938163982698783e00)
    d = (7.784695709041462e-03, 3.224671290700398e-01, 2.445134137142996e00, 3.754408661907416e00)
    lo = 0.02425
    if p < lo:
        q = math.sqrt(-2 * math.log(p))
        x = (((((c[0] * q + c[1]) * q + c[2]) * q + c[3]) * q + c[4]) * q + c[5]) / \
            ((((d[0] * q + d[1]) * q + d[2]) * q + d[3]) * q + 1)
    elif p <= 1 - lo:
        q = p - 0.5
        r = q * q
        x = (((((a[0] * r + a[1]) * r + a[2]) * r + a[3]) * r + a[4]) * r + a[5]) * q / \
            (((((b[0] * r + b[1]) * r + b[2]) * r + b[3]) * r + b[4]) * r + 1)
    else:
        q = math.sqrt(-2 * math.log(1 - p))
        x = -(((((c[0] * q + c[1]) * q + c[2]) * q + c[3]) * q + c[4]) * q + c[5]) / \
            ((((d[0] * q + d[1]) * q + d[2]) * q + d[3]) * q + 1)
    # One Newton step on the exact CDF.
    e = 0.5 * math.erfc(-x / math.sqrt(2)) - p
    return x - e * math.sqrt(2 * math.pi) * math.exp(x * x / 2)


def _check(k: int, n: int) -> None:
    if n < 0 or k < 0 or k > n:
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")


def wilson(k: int, n: int, level: float = LEVEL) -> tuple[float, float]:
    """Wilson score interval of ``k / n``; ``(0, 1)`` for ``n = 0``. Never collapses to a point for n > 0."""
    _check(k, n)
    if n == 0:
        return 0.0, 1.0
    z = _z(level)
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (0.0 if k == 0 else max(0.0, centre - half)), (1.0 if k == n else min(1.0, centre + half))


def binomial_tail(k: int, n: int, p: float) -> float:
    """P(X >= k) for X ~ Binomial(n, p), exact (log-space sums)."""
    _check(k, n)
    if k == 0:
        return 1.0
    if p <= 0.0:
        return 0.0
    if p >= 1.0:
        return 1.0
    log_p, log_q = math.log(p), math.log1p(-p)
    terms = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * log_p + (n - i) * log_q
             for i in range(k, n + 1)]
    top = max(terms)
    return min(1.0, math.exp(top) * math.fsum(math.exp(t - top) for t in terms))


def clopper_pearson(k: int, n: int, level: float = LEVEL) -> tuple[float, float]:
    """Exact (Clopper-Pearson) interval of ``k / n``, by bisection on the binomial tails."""
    _check(k, n)
    if n == 0:
        return 0.0, 1.0
    alpha = (1.0 - level) / 2.0
    lo = 0.0 if k == 0 else _bisect(lambda p: binomial_tail(k, n, p) - alpha)
    hi = 1.0 if k == n else _bisect(lambda p: alpha - (1.0 - binomial_tail(k + 1, n, p)))
    return lo, hi


def _bisect(f, lo: float = 0.0, hi: float = 1.0, iters: int = 60) -> float:
    """Root of an increasing ``f`` on [lo, hi]."""
    for _ in range(iters):
        mid = (lo + hi) / 2.0
        if f(mid) < 0:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2.0


@dataclass(frozen=True)
class Proportion:
    """``k`` of ``n`` with its Wilson interval, JSON-ready via :meth:`to_dict`."""

    k: int
    n: int
    level: float = LEVEL

    @property
    def value(self) -> float:
        return self.k / self.n if self.n else float("nan")

    @property
    def interval(self) -> tuple[float, float]:
        return wilson(self.k, self.n, self.level)

    def to_dict(self) -> dict:
        lo, hi = self.interval
        return {"value": self.value, "low": lo, "high": hi, "k": self.k, "n": self.n, "level": self.level,
                "method": "wilson"}


def exceeds_rate(k: int, n: int, tolerated: float, alpha: float = 0.05) -> tuple[bool, float]:
    """Do ``k`` events in ``n`` show a rate above ``tolerated``? (one-sided exact binomial test)

    Returns ``(exceeds, p)``: ``p`` is P(X >= k) at the tolerated rate; the rate
    is shown to exceed it when ``p < alpha``, i.e. when the one-sided lower
    confidence bound of ``k / n`` is above ``tolerated``. One flip in 39 images
    (p = 0.32 at 1 %) is not evidence of a bad conversion; 10 in 39 is.
    """
    _check(k, n)
    if not 0.0 <= tolerated <= 1.0:
        raise ValueError(f"tolerated rate must be in [0, 1], got {tolerated}")
    p = binomial_tail(k, n, tolerated) if tolerated > 0 else (0.0 if k > 0 else 1.0)  # 1.0: anything goes
    return p < alpha, p


@dataclass(frozen=True)
class PairedChange:
    """The same images scored twice (before / after a change), as the four cells of a 2x2 table.

    ``lost``: right before, wrong after; ``gained``: wrong before, right after.
    Decided on the discordant pairs (exact McNemar): images right or wrong both
    times say nothing about the change.
    """

    both_right: int
    lost: int
    gained: int
    both_wrong: int
    level: float = LEVEL

    def __post_init__(self) -> None:
        if min(self.both_right, self.lost, self.gained, self.both_wrong) < 0:
            raise ValueError("paired counts must be >= 0")

    @property
    def n(self) -> int:
        return self.both_right + self.lost + self.gained + self.both_wrong

    @property
    def drop(self) -> float:
        """Accuracy before minus after, as a fraction (positive = worse after)."""
        return (self.lost - self.gained) / self.n if self.n else 0.0

    @property
    def p_value(self) -> float:
        """Two-sided exact McNemar p-value for "no change"."""
        m = self.lost + self.gained
        if m == 0:
            return 1.0
        return min(1.0, 2.0 * binomial_tail(max(self.lost, self.gained), m, 0.5))

    @property
    def interval(self) -> tuple[float, float]:
        """Interval of :attr:`drop`: Newcombe's hybrid score method for paired proportions (method 10, 1998).

        Built from the two marginal Wilson intervals and the correlation of the
        pairs, so it never collapses and stays inside [-1, 1].
        """
        n = self.n
        if n == 0:
            return -1.0, 1.0
        a, b, c, d = self.both_right, self.lost, self.gained, self.both_wrong
        k1, k2 = a + b, a + c  # right before, right after
        l1, u1 = wilson(k1, n, self.level)
        l2, u2 = wilson(k2, n, self.level)
        p1, p2 = k1 / n, k2 / n
        denom = math.sqrt((a + b) * (c + d) * (a + c) * (b + d))
        num = a * d - b * c
        if num > 0:
            num = max(num - n / 2.0, 0.0)  # continuity correction of the correlation (Newcombe 1998)
        phi = num / denom if denom else 0.0
        diff = p1 - p2
        lo = diff - math.sqrt(max(0.0, (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2))
        hi = diff + math.sqrt(max(0.0, (u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2))
        return max(-1.0, lo), min(1.0, hi)

    def to_dict(self) -> dict:
        lo, hi = self.interval
        return {"drop": self.drop, "low": lo, "high": hi, "lost": self.lost, "gained": self.gained, "n": self.n,
                "p_value": self.p_value, "level": self.level, "method": "exact McNemar; Newcombe hybrid score interval"}


def paired_change(before_right, after_right, level: float = LEVEL) -> PairedChange:
    """:class:`PairedChange` from two boolean sequences (image i right before / after)."""
    before_right, after_right = list(map(bool, before_right)), list(map(bool, after_right))
    if len(before_right) != len(after_right):
        raise ValueError("paired_change needs two sequences of the same length")
    pairs = list(zip(before_right, after_right))
    return PairedChange(both_right=sum(b and a for b, a in pairs), lost=sum(b and not a for b, a in pairs),
                        gained=sum(a and not b for b, a in pairs), both_wrong=sum(not a and not b for b, a in pairs),
                        level=level)


def verdict_on_drop(change: PairedChange, *, negligible: float = 0.05, alpha: float = 0.05) -> str:
    """``"drop"``, ``"no meaningful drop"`` or ``"inconclusive"`` -- never "no drop" next to a 25-point fall.

    - ``drop``: the change is significant (exact McNemar ``p < alpha``) and makes things worse;
    - ``no meaningful drop``: the whole interval of the drop lies below ``negligible``
      (e.g. 5 points): the data show any loss is small;
    - ``inconclusive``: neither, e.g. n = 39 with a 25-point fall that 39 images cannot
      tell from chance, or a tiny fall whose interval still reaches past ``negligible``.
    """
    _, hi = change.interval
    if change.drop > 0 and change.p_value < alpha:
        return "drop"
    if hi < negligible:
        return "no meaningful drop"
    return "inconclusive"
