"""Abstention and calibration fitted on the CONVERTED model, through the device code path (issue 7).

Why here and not in training: the device sees the int8 model's dequantised
outputs, not the float model's. Everything below is computed from
:meth:`leukoedge.runtime.Classifier.run` on the provisional bundle, with the
numpy code the device runs (:mod:`leukoedge.runtime.ood`,
:mod:`leukoedge.runtime.postprocess`, :mod:`leukoedge.stats.calibration`), so the stored threshold and temperature
are exactly right for what the device computes.

The story:

1. **Fit** the out-of-distribution scorer on the pooled ``features`` output of
   a stratified subsample of the TRAIN split (Mahalanobis: class means and a
   shrunk shared covariance; kNN: a reference set). ``max_softmax`` needs no fit.
2. **Threshold** on the VAL split: about ``abstain_rate`` of in-distribution
   validation images abstain (:func:`leukoedge.stats.thresholds.threshold_for_rate`).
3. **Temperature** fitted on VAL from the converted model's own probabilities,
   clipped at :data:`~leukoedge.stats.calibration.INT8_LOG_PROB_FLOOR` (int8
   rounds small probabilities to 0), conservatively (bootstrap interval end
   closest to 1, see :func:`calibrate`); ECE before/after measured on TEST with the runtime's
   own formula. The float Keras model gets the same treatment on its own
   probabilities (reported only, for comparison: the device runs the
   converted model).
4. **Measure** on TEST and on each ``--ood-dir``: AUROC (OOD as positive) and
   abstention rates, decided per image by :meth:`Classifier.abstain`.

Nothing here is tuned on the OOD images. Each OOD folder is nevertheless split
by a hash of the file name into a ``dev`` and a ``held-out`` half, and the
held-out figure is reported separately: choices made by people looking at
these reports (e.g. the default score) should be made on ``dev`` only.

What can fail: :class:`ConversionError` (no validation images, an OOD folder
without readable images).
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..errors import ConversionError, InvalidImageError
from ..files import require_image_files
from ..preprocess import PreprocessSpec, load_image
from ..runtime import ood as ood_lib, postprocess
from ..stats.calibration import (
    INT8_LOG_PROB_FLOOR,
    T_MAX,
    T_MIN,
    bootstrap_ece_sd,
    fit_temperature_conservative,
    log_probs,
    reliability_diagram,
    temperature_scale_probs,
)
from ..stats.metrics import auroc
from ..stats.thresholds import threshold_for_rate

log = logging.getLogger(__name__)

SCORES = ("mahalanobis", "knn", "max_softmax")
KNN_K = 10
#: How the stored temperature is chosen (see :func:`calibrate`).
CALIBRATION_METHOD = "nll-bootstrap-conservative"
#: The reliability diagram written into the bundle (float and converted, before/after).
RELIABILITY_PLOT = "reliability.png"


@dataclass(frozen=True)
class Outputs:
    """Device outputs of a set of images: probabilities (N, K) before temperature and pooled features (N, d)."""

    probs: np.ndarray
    features: np.ndarray | None


@dataclass(frozen=True)
class OODSet:
    """One ``--ood-dir``: its name, image paths (relative to the folder) and held-out mask."""

    name: str
    path: Path
    files: list[str]
    outputs: Outputs
    held_out: np.ndarray


@dataclass(frozen=True)
class TrustResult:
    """What goes into the bundle: the abstention dict, its arrays (file name -> array), calibration and report."""

    abstention: dict
    arrays: dict[str, np.ndarray]
    calibration: dict
    report: dict


def device_outputs(clf, images: np.ndarray, desc: str, with_features: bool) -> Outputs:
    """Run the converted model (device path) on uint8 images; features are global-average pooled."""
    probs, feats = [], []
    for img in tqdm(images, desc=desc, unit="img", leave=False):
        raw = clf.run(img)
        probs.append(raw.probabilities)
        if with_features:
            if raw.features is None:
                raise ConversionError("the converted model has no 'features' output for the abstention score")
            feats.append(ood_lib.as_vectors(raw.features[None, ...])[0])
    return Outputs(np.stack(probs).astype(np.float64), np.stack(feats) if with_features else None)


def fit_scorer(method: str, train: Outputs, labels: np.ndarray, seed: int) -> ood_lib.OODScorer | None:
    """The fitted feature scorer for ``method`` (None for ``max_softmax``, which needs no fit)."""
    if method == "mahalanobis":
        return ood_lib.OODScorer.fit_mahalanobis(train.features, labels)
    if method == "knn":
        return ood_lib.OODScorer.fit_knn(train.features, k=min(KNN_K, len(train.features)), seed=seed)
    if method == "max_softmax":
        return None
    raise ConversionError(f"unknown abstention score {method!r}; use one of {', '.join(SCORES)}")


def choose_rule(method: str, scorer, val: Outputs, rate: float) -> dict:
    """The abstention dict (score, threshold, side) giving about ``rate`` abstentions on validation."""
    if scorer is None:
        rule = {"score": "max_softmax", "threshold": None, "abstain_when": "below", "uses": "probabilities"}
    else:
        rule = {"score": method, "threshold": None, "abstain_when": "above", "uses": scorer.input}
    # Scores per image exactly as the device computes them (one row at a time: a batched
    # product may differ in the last bit, enough to flip an image sitting on the threshold).
    scores, _ = decide(val, rule, scorer)
    rule["threshold"] = threshold_for_rate(scores, rate, abstain_when=rule["abstain_when"])
    if scorer is not None:
        scorer.threshold = rule["threshold"]
    return rule


def decide(outputs: Outputs, rule: dict, scorer) -> tuple[np.ndarray, np.ndarray]:
    """(scores, abstained) per image by :func:`postprocess.abstain`, the device's own decision."""
    scores, flags = [], []
    for i in range(len(outputs.probs)):
        feats = None if outputs.features is None else outputs.features[i]
        s, a = postprocess.abstain(outputs.probs[i], feats, rule, scorer)
        scores.append(s)
        flags.append(a)
    return np.asarray(scores, dtype=np.float64), np.asarray(flags, dtype=bool)


def foreignness(scores: np.ndarray, rule: dict) -> np.ndarray:
    """Scores oriented so that higher = more foreign (for AUROC)."""
    return -scores if rule["abstain_when"] == "below" else scores


def calibrate(
    val: Outputs, y_val: np.ndarray, test: Outputs, y_test: np.ndarray, n_bins: int = 15, seed: int = 0
) -> tuple[dict, dict]:
    """Temperature fitted on validation; (calibration dict, reliability tables on test).

    The temperature is :func:`~leukoedge.stats.calibration.fit_temperature_conservative`:
    the plain NLL fit is kept in the dict (``temperature_nll``, and its test ECE
    ``ece_after_nll`` for comparison only; nothing is chosen on test). When the
    conservative choice is exactly 1 the probabilities are left untouched (no
    floor), so "after" equals "before" on the device.

    A temperature is kept only when it lowers the VALIDATION ECE it was fitted
    on; otherwise T = 1 and ``kept_at_1`` says why (issue 14: on a small set a
    fitted T raised test ECE from 0.0845 to 0.1454). Test is never used to choose.
    """
    fit = fit_temperature_conservative(log_probs(val.probs, INT8_LOG_PROB_FLOOR), y_val, seed=seed)
    t, t_nll = fit.temperature, fit.nll.temperature
    floor = None if t == 1.0 else INT8_LOG_PROB_FLOOR
    ece_val_plain = reliability_diagram(val.probs, y_val, n_bins).ece
    kept_at_1 = None
    if t != 1.0:
        ece_val_fitted = reliability_diagram(_apply(val.probs, t, floor), y_val, n_bins).ece
        if not ece_val_fitted < ece_val_plain:
            kept_at_1 = (f"the fitted temperature {t:.3f} would not lower the validation ECE "
                         f"({ece_val_plain:.4f} -> {ece_val_fitted:.4f}), so T = 1")
            log.info("calibration: %s", kept_at_1)
            t, floor = 1.0, None
    at_bound = not T_MIN * 1.001 < t_nll < T_MAX * 0.999
    if at_bound:
        # E.g. a validation split the model gets entirely right wants T -> 0: confidence is
        # then pushed to 1 on every image, including the errors validation did not show.
        log.warning("the NLL temperature %.3g is at the search bound; validation says little about "
                    "confidence (see trust.md)", t_nll)
    before = reliability_diagram(test.probs, y_test, n_bins)
    after = reliability_diagram(_apply(test.probs, t, floor), y_test, n_bins)
    cal = {
        "temperature": t,
        "method": CALIBRATION_METHOD,
        **{k: v for k, v in fit.to_dict().items() if k != "temperature"},
        "at_search_bound": at_bound,
        "log_prob_floor": floor,
        "fit_log_prob_floor": INT8_LOG_PROB_FLOOR,
        "fitted_on": "val",
        "n_fit": int(len(y_val)),
        "ece_val_before": ece_val_plain,
        "ece_val_after": reliability_diagram(_apply(val.probs, t, floor), y_val, n_bins).ece,
        "temperature_fitted": fit.temperature,
        "kept_at_1": kept_at_1,
        "ece_before": before.ece,
        "ece_after": after.ece,
        "ece_after_nll": reliability_diagram(_apply(test.probs, t_nll), y_test, n_bins).ece,
        "ece_before_sd": bootstrap_ece_sd(test.probs, y_test, n_bins, seed=seed),
        "ece_split": "test",
        "n_test": int(len(y_test)),
        "n_bins": n_bins,
    }
    cal["worse_after"] = bool(cal["ece_after"] > cal["ece_before"])
    return cal, {"before": before.to_dict(), "after": after.to_dict()}


def measure_calibration(temperature: float, test: Outputs, y_test: np.ndarray, n_bins: int = 15) -> tuple[dict, dict]:
    """``--no-calibrate``: keep ``temperature`` (the run's) and only measure ECE on test."""
    before = reliability_diagram(test.probs, y_test, n_bins)
    after = reliability_diagram(_apply(test.probs, temperature, None), y_test, n_bins)
    cal = {"temperature": temperature, "fitted_on": "run (float model)", "ece_before": before.ece,
           "ece_after": after.ece, "ece_before_sd": bootstrap_ece_sd(test.probs, y_test, n_bins),
           "ece_split": "test", "n_test": int(len(y_test)), "n_bins": n_bins}
    cal["worse_after"] = bool(cal["ece_after"] > cal["ece_before"])
    return cal, {"before": before.to_dict(), "after": after.to_dict()}


def _apply(probs: np.ndarray, temperature: float, floor: float | None = INT8_LOG_PROB_FLOOR) -> np.ndarray:
    """Row by row through the device's own function and call, so the reported ECE is the device's."""
    return np.stack([temperature_scale_probs(p, temperature, floor) for p in probs])


# ------------------------------------------------------------------------- OOD folders
def is_held_out(relative: str) -> bool:
    """Stable half split by file name (SHA-256), independent of the folder's order and size."""
    return int(hashlib.sha256(relative.encode("utf-8")).hexdigest()[:8], 16) % 2 == 1


def load_ood_set(clf, folder: Path, spec: PreprocessSpec, with_features: bool) -> OODSet:
    """Decode every image of ``folder`` through the one preprocessing path and run the device model."""
    folder = Path(folder)
    images, names = [], []
    for path in require_image_files(folder, ConversionError, f"--ood-dir {folder}"):
        try:
            images.append(load_image(path, spec))
        except InvalidImageError:
            continue  # an unreadable file is not an OOD sample
        names.append(path.relative_to(folder).as_posix())
    if not images:
        raise ConversionError(f"--ood-dir {folder}: none of the images could be decoded")
    outputs = device_outputs(clf, np.stack(images), f"ood {folder.name}", with_features)
    held = np.array([is_held_out(n) for n in names], dtype=bool)
    return OODSet(folder.name, folder, names, outputs, held)


def ood_figures(test_foreign: np.ndarray, ood_foreign: np.ndarray, ood_abstained: np.ndarray, held: np.ndarray) -> dict:
    """AUROC (test vs OOD) and OOD abstention rate, for all images and for the held-out half."""

    def part(mask):
        if not mask.any():
            return {"n": 0, "auroc": None, "abstain_rate": None}
        return {
            "n": int(mask.sum()),
            "auroc": auroc(test_foreign, ood_foreign[mask]),
            "abstain_rate": float(ood_abstained[mask].mean()),
        }

    out = part(np.ones_like(held))
    out["held_out"] = part(held)
    out["dev"] = part(~held)
    return out


# ------------------------------------------------------------------------- the whole step
def build(
    method: str,
    *,
    train: Outputs,
    y_train: np.ndarray,
    val: Outputs,
    y_val: np.ndarray,
    test: Outputs,
    y_test: np.ndarray,
    ood_sets: list[OODSet],
    rate: float,
    calibrate_flag: bool,
    run_temperature: float,
    seed: int,
    float_val: np.ndarray | None = None,
    float_test: np.ndarray | None = None,
) -> TrustResult:
    """Fit, threshold, calibrate and measure (see module docstring); pure numpy on device outputs."""
    if len(y_val) == 0:
        raise ConversionError("the manifest's val split is empty; abstention thresholds and the temperature are chosen on it")
    rule, scorer, figures = _one_method(method, train, y_train, val, test, ood_sets, rate, seed)
    arrays: dict[str, np.ndarray] = {}
    if scorer is not None:
        meta, named = scorer.to_state()
        files = {name: f"ood_{name}.npy" for name in named}
        arrays = {files[name]: arr for name, arr in named.items()}
        rule["scorer"] = {k: meta[k] for k in ("method", "input", "params", "threshold")} | {"files": files}
        rule["fitted_on"] = {"split": "train", "n": int(len(y_train))}
    rule.update(
        target_abstain_rate=rate,
        chosen_on="val",
        n_val=int(len(y_val)),
        val_abstain_rate=figures["val_abstain_rate"],
        test_abstain_rate=figures["test_abstain_rate"],
        ood={name: f for name, f in figures["ood"].items()},
    )
    if calibrate_flag:
        calibration, reliability = calibrate(val, y_val, test, y_test, seed=seed)
    else:
        calibration, reliability = measure_calibration(run_temperature, test, y_test)
    float_cal, float_rel = None, None
    if float_test is not None:
        f_test = Outputs(np.asarray(float_test, dtype=np.float64), None)
        if calibrate_flag and float_val is not None:
            f_val = Outputs(np.asarray(float_val, dtype=np.float64), None)
            float_cal, float_rel = calibrate(f_val, y_val, f_test, y_test, seed=seed)
        else:
            float_cal, float_rel = measure_calibration(run_temperature, f_test, y_test)
    comparison = {}
    for other in SCORES:
        if other == method:
            comparison[other] = figures
        elif other == "max_softmax" or train.features is not None:
            comparison[other] = _one_method(other, train, y_train, val, test, ood_sets, rate, seed)[2]
    report = {
        "score": method,
        "abstention": {k: v for k, v in rule.items() if k != "scorer"},
        "calibration": calibration,
        "reliability_test": reliability,
        "calibration_float": float_cal,
        "reliability_test_float": float_rel,
        "comparison": comparison,
        "ood_sets": {s.name: {"path": str(s.path), "n": len(s.files), "n_held_out": int(s.held_out.sum())} for s in ood_sets},
        "ood_used_for": "evaluation only: nothing in convert is fitted or thresholded on OOD images; "
        "'held_out' is the half (by SHA-256 of the file name) that must stay untouched by anyone choosing "
        "settings from these reports",
        "n": {"train_fit": int(len(y_train)), "val": int(len(y_val)), "test": int(len(y_test))},
    }
    return TrustResult(rule, arrays, calibration, report)


def _one_method(method, train, y_train, val, test, ood_sets, rate, seed):
    scorer = fit_scorer(method, train, y_train, seed)
    rule = choose_rule(method, scorer, val, rate)
    _, val_abst = decide(val, rule, scorer)
    test_scores, test_abst = decide(test, rule, scorer)
    test_foreign = foreignness(test_scores, rule)
    ood = {}
    for s in ood_sets:
        scores, abst = decide(s.outputs, rule, scorer)
        ood[s.name] = ood_figures(test_foreign, foreignness(scores, rule), abst, s.held_out)
    figures = {
        "threshold": rule["threshold"],
        "val_abstain_rate": float(val_abst.mean()),
        "test_abstain_rate": float(test_abst.mean()),
        "ood": ood,
    }
    return rule, scorer, figures
