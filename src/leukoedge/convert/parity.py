"""The parity gate: does the converted model classify like the float model?

Published edge projects lost up to half their accuracy on the device without
noticing; this gate makes that impossible to miss. The float Keras model and
the converted model (through :class:`leukoedge.runtime.Classifier`, the
device code path, never ``tf.lite``) classify the same decoded test images;
the comparison is pure numpy (:func:`compare`) so it is tested on arrays.

Pass when ``delta_accuracy`` (float - converted, percentage points) is at most
``max_drop`` AND top-1 ``agreement`` is at least ``min_agreement``.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
from tqdm import tqdm

_EPS = 1e-7


def accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    return float(np.mean(y_true == y_pred)) if len(y_true) else 0.0


def macro_f1(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> float:
    """Unweighted mean of per-class F1 over classes present in truth or prediction."""
    scores = []
    for k in range(n_classes):
        tp = int(np.sum((y_pred == k) & (y_true == k)))
        fp = int(np.sum((y_pred == k) & (y_true != k)))
        fn = int(np.sum((y_pred != k) & (y_true == k)))
        if tp + fp + fn == 0:
            continue
        scores.append(2 * tp / (2 * tp + fp + fn))
    return float(np.mean(scores)) if scores else 0.0


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

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> dict:
        """The short form stored in bundle.json."""
        keys = (
            "mode", "n_images", "split_kind", "float_accuracy", "quant_accuracy", "delta_accuracy",
            "agreement", "mean_kl", "passed",
        )
        return {k: getattr(self, k) for k in keys}

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
            f"**Gate: {verdict}** (max drop {self.max_drop:g} points, min agreement {self.min_agreement:.3f})",
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
    reasons = []
    # Compare in rounded form so 0.9900000001 vs 0.99 float noise cannot flip the verdict.
    if round(delta, 6) > max_drop:
        reasons.append(f"accuracy dropped {delta:.2f} points (more than --max-drop {max_drop:g})")
    if round(agreement, 6) < min_agreement:
        reasons.append(f"top-1 agreement {agreement:.4f} is below --min-agreement {min_agreement:g}")
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
