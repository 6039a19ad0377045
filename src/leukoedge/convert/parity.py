"""The parity gate: does the converted model classify like the float model?

Published edge projects lost up to half their accuracy on the device without
noticing; this gate makes that impossible to miss. The float Keras model and
the converted model (through :class:`leukoedge.runtime.Classifier`, the
device code path, never ``tf.lite``) classify the same decoded test images;
the comparison is pure numpy (:func:`compare`) so it is tested on arrays.

The decision is statistical, so it means the same at n = 39 as at n = 390
(issue 14: at n = 39 the old "agreement >= 0.99" meant "zero flips", and one
image that moved from p 0.503 to 0.523 failed a model whose int8 version was
MORE accurate):

- **flips**: the converted model fails when its top-1 flip rate is shown to
  exceed the tolerated rate ``1 - min_agreement`` (one-sided exact binomial
  test, ``p < ALPHA``): 1 flip of 39 passes (p = 0.32), 3 of 39 fail;
- **accuracy**: it fails when the accuracy drop is larger than ``max_drop``
  points AND real, i.e. significant on the paired images (exact McNemar on
  those one model gets right and the other wrong): one image lost at n = 39
  (2.6 points, p = 1) is chance, eight lost of 390 (2 points, p = 0.008) is not.

A broken conversion (e.g. calibrated on constant images) flips most answers
and fails both. The report gives the flip rate with its exact interval, so a
pass at small n says how large a flip rate the data could still hide.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
from tqdm import tqdm

from ..stats import clopper_pearson, exceeds_rate, paired_change
from ..stats.metrics import accuracy, macro_f1

_EPS = 1e-7
#: Significance level of both gate tests.
ALPHA = 0.05


def kl_divergence(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Row-wise KL(p || q) in nats; q is floored so a 0 from int8 rounding stays finite."""
    p = np.clip(p.astype(np.float64), _EPS, 1.0)
    q = np.clip(q.astype(np.float64), _EPS, 1.0)
    p /= p.sum(axis=1, keepdims=True)
    q /= q.sum(axis=1, keepdims=True)
    return np.sum(p * np.log(p / q), axis=1)


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Correlation of all probabilities (flattened); 1.0 when both are constant and equal."""
    a, b = a.reshape(-1).astype(np.float64), b.reshape(-1).astype(np.float64)
    sa, sb = a.std(), b.std()
    if sa == 0 or sb == 0:
        return 1.0 if np.allclose(a, b) else 0.0
    return float(np.mean((a - a.mean()) * (b - b.mean())) / (sa * sb))


@dataclass(frozen=True)
class ParityReport:
    """Everything ``parity.json`` holds; see :meth:`to_markdown` for the readable form."""

    mode: str
    n_images: int
    classes: list[str]
    float_accuracy: float
    quant_accuracy: float
    delta_accuracy: float  # percentage points, float - quantised (positive = worse)
    float_macro_f1: float
    quant_macro_f1: float
    delta_macro_f1: float
    agreement: float
    per_class_agreement: dict[str, float]
    mean_kl: float
    pearson: float
    max_drop: float
    min_agreement: float
    passed: bool
    reasons: list[str]
    worst: list[dict] = field(default_factory=list)
    size: dict = field(default_factory=dict)
    split_kind: str = ""  # from the manifest: "random" splits overstate accuracy
    leaky: bool = False
    flips: int = 0
    flip_rate_interval: tuple[float, float] = (0.0, 1.0)
    flip_p_value: float = 1.0  # P(>= flips | tolerated rate): small = more flips than tolerated
    accuracy_change: dict = field(default_factory=dict)  # paired: lost, gained, drop interval, McNemar p

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> dict:
        """The short form stored in bundle.json."""
        keys = (
            "mode", "n_images", "split_kind", "float_accuracy", "quant_accuracy", "delta_accuracy",
            "agreement", "flips", "flip_p_value", "mean_kl", "passed",
        )
        return {k: getattr(self, k) for k in keys}

    def _decision_lines(self) -> list[str]:
        lo, hi = self.flip_rate_interval
        tolerated = 1.0 - self.min_agreement
        change = self.accuracy_change or {}
        lines = [
            f"- flips: {self.flips} of {self.n_images} images changed their top-1 answer ({self.flips / max(self.n_images, 1):.1%}; "
            f"exact 95 % interval {lo:.1%}-{hi:.1%}); tolerated rate {tolerated:.1%}; "
            f"p = {self.flip_p_value:.3g} for this many flips at the tolerated rate"
            + (" -> more flips than tolerated" if self.flip_p_value < ALPHA else
               f" -> not shown to exceed it{'; at this n a flip rate up to ' + format(hi, '.1%') + ' cannot be ruled out' if hi > tolerated else ''}"),
        ]
        if change:
            lines.append(
                f"- accuracy: {change['lost']} image(s) right in float and wrong converted, {change['gained']} the other way; "
                f"drop {change['drop'] * 100:+.2f} points (95 % interval {change['low'] * 100:+.1f} to {change['high'] * 100:+.1f}), "
                f"McNemar p = {change['p_value']:.3g}")
        return lines

    def to_markdown(self, title: str = "Parity report") -> str:
        verdict = "PASSED" if self.passed else "FAILED: " + "; ".join(self.reasons)
        lines = [
            f"# {title}",
            "",
            f"Float Keras model vs the converted ({self.mode}) model run through the device runtime, "
            f"on the {self.n_images} images of the test split"
            + (f" ({self.split_kind} split)." if self.split_kind else "."),
            "",
            *(
                ["A random image-level split overstates accuracy (neighbouring captures leak); "
                 "the agreement figures are still meaningful.", ""]
                if self.leaky else []
            ),
            f"**Gate: {verdict}** (max drop {self.max_drop:g} points, min agreement {self.min_agreement:.3f}, "
            f"decided by tests at the {ALPHA:g} level: see below)",
            "",
            *self._decision_lines(),
            "",
            "| metric | float | converted | difference |",
            "|---|---|---|---|",
            f"| accuracy | {self.float_accuracy:.4f} | {self.quant_accuracy:.4f} | {self.delta_accuracy:+.2f} points |",
            f"| macro-F1 | {self.float_macro_f1:.4f} | {self.quant_macro_f1:.4f} | {self.delta_macro_f1:+.2f} points |",
            "",
            f"- top-1 agreement: {self.agreement:.4f}",
            f"- mean KL(float || converted): {self.mean_kl:.5f} nats",
            f"- Pearson correlation of the probabilities: {self.pearson:.5f}",
            "",
            "| class (true label) | agreement |",
            "|---|---|",
            *[f"| {c} | {a:.4f} |" for c, a in self.per_class_agreement.items()],
        ]
        if self.size:
            lines += [
                "",
                "## Size",
                "",
                f"- float32 TFLite: {self.size.get('float32_bytes', 0):,} bytes",
                f"- converted ({self.mode}): {self.size.get('converted_bytes', 0):,} bytes",
                f"- ratio: {self.size.get('ratio', 0):.2f}x smaller",
            ]
        if self.worst:
            lines += [
                "",
                f"## The {len(self.worst)} images where the models disagree most (top-1 flips first, then by KL divergence)",
                "",
                "| image | true | float (p) | converted (p) | KL |",
                "|---|---|---|---|---|",
                *[
                    f"| {w['path']} | {w['true']} | {w['float_label']} ({w['float_confidence']:.3f}) | "
                    f"{w['quant_label']} ({w['quant_confidence']:.3f}) | {w['kl']:.4f} |"
                    for w in self.worst
                ],
            ]
        lines += ["", "Research use only; not a diagnostic device.", ""]
        return "\n".join(lines)


def compare(
    float_probs: np.ndarray,
    quant_probs: np.ndarray,
    y_true: np.ndarray,
    classes: list[str],
    paths: list[str],
    *,
    mode: str,
    max_drop: float,
    min_agreement: float,
    worst: int = 10,
) -> ParityReport:
    """Pure comparison of two (N, K) probability arrays against the true labels."""
    if float_probs.shape != quant_probs.shape or len(float_probs) != len(y_true) or len(y_true) == 0:
        raise ValueError(f"parity needs matching non-empty arrays, got {float_probs.shape}, {quant_probs.shape}, {len(y_true)}")
    k = len(classes)
    fp, qp = float_probs.argmax(axis=1), quant_probs.argmax(axis=1)
    f_acc, q_acc = accuracy(y_true, fp), accuracy(y_true, qp)
    f_f1, q_f1 = macro_f1(y_true, fp, k), macro_f1(y_true, qp, k)
    agree = fp == qp
    per_class = {classes[c]: float(np.mean(agree[y_true == c])) for c in range(k) if np.any(y_true == c)}
    kl = kl_divergence(float_probs, quant_probs)
    delta = (f_acc - q_acc) * 100.0
    agreement = float(np.mean(agree))
    n = int(len(y_true))
    flips = int(n - np.sum(agree))
    # Rounded so that 1 - 0.99 = 0.010000000000000009 cannot turn "no tolerance" into a tiny one.
    tolerated = round(1.0 - min_agreement, 12)
    too_many_flips, flip_p = exceeds_rate(flips, n, tolerated, alpha=ALPHA)
    change = paired_change(fp == y_true, qp == y_true)
    change_dict = change.to_dict()
    reasons = []
    if too_many_flips:
        reasons.append(f"{flips} of {n} images changed their answer ({flips / n:.1%}): more than the tolerated "
                       f"{tolerated:.1%} (--min-agreement {min_agreement:g}; p = {flip_p:.2g})")
    # Rounded so float noise in 0.01000000001 points cannot flip the verdict.
    if round(delta, 6) > max_drop and change.p_value < ALPHA:
        reasons.append(f"accuracy dropped {delta:.2f} points (more than --max-drop {max_drop:g}; "
                       f"95 % interval {change_dict['low'] * 100:.1f}-{change_dict['high'] * 100:.1f}, "
                       f"McNemar p = {change.p_value:.2g})")
    # Top-1 flips first (they are what the gate counts), then the largest divergences.
    order = np.lexsort((-kl, agree))[:worst]
    worst_rows = [
        {
            "path": paths[i],
            "true": classes[int(y_true[i])],
            "float_label": classes[int(fp[i])],
            "float_confidence": float(float_probs[i, fp[i]]),
            "quant_label": classes[int(qp[i])],
            "quant_confidence": float(quant_probs[i, qp[i]]),
            "kl": float(kl[i]),
            "agree": bool(agree[i]),
        }
        for i in order
    ]
    return ParityReport(
        mode=mode,
        n_images=int(len(y_true)),
        classes=list(classes),
        float_accuracy=f_acc,
        quant_accuracy=q_acc,
        delta_accuracy=delta,
        float_macro_f1=f_f1,
        quant_macro_f1=q_f1,
        delta_macro_f1=(f_f1 - q_f1) * 100.0,
        agreement=agreement,
        per_class_agreement=per_class,
        mean_kl=float(kl.mean()),
        pearson=pearson(float_probs, quant_probs),
        max_drop=max_drop,
        min_agreement=min_agreement,
        passed=not reasons,
        reasons=reasons,
        worst=worst_rows,
        flips=flips,
        flip_rate_interval=clopper_pearson(flips, n),
        flip_p_value=flip_p,
        accuracy_change=change_dict,
    )


def predict_float(model, images: np.ndarray, batch_size: int = 32) -> np.ndarray:
    """Float Keras probabilities for uint8 images (raw pixels; Rescaling is in the model)."""
    out = []
    for start in tqdm(range(0, len(images), batch_size), desc="float model", unit="batch", leave=False):
        batch = images[start : start + batch_size].astype(np.float32)
        pred = model(batch, training=False)
        if isinstance(pred, dict):
            pred = pred["probabilities"]
        elif isinstance(pred, (list, tuple)):
            pred = pred[0]
        out.append(np.asarray(pred, dtype=np.float64))
    return np.concatenate(out, axis=0)


def predict_device(classifier, images: np.ndarray) -> np.ndarray:
    """Converted-model probabilities through the device runtime, one image at a time."""
    rows = [classifier.run(img).probabilities for img in tqdm(images, desc="converted model", unit="img", leave=False)]
    return np.stack(rows).astype(np.float64)
