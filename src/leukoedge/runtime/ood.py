"""Out-of-distribution scores for abstention, computed on the device with numpy only.

Why: max-softmax confidence does not flag foreign images on the Taleqani model
(single cells and smear fields from other labs get *higher* confidence than
real test images, issue 7). Distances in the model's feature space do better.
All scores here follow one convention: **higher = more foreign**; an image is
abstained when its score is above the threshold chosen on in-distribution
validation data (:func:`leukoedge.stats.thresholds.threshold_for_rate`), and
their separation from foreign images is measured by
:func:`leukoedge.stats.metrics.auroc`. The names of the fitted scores and their
side are registered in :mod:`.scores`, which this module does not import.

Scores:

- ``mahalanobis``: minimum over classes of the Mahalanobis distance to the class
  mean, with one shared covariance shrunk towards a scaled identity
  (Ledoit-Wolf intensity by default: the pooled covariance of a few hundred
  images in 64-256 dimensions is singular or badly conditioned otherwise). The
  precision is stored as its Cholesky factor ``L`` (``P = L L^T``), so a score is
  one ``d x d`` product plus ``C`` squared distances.
- ``knn``: distance to the k-th nearest neighbour among a stored, seeded
  subsample of L2-normalised training features (Sun et al. 2022, "KNN+").
- ``energy``: ``-T logsumexp(logits / T)`` (Liu et al. 2020). Needs real logits:
  on softmax probabilities ``logsumexp(log p) == 0`` for every image, so it is
  refused for ``probabilities`` input.
- ``max_softmax``: ``1 - max p`` (the baseline that issue 7 shows to fail).

Feature input is ``(N, d)``; a feature map ``(N, H, W, C)`` is global-average
pooled first (:func:`as_vectors`), so the same code serves the penultimate
vector or the ``features`` layer of the int8 model after dequantisation.

Serialisation: :meth:`OODScorer.to_state` gives a JSON-able dict plus a dict of
named arrays (the bundle stores them as ``.npy``); :meth:`OODScorer.from_state`
rebuilds and validates, raising :class:`~leukoedge.errors.BundleError` on
damaged data.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..errors import BundleError, UsageError

METHODS = ("mahalanobis", "knn", "energy", "max_softmax")


def as_vectors(features: np.ndarray) -> np.ndarray:
    """(N, d) float64 from (N, d) or (N, H, W, C) (global average pooled); refuses other shapes and NaN."""
    x = np.asarray(features, dtype=np.float64)
    if x.ndim == 4:
        x = x.mean(axis=(1, 2))
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise UsageError(f"expected features of shape (N, d) or (N, H, W, C), got {np.shape(features)}")
    if not np.all(np.isfinite(x)):
        raise UsageError("features contain NaN or infinite values")
    return x


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (an all-zero row stays zero)."""
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norm, 1e-12)


def ledoit_wolf_shrinkage(centred: np.ndarray) -> float:
    """Ledoit-Wolf (2004) optimal shrinkage intensity towards ``mu * I`` for centred (n, d) data."""
    n, d = centred.shape
    emp = centred.T @ centred / n
    mu = np.trace(emp) / d
    delta = np.sum((emp - mu * np.eye(d)) ** 2) / d
    x2 = centred**2
    beta = np.sum(x2.T @ x2 / n - emp**2) / (d * n)
    if delta <= 0:
        return 1.0
    return float(np.clip(min(beta, delta) / delta, 0.0, 1.0))


def shrunk_covariance(centred: np.ndarray, shrinkage: float | None = None) -> tuple[np.ndarray, float]:
    """``(1 - s) * S + s * mu * I`` with ``S`` the (biased) covariance; ``s`` Ledoit-Wolf if None."""
    n, d = centred.shape
    emp = centred.T @ centred / n
    s = ledoit_wolf_shrinkage(centred) if shrinkage is None else float(shrinkage)
    if not 0.0 <= s <= 1.0:
        raise UsageError(f"shrinkage must be in [0, 1], got {shrinkage}")
    mu = np.trace(emp) / d
    cov = (1.0 - s) * emp + s * max(mu, 1e-12) * np.eye(d)
    return cov, s


def _logsumexp(z: np.ndarray) -> np.ndarray:
    m = z.max(axis=1, keepdims=True)
    return (m + np.log(np.exp(z - m).sum(axis=1, keepdims=True)))[:, 0]


@dataclass
class OODScorer:
    """A fitted out-of-distribution score; ``score(x)`` is higher for more foreign inputs.

    Attributes:
        method: one of ``METHODS``.
        input: ``"features"``, ``"logits"`` or ``"probabilities"``: what ``score`` expects.
        params: JSON-able settings (k, shrinkage, temperature, feature dim, ...).
        arrays: fitted arrays by name (``means``, ``chol`` for Mahalanobis; ``reference`` for kNN).
        threshold: abstain when score > threshold (None until chosen).
    """

    method: str
    input: str
    params: dict = field(default_factory=dict)
    arrays: dict = field(default_factory=dict)
    threshold: float | None = None

    # -- fitting ------------------------------------------------------------------------------
    @classmethod
    def fit_mahalanobis(cls, features: np.ndarray, labels: np.ndarray, shrinkage: float | None = None) -> "OODScorer":
        """Class means and a shared, shrunk within-class covariance from training features."""
        x = as_vectors(features)
        y = np.asarray(labels).astype(np.int64).ravel()
        if y.shape[0] != x.shape[0]:
            raise UsageError(f"{x.shape[0]} feature rows but {y.shape[0]} labels")
        classes = np.unique(y)
        means = np.stack([x[y == c].mean(axis=0) for c in classes])
        centred = x - means[np.searchsorted(classes, y)]
        cov, s = shrunk_covariance(centred, shrinkage)
        precision = np.linalg.inv(cov)
        precision = (precision + precision.T) / 2.0
        chol = np.linalg.cholesky(precision)
        return cls(
            method="mahalanobis",
            input="features",
            params={"dim": int(x.shape[1]), "shrinkage": s, "classes": [int(c) for c in classes]},
            arrays={"means": means.astype(np.float32), "chol": chol.astype(np.float32)},
        )

    @classmethod
    def fit_knn(cls, features: np.ndarray, k: int = 10, max_reference: int = 2000, seed: int = 0) -> "OODScorer":
        """Store up to ``max_reference`` L2-normalised training features (seeded subsample)."""
        x = l2_normalize(as_vectors(features))
        if not 1 <= k <= x.shape[0]:
            raise UsageError(f"k must be in 1..{x.shape[0]} (the number of training features), got {k}")
        if x.shape[0] > max_reference:
            idx = np.sort(np.random.default_rng(seed).choice(x.shape[0], size=max_reference, replace=False))
            x = x[idx]
        if k > x.shape[0]:
            raise UsageError(f"k={k} exceeds the {x.shape[0]} stored reference features")
        return cls(
            method="knn",
            input="features",
            params={"dim": int(x.shape[1]), "k": int(k), "seed": int(seed), "n_reference": int(x.shape[0])},
            arrays={"reference": x.astype(np.float32)},
        )

    @classmethod
    def energy(cls, temperature: float = 1.0) -> "OODScorer":
        """Energy score on logits (nothing to fit)."""
        if not temperature > 0:
            raise UsageError(f"energy temperature must be > 0, got {temperature}")
        return cls(method="energy", input="logits", params={"temperature": float(temperature)})

    @classmethod
    def max_softmax(cls) -> "OODScorer":
        """``1 - max p`` on probabilities (nothing to fit)."""
        return cls(method="max_softmax", input="probabilities")

    # -- scoring --------------------------------------------------------------------------------
    def score(self, values: np.ndarray) -> np.ndarray:
        """Scores (N,) float64, higher = more foreign; input as declared by ``self.input``."""
        if self.method == "mahalanobis":
            x = self._features(values)
            chol = self.arrays["chol"].astype(np.float64)
            z = x @ chol
            mz = self.arrays["means"].astype(np.float64) @ chol
            d2 = (z * z).sum(1)[:, None] - 2.0 * z @ mz.T + (mz * mz).sum(1)[None, :]
            return np.maximum(d2.min(axis=1), 0.0)
        if self.method == "knn":
            x = l2_normalize(self._features(values)).astype(np.float32)
            # float32 on purpose: the reference is stored in float32 and a float64 copy of it
            # per call would cost more than the product itself on a Pi.
            # For unit vectors ||a - b||^2 = 2 - 2 a.b; the k-th largest similarity is the k-th nearest.
            sim = (x @ self.arrays["reference"].T).astype(np.float64)
            k = self.params["k"]
            kth = np.partition(-sim, k - 1, axis=1)[:, k - 1]
            return np.sqrt(np.maximum(2.0 + 2.0 * kth, 0.0))
        z = np.asarray(values, dtype=np.float64)
        if z.ndim != 2 or z.shape[1] < 2 or not np.all(np.isfinite(z)):
            raise UsageError(f"expected finite (N, classes) {self.input}, got shape {z.shape}")
        if self.method == "energy":
            t = self.params["temperature"]
            return -t * _logsumexp(z / t)
        if self.method == "max_softmax":
            return 1.0 - z.max(axis=1)
        raise UsageError(f"unknown OOD method {self.method!r}; use one of {list(METHODS)}")

    def abstain(self, values: np.ndarray) -> np.ndarray:
        """Boolean (N,): score above the stored threshold."""
        if self.threshold is None:
            raise UsageError("no abstention threshold chosen yet; choose one on validation scores "
                             "(leukoedge.stats.thresholds.threshold_for_rate)")
        return self.score(values) > self.threshold

    def _features(self, values: np.ndarray) -> np.ndarray:
        x = as_vectors(values)
        if x.shape[1] != self.params["dim"]:
            raise UsageError(f"features have {x.shape[1]} dimensions, the OOD scorer was fitted on {self.params['dim']}")
        return x

    # -- serialisation --------------------------------------------------------------------------
    def to_state(self) -> tuple[dict, dict[str, np.ndarray]]:
        """(JSON-able dict, {name: float32 array}) for the bundle."""
        meta = {
            "method": self.method,
            "input": self.input,
            "params": dict(self.params),
            "threshold": None if self.threshold is None else float(self.threshold),
            "arrays": sorted(self.arrays),
        }
        return meta, {k: np.asarray(v, dtype=np.float32) for k, v in self.arrays.items()}

    @classmethod
    def from_state(cls, meta: dict, arrays: dict[str, np.ndarray]) -> "OODScorer":
        """Rebuild from :meth:`to_state` output; BundleError if anything is missing or inconsistent."""
        try:
            method, inp, params = meta["method"], meta["input"], dict(meta["params"])
            threshold = meta.get("threshold")
            names = list(meta.get("arrays", []))
        except (KeyError, TypeError) as err:
            raise BundleError(f"abstention data is malformed (missing {err})") from None
        if method not in METHODS:
            raise BundleError(f"abstention method {method!r} is unknown; this runtime knows {list(METHODS)}")
        expected_input = {"mahalanobis": "features", "knn": "features", "energy": "logits"}.get(method, "probabilities")
        if inp != expected_input:
            raise BundleError(f"abstention method {method!r} needs {expected_input} as input, the bundle says {inp!r}"
                              + (" (softmax outputs have no energy: logsumexp(log p) is 0)" if method == "energy" else ""))
        need = {"mahalanobis": ["chol", "means"], "knn": ["reference"]}.get(method, [])
        missing = [n for n in need if n not in arrays or n not in names]
        if missing:
            raise BundleError(f"abstention arrays {missing} are missing for method {method!r}")
        arrs = {n: np.asarray(arrays[n], dtype=np.float32) for n in need}
        for name, arr in arrs.items():
            if not np.all(np.isfinite(arr)) or arr.ndim != 2 or arr.shape[1] != params.get("dim"):
                raise BundleError(f"abstention array {name!r} is damaged (shape {arr.shape}, dim {params.get('dim')})")
        if method == "mahalanobis" and arrs["chol"].shape != (params["dim"], params["dim"]):
            raise BundleError("abstention array 'chol' is not square")
        if threshold is not None and not np.isfinite(float(threshold)):
            raise BundleError(f"abstention threshold {threshold!r} is not a finite number")
        return cls(method=method, input=inp, params=params, arrays=arrs,
                   threshold=None if threshold is None else float(threshold))
