"""Shortcut audit, numpy parts: does the model read the cells or the stain and the capture?

Issue 7 measured that a logistic regression on colour histograms alone nearly
matches the CNN on Taleqani, and that the CNN collapses on grayscale or
colour-normalised copies. This module provides, without TensorFlow:

- a colour-only baseline (:func:`colour_features` + :class:`ColourBaseline`, a
  multinomial logistic regression with L2 fitted by damped Newton steps:
  deterministic, no scipy);
- a registry of perturbations that keep morphology and change colour, capture or
  background (:data:`PERTURBATIONS`, each ``fn(rgb, rng) -> rgb``);
- background flattening and :func:`heatmap_mass_on_cells`, both on the
  white-cell mask of :mod:`.cells`;
- :func:`bootstrap_ci` and :func:`run_audit`, which takes the model as a
  ``predict_fn(images uint8 (N,H,W,3)) -> probabilities (N, K)`` so the eval
  code decides how the model runs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
from PIL import Image
from tqdm import tqdm

from .. import stain
from ..errors import UsageError
from ..stats import Proportion, paired_change, verdict_on_drop
from ..stats.calibration import softmax
from .cells import white_cell_mask

# --- colour-only baseline --------------------------------------------------------------------


def colour_features(rgb: np.ndarray, kind: str = "histogram", bins: int = 8) -> np.ndarray:
    """Colour-only features of one image; they see no shape at all.

    ``"histogram"``: normalised ``bins``-bin histograms of R, G, B and H, S, V plus
    per-channel RGB mean and std (6 * bins + 6 numbers). ``"mean_std"``: the six
    numbers only (issue 7: these alone reach ~90 % on Taleqani).
    """
    arr = stain.check_rgb(rgb).astype(np.float64)
    stats = np.concatenate([arr.mean(axis=(0, 1)), arr.std(axis=(0, 1))]) / 255.0
    if kind == "mean_std":
        return stats
    if kind != "histogram":
        raise UsageError(f"unknown colour feature kind {kind!r}; use 'histogram' or 'mean_std'")
    hsv = np.asarray(Image.fromarray(stain.check_rgb(rgb), mode="RGB").convert("HSV"), dtype=np.float64)
    n = arr.shape[0] * arr.shape[1]
    hists = [np.histogram(ch, bins=bins, range=(0, 256))[0] / n for src in (arr, hsv) for ch in np.moveaxis(src, 2, 0)]
    return np.concatenate(hists + [stats])


@dataclass
class ColourBaseline:
    """Standardised features -> multinomial logistic regression (L2), fitted by Newton steps.

    ``fit`` runs a fixed number of damped Newton iterations on the full Hessian
    (features x classes is a few hundred parameters), halving the step until the
    penalised loss decreases: deterministic and converges in ~10-20 steps.
    """

    kind: str = "histogram"
    l2: float = 1e-2
    iterations: int = 30
    mean: np.ndarray | None = None
    scale: np.ndarray | None = None
    weights: np.ndarray | None = None

    def _design(self, feats: np.ndarray) -> np.ndarray:
        x = (feats - self.mean) / self.scale
        return np.hstack([x, np.ones((x.shape[0], 1))])

    def features(self, images: Sequence[np.ndarray]) -> np.ndarray:
        return np.stack([colour_features(im, self.kind) for im in tqdm(
            images, desc=f"colour features ({self.kind})", unit="img", leave=False, mininterval=1.0)])

    def fit(self, images: Sequence[np.ndarray], labels: np.ndarray, n_classes: int | None = None) -> "ColourBaseline":
        y = np.asarray(labels).astype(np.int64).ravel()
        if len(images) != y.size or y.size < 2:
            raise UsageError(f"colour baseline needs >= 2 images with one label each ({len(images)} images, {y.size} labels)")
        k = int(n_classes or y.max() + 1)
        feats = self.features(images)
        self.mean, self.scale = feats.mean(axis=0), np.maximum(feats.std(axis=0), 1e-6)
        x = self._design(feats)
        n, d = x.shape
        onehot = np.eye(k)[y]
        reg = np.full(d, self.l2)
        reg[-1] = 1e-6  # barely penalise the intercept; keeps the Hessian positive definite
        w = np.zeros((d, k))

        def loss(w: np.ndarray) -> float:
            z = x @ w
            lse = z.max(1) + np.log(np.exp(z - z.max(1, keepdims=True)).sum(1))
            return float(np.mean(lse - (z * onehot).sum(1)) + 0.5 * np.sum(reg[:, None] * w**2))

        current = loss(w)
        for _ in range(self.iterations):
            p = softmax(x @ w)
            grad = (x.T @ (p - onehot) / n + reg[:, None] * w).ravel(order="F")
            # Hessian blocks: X^T diag(p_a (delta_ab - p_b)) X / n, ordered class-major like grad.
            hess = np.empty((d * k, d * k))
            for a in range(k):
                for b in range(a, k):
                    wts = p[:, a] * ((a == b) - p[:, b])
                    block = (x * wts[:, None]).T @ x / n
                    hess[a * d:(a + 1) * d, b * d:(b + 1) * d] = block
                    hess[b * d:(b + 1) * d, a * d:(a + 1) * d] = block.T
            hess += np.diag(np.tile(reg, k))
            step = np.linalg.solve(hess, grad).reshape((d, k), order="F")
            t = 1.0
            while t > 1e-4:
                trial = w - t * step
                new = loss(trial)
                if new <= current:
                    break
                t /= 2.0
            else:
                break
            converged = current - new < 1e-10
            w, current = trial, new
            if converged:
                break
        self.weights = w
        return self

    def predict_proba(self, images: Sequence[np.ndarray]) -> np.ndarray:
        if self.weights is None:
            raise UsageError("the colour baseline is not fitted; call fit first")
        return softmax(self._design(self.features(images)) @ self.weights)


def flatten_background(rgb: np.ndarray, mask: np.ndarray | None = None, fill: Sequence[int] | None = None) -> np.ndarray:
    """Replace every pixel outside the (white-cell) mask by one colour.

    ``fill=None`` uses the image's median background colour (keeps the tint, removes
    texture and red cells); a fixed ``fill`` also removes the tint.
    """
    arr = stain.check_rgb(rgb)
    m = white_cell_mask(arr) if mask is None else np.asarray(mask, dtype=bool)
    if m.shape != arr.shape[:2]:
        raise UsageError(f"mask shape {m.shape} does not match image {arr.shape[:2]}")
    if fill is None:
        bg = arr[~m] if (~m).any() else arr.reshape(-1, 3)
        colour = np.median(bg, axis=0)
    else:
        colour = np.asarray(fill, dtype=np.float64)
    out = arr.copy()
    out[~m] = np.clip(np.rint(colour), 0, 255).astype(np.uint8)
    return out


#: Where Taleqani's burnt-in scale-bar label sits (bottom-right), as fractions of height and width.
LABEL_CORNER = (0.18, 0.30)


def cover_corner(rgb: np.ndarray, corner: str, size: Sequence[float] = LABEL_CORNER) -> np.ndarray:
    """Paint a bottom corner (``"bottom-right"`` or ``"bottom-left"``) with the median background colour.

    Every Taleqani image carries a scale-bar label in its bottom-right corner,
    drawn differently per capture session (black on white, red, large). A net
    can read it like a stain. Covering the bottom-right corner removes the label;
    covering the same area bottom-left is the control (the same share of cells
    lost, no label): a model that reads the label drops more on the first.
    """
    arr = stain.check_rgb(rgb)
    if corner not in ("bottom-right", "bottom-left"):
        raise UsageError(f"corner must be 'bottom-right' or 'bottom-left', got {corner!r}")
    m = white_cell_mask(arr)
    bg = arr[~m] if (~m).any() else arr.reshape(-1, 3)
    h, w = arr.shape[:2]
    ch, cw = max(1, round(size[0] * h)), max(1, round(size[1] * w))
    out = arr.copy()
    cols = slice(w - cw, w) if corner == "bottom-right" else slice(0, cw)
    out[h - ch:, cols] = np.clip(np.rint(np.median(bg, axis=0)), 0, 255).astype(np.uint8)
    return out


def heatmap_mass_on_cells(heatmap: np.ndarray, mask: np.ndarray) -> float:
    """Fraction of (non-negative) heatmap mass inside the mask; NaN for an all-zero heatmap.

    The heatmap is resized bilinearly to the mask size if needed. Compare with
    ``mask.mean()``: a model that ignores cells scores about that.
    """
    m = np.asarray(mask, dtype=bool)
    h = np.nan_to_num(np.asarray(heatmap, dtype=np.float32))
    if h.ndim != 2 or m.ndim != 2:
        raise UsageError(f"heatmap and mask must be 2-D, got {h.shape} and {m.shape}")
    if h.shape != m.shape:
        h = np.asarray(Image.fromarray(h, mode="F").resize((m.shape[1], m.shape[0]), Image.Resampling.BILINEAR))
    h = np.maximum(h.astype(np.float64), 0.0)
    total = h.sum()
    return float(h[m].sum() / total) if total > 0 else float("nan")


# --- statistics --------------------------------------------------------------------------------------


def proportion_ci(flags: np.ndarray, level: float = 0.95) -> dict:
    """Share of True in ``flags`` with its Wilson interval: never [100 %, 100 %] at n = 39 (issue 14)."""
    f = np.asarray(flags, dtype=bool).ravel()
    if f.size == 0:
        raise UsageError("proportion_ci needs at least one value")
    return {**Proportion(int(f.sum()), int(f.size), level).to_dict(), "n": int(f.size)}


def bootstrap_ci(values: np.ndarray, n: int = 1000, seed: int = 0, level: float = 0.95) -> dict:
    """Mean of continuous ``values`` with a percentile-bootstrap interval (0/1 flags: :func:`proportion_ci`)."""
    v = np.asarray(values, dtype=np.float64).ravel()
    if v.size == 0 or not np.all(np.isfinite(v)):
        raise UsageError("bootstrap_ci needs at least one finite value")
    if n < 1 or not 0 < level < 1:
        raise UsageError(f"bootstrap needs n >= 1 and 0 < level < 1 (got n={n}, level={level})")
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, v.size, size=(n, v.size))].mean(axis=1)
    lo, hi = np.percentile(means, [50 * (1 - level), 50 * (1 + level)])
    return {"value": float(v.mean()), "low": float(lo), "high": float(hi), "n": int(v.size), "level": level,
            "method": f"bootstrap n={n} seed={seed}"}


# --- perturbations ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Perturbation:
    """A named change that keeps morphology; ``fn(rgb, rng) -> rgb``."""

    name: str
    description: str
    fn: Callable[[np.ndarray, np.random.Generator], np.ndarray]


def _p(name: str, description: str, fn: Callable) -> tuple[str, Perturbation]:
    return name, Perturbation(name, description, fn)


#: The audit's perturbation table (the one source of truth for names and meanings).
PERTURBATIONS: dict[str, Perturbation] = dict([
    _p("clean", "unchanged images", lambda x, r: x.copy()),
    _p("grayscale", "BT.601 luma in all three channels", lambda x, r: stain.grayscale(x)),
    _p("colour_normalised", "each channel to a fixed mean and std", lambda x, r: stain.per_image_colour_normalize(x)),
    _p("hed_jitter_0.05", "HED stain jitter, sigma = bias = 0.05", lambda x, r: stain.hed_jitter(x, r, 0.05, 0.05)),
    _p("hed_jitter_0.1", "HED stain jitter, sigma = bias = 0.1", lambda x, r: stain.hed_jitter(x, r, 0.1, 0.1)),
    _p("hed_jitter_0.2", "HED stain jitter, sigma = bias = 0.2", lambda x, r: stain.hed_jitter(x, r, 0.2, 0.2)),
    _p("darker_0.85", "all channels x 0.85", lambda x, r: stain.adjust_brightness(x, 0.85)),
    _p("brighter_1.15", "all channels x 1.15", lambda x, r: stain.adjust_brightness(x, 1.15)),
    _p("white_balance_warm", "R x 1.08, B x 0.92", lambda x, r: stain.white_balance(x, (1.08, 1.0, 0.92))),
    _p("white_balance_cool", "R x 0.92, B x 1.08", lambda x, r: stain.white_balance(x, (0.92, 1.0, 1.08))),
    _p("blur_1", "Gaussian blur, 1 px", lambda x, r: stain.gaussian_blur(x, 1.0)),
    _p("background_flattened", "outside the white-cell mask: the median background colour",
       lambda x, r: flatten_background(x)),
    _p("background_neutral", "outside the white-cell mask: fixed light grey (235, 235, 235)",
       lambda x, r: flatten_background(x, fill=(235, 235, 235))),
    _p("label_corner_covered", "bottom-right 18 % x 30 % (the scale-bar label) painted with the background colour",
       lambda x, r: cover_corner(x, "bottom-right")),
    _p("control_corner_covered", "bottom-left 18 % x 30 % painted the same way (control for the label corner)",
       lambda x, r: cover_corner(x, "bottom-left")),
])


def get_perturbation(name: str) -> Perturbation:
    try:
        return PERTURBATIONS[name]
    except KeyError:
        raise UsageError(f"unknown perturbation {name!r}; valid names: {', '.join(PERTURBATIONS)}") from None


def _benign_index(class_names: Sequence[str]) -> int | None:
    lower = [c.lower() for c in class_names]
    return lower.index("benign") if "benign" in lower and len(lower) > 2 else None


def run_audit(
    predict_fn: Callable[[np.ndarray], np.ndarray],
    images: Sequence[np.ndarray],
    labels: np.ndarray,
    class_names: Sequence[str],
    rng: np.random.Generator,
    perturbations: Sequence[str] | None = None,
    n_boot: int = 1000,
    batch_size: int = 32,
) -> dict:
    """Accuracy (with 95 % Wilson intervals) of ``predict_fn`` under each perturbation.

    ``predict_fn`` gets uint8 batches (N, H, W, 3) and returns (N, K) probabilities.
    Per perturbation: accuracy, agreement with the clean predictions, predicted
    class counts and, when the classes are "Benign" plus >= 2 others, the
    benign-versus-malignant accuracy (any non-Benign class counts as malignant).
    Every perturbation is also compared with clean on the same images
    (``change_vs_clean``: exact McNemar, paired interval of the drop, and a
    ``verdict`` of ``drop`` / ``no meaningful drop`` / ``inconclusive``), and the
    scale-bar label corner with its control corner (``change_vs_control``), so a
    reading never rests on whether two marginal intervals overlap.
    Raises UsageError on mismatched inputs or a predict_fn returning the wrong shape.
    """
    y = np.asarray(labels).astype(np.int64).ravel()
    if len(images) != y.size or y.size == 0:
        raise UsageError(f"run_audit needs one label per image ({len(images)} images, {y.size} labels)")
    names = list(perturbations) if perturbations is not None else list(PERTURBATIONS)
    if "clean" not in names:
        names.insert(0, "clean")
    perts = [get_perturbation(n) for n in names]
    k = len(class_names)
    benign = _benign_index(class_names)
    results: dict = {}
    clean_pred = None
    correct: dict[str, np.ndarray] = {}
    for pert in tqdm(perts, desc="audit", unit="perturbation"):
        imgs = np.stack([pert.fn(stain.check_rgb(im), rng) for im in images])
        probs = np.concatenate([np.asarray(predict_fn(imgs[i:i + batch_size])) for i in range(0, len(imgs), batch_size)])
        if probs.shape != (y.size, k):
            raise UsageError(f"predict_fn returned shape {probs.shape}, expected {(y.size, k)}")
        pred = probs.argmax(axis=1)
        clean_pred = pred if pert.name == "clean" else clean_pred
        correct[pert.name] = pred == y
        entry = {
            "description": pert.description,
            "accuracy": proportion_ci(pred == y),
            "agreement_with_clean": proportion_ci(pred == clean_pred),
            "predicted_counts": {c: int(np.sum(pred == i)) for i, c in enumerate(class_names)},
        }
        if pert.name != "clean":
            entry["change_vs_clean"] = _paired(correct["clean"], correct[pert.name])
        if benign is not None:
            entry["benign_vs_malignant_accuracy"] = proportion_ci((pred == benign) == (y == benign))
        results[pert.name] = entry
    if "label_corner_covered" in correct and "control_corner_covered" in correct:
        results["label_corner_covered"]["change_vs_control"] = _paired(correct["control_corner_covered"],
                                                                       correct["label_corner_covered"])
    return {"classes": list(class_names), "n_images": int(y.size), "perturbations": results}


#: A drop whose whole 95 % interval lies below this is "no meaningful drop".
NEGLIGIBLE_DROP = 0.05


def _paired(before: np.ndarray, after: np.ndarray) -> dict:
    change = paired_change(before, after)
    return {**change.to_dict(), "verdict": verdict_on_drop(change, negligible=NEGLIGIBLE_DROP),
            "negligible": NEGLIGIBLE_DROP}


def colour_baseline_report(
    train_images: Sequence[np.ndarray], train_labels: np.ndarray,
    test_images: Sequence[np.ndarray], test_labels: np.ndarray,
    class_names: Sequence[str], n_boot: int = 1000,
) -> dict:
    """Test accuracy (with 95 % CI) of colour-only baselines trained on the train split."""
    y = np.asarray(test_labels).astype(np.int64).ravel()
    out = {}
    for kind in ("histogram", "mean_std"):
        model = ColourBaseline(kind=kind).fit(train_images, train_labels, n_classes=len(class_names))
        pred = model.predict_proba(test_images).argmax(axis=1)
        out[kind] = {"accuracy": proportion_ci(pred == y)}
        benign = _benign_index(class_names)
        if benign is not None:
            out[kind]["benign_vs_malignant_accuracy"] = proportion_ci((pred == benign) == (y == benign))
    return out
