"""On-device OOD scores: equal to independent references, separate shifted data, survive serialisation."""
from __future__ import annotations

import numpy as np
import pytest

from leukoedge.errors import BundleError, UsageError
from leukoedge.runtime.ood import OODScorer, ledoit_wolf_shrinkage
from leukoedge.stats.metrics import auroc
from leukoedge.stats.thresholds import threshold_for_rate


def clouds(seed=0, n=300, d=32, shift=0.0):
    """Three Gaussian classes (fixed means and covariance); ``seed`` draws the samples."""
    fixed = np.random.default_rng(100)
    means = fixed.normal(0, 3, (3, d))
    mix = fixed.normal(0, 1, (d, d)) / np.sqrt(d)
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    x = means[y] + rng.normal(0, 1, (n, d)) @ (np.eye(d) + 0.5 * mix) + shift
    return x, y


def test_mahalanobis_equals_reference_computation():
    x, y = clouds()
    q, _ = clouds(seed=1, n=20)
    scorer = OODScorer.fit_mahalanobis(x, y, shrinkage=0.1)
    # Reference: pooled covariance written out directly, explicit inverse, per-class loop.
    d = x.shape[1]
    means = [x[y == c].mean(0) for c in range(3)]
    resid = np.concatenate([x[y == c] - means[c] for c in range(3)])
    emp = resid.T @ resid / len(resid)
    cov = 0.9 * emp + 0.1 * np.trace(emp) / d * np.eye(d)
    prec = np.linalg.inv(cov)
    ref = np.array([min((v - m) @ prec @ (v - m) for m in means) for v in q])
    np.testing.assert_allclose(scorer.score(q), ref, rtol=1e-4)


def test_ledoit_wolf_matches_sklearn():
    sk = pytest.importorskip("sklearn.covariance")
    x, _ = clouds(n=80)
    xc = x - x.mean(0)
    assert ledoit_wolf_shrinkage(xc) == pytest.approx(sk.ledoit_wolf_shrinkage(xc, assume_centered=True), rel=1e-6)


def test_knn_equals_sklearn_neighbours():
    neighbors = pytest.importorskip("sklearn.neighbors")
    x, _ = clouds(n=200)
    q, _ = clouds(seed=2, n=15)
    scorer = OODScorer.fit_knn(x, k=5, max_reference=10_000)
    norm = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)  # noqa: E731
    nn = neighbors.NearestNeighbors(n_neighbors=5).fit(norm(x))
    ref = nn.kneighbors(norm(q))[0][:, -1]
    np.testing.assert_allclose(scorer.score(q), ref, rtol=1e-4, atol=1e-5)


def test_feature_maps_are_average_pooled():
    x, y = clouds(d=8)
    scorer = OODScorer.fit_mahalanobis(x, y)
    fmap = np.repeat(np.repeat(x[:, None, None, :], 3, axis=1), 2, axis=2)
    np.testing.assert_allclose(scorer.score(fmap), scorer.score(x))


@pytest.mark.parametrize("method", ["mahalanobis", "knn"])
def test_shifted_cloud_is_separated_and_threshold_holds(method):
    train, ytrain = clouds(seed=0)
    val, _ = clouds(seed=3, n=200)
    test, _ = clouds(seed=4, n=200)
    foreign, _ = clouds(seed=5, n=200, shift=4.0)
    scorer = OODScorer.fit_mahalanobis(train, ytrain) if method == "mahalanobis" else OODScorer.fit_knn(train, k=10)
    assert auroc(scorer.score(test), scorer.score(foreign)) > 0.99
    scorer.threshold = threshold_for_rate(scorer.score(val), 0.05)
    assert np.mean(scorer.abstain(val)) <= 0.05
    assert np.mean(scorer.abstain(foreign)) > 0.9


def test_state_round_trip_and_damage_detection():
    x, y = clouds()
    scorer = OODScorer.fit_mahalanobis(x, y)
    scorer.threshold = 12.5
    meta, arrays = scorer.to_state()
    import json
    back = OODScorer.from_state(json.loads(json.dumps(meta)), arrays)
    np.testing.assert_allclose(back.score(x[:10]), scorer.score(x[:10]))
    assert back.threshold == 12.5
    with pytest.raises(BundleError):
        OODScorer.from_state(meta, {"means": arrays["means"]})
    bad = dict(arrays, chol=arrays["chol"][:, :3])
    with pytest.raises(BundleError):
        OODScorer.from_state(meta, bad)
    with pytest.raises(UsageError):
        scorer.score(np.zeros((2, 5)))
    energy_meta, _ = OODScorer.energy().to_state()
    with pytest.raises(BundleError, match="energy"):
        OODScorer.from_state(dict(energy_meta, input="probabilities"), {})


def test_energy_and_max_softmax():
    logits = np.array([[10.0, 0.0, 0.0], [0.1, 0.0, 0.2]])
    e = OODScorer.energy().score(logits)
    ref = -np.log(np.exp(logits).sum(1))
    np.testing.assert_allclose(e, ref)
    assert e[1] > e[0]  # the flat, unsure row looks more foreign
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    ms = OODScorer.max_softmax().score(probs)
    assert ms[1] > ms[0]


def test_auroc_with_ties_matches_sklearn():
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 5, 50).astype(float), rng.integers(1, 6, 40).astype(float)
    ref = metrics.roc_auc_score(np.r_[np.zeros(50), np.ones(40)], np.r_[a, b])
    assert auroc(a, b) == pytest.approx(ref)
    assert auroc([1, 2], [1, 2]) == 0.5
    assert auroc([0, 0], [1, 1]) == 1.0


def test_threshold_for_rate_count_and_errors():
    s = np.arange(100, dtype=float)
    t = threshold_for_rate(s, 0.05)
    assert np.sum(s > t) == 5
    with pytest.raises(UsageError):
        threshold_for_rate([], 0.05)
    with pytest.raises(UsageError):
        threshold_for_rate(s, 1.5)


def test_ood_and_postprocess_no_longer_import_each_other():
    """The score registry lives in runtime/scores.py; ood (fitted scorers) and postprocess never import each other."""
    import ast
    import inspect

    from leukoedge.runtime import ood, postprocess, scores

    def relative_imports(module) -> set[str]:
        tree = ast.parse(inspect.getsource(module))
        return {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.level == 1}

    assert not relative_imports(ood) & {"postprocess", "scores"}
    assert "ood" not in relative_imports(postprocess) and "scores" in relative_imports(postprocess)
    assert not relative_imports(scores) & {"ood", "postprocess"}
    # The fitted scores are known with their side without importing ood.
    assert scores.get_score("mahalanobis")[1] == "above" and scores.get_score("knn")[1] == "above"
    assert postprocess.abstain_side({"score": "knn"}) == "above"
