"""Report plots as PNG (matplotlib, Agg backend: no display needed).

Each function writes one file atomically (temp + rename) and returns its
path. Inputs are plain numpy/JSON values, so plots can be redrawn from
``history.json`` / ``metrics.json`` without TensorFlow.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from ..files import atomic_path
from ..stats.metrics import roc_curve


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    path = Path(path)
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    finally:
        _pyplot().close(fig)
    return path


def training_curves(history: dict, path: Path) -> Path:
    """Loss and accuracy per epoch (train vs val) plus the learning rate."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    epochs = np.arange(1, len(history.get("loss", [])) + 1)
    for ax, key in zip(axes[:2], ("loss", "accuracy")):
        for prefix, style in (("", "-"), ("val_", "--")):
            values = history.get(prefix + key)
            if values:
                ax.plot(epochs[: len(values)], values, style, label=(prefix or "train_") + key)
        ax.set_xlabel("epoch")
        ax.set_title(key)
        ax.legend()
        ax.grid(alpha=0.3)
    if history.get("learning_rate"):
        axes[2].plot(epochs[: len(history["learning_rate"])], history["learning_rate"])
    axes[2].set_title("learning rate")
    axes[2].set_xlabel("epoch")
    axes[2].grid(alpha=0.3)
    return _save(fig, path)


def confusion(cm: Sequence[Sequence[int]], classes: Sequence[str], path: Path, title: str = "") -> Path:
    plt = _pyplot()
    cm = np.asarray(cm)
    fig, ax = plt.subplots(figsize=(1.2 * len(classes) + 2.5, 1.1 * len(classes) + 2))
    ax.imshow(cm, cmap="Blues")
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center",
                    color="white" if cm[i, j] > cm.max() / 2 else "black")
    ax.set_xticks(range(len(classes)), classes, rotation=30)
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title or "confusion matrix")
    return _save(fig, path)


def roc(y: np.ndarray, probs: np.ndarray, classes: Sequence[str], path: Path, aucs: Sequence[float]) -> Path:
    """One-vs-rest ROC curve per class."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 4.5))
    for c, name in enumerate(classes):
        positive = np.asarray(y) == c
        if positive.any() and (~positive).any():
            fpr, tpr = roc_curve(probs[:, c], positive)
            ax.plot(fpr, tpr, label=f"{name} (AUC {aucs[c]:.3f})")
    ax.plot([0, 1], [0, 1], ":", color="grey")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title("one-vs-rest ROC")
    ax.legend(loc="lower right", fontsize=8)
    return _save(fig, path)


def reliability(bins: dict, ece: float, path: Path) -> Path:
    """Accuracy vs confidence per bin, with bin counts; the diagonal is perfect calibration."""
    plt = _pyplot()
    edges = np.asarray(bins["edges"], dtype=np.float64)
    acc = np.array([np.nan if a is None else a for a in bins["accuracy"]], dtype=np.float64)
    centers = (edges[:-1] + edges[1:]) / 2
    fig, ax = plt.subplots(figsize=(5, 4.5))
    width = edges[1] - edges[0]
    ax.bar(centers, np.nan_to_num(acc), width=width * 0.9, edgecolor="black", alpha=0.7, label="accuracy")
    ax.plot([0, 1], [0, 1], ":", color="grey", label="perfect calibration")
    ax.set_xlabel("confidence (max softmax)")
    ax.set_ylabel("accuracy")
    ax.set_title(f"reliability (ECE {ece:.3f})")
    ax.legend(loc="upper left")
    return _save(fig, path)


def audit_perturbations(perturbations: dict, baseline: dict | None, path: Path, title: str = "") -> Path:
    """Accuracy (and benign-vs-malignant accuracy) per perturbation with 95 % CI error bars.

    ``perturbations`` is ``audit.run_audit(...)["perturbations"]`` (JSON-ready);
    the colour-only baseline's accuracy is drawn as a reference line: bars near
    or below it mean the model does no better than colour statistics.
    """
    plt = _pyplot()
    names = list(perturbations)
    has_bvm = all("benign_vs_malignant_accuracy" in perturbations[n] for n in names)
    keys = ["accuracy"] + (["benign_vs_malignant_accuracy"] if has_bvm else [])
    fig, ax = plt.subplots(figsize=(8, 0.42 * len(names) * len(keys) + 1.8))
    height = 0.8 / len(keys)
    ypos = np.arange(len(names))
    for k, key in enumerate(keys):
        vals = np.array([perturbations[n][key]["value"] for n in names])
        err = np.array([[v - perturbations[n][key]["low"], perturbations[n][key]["high"] - v]
                        for n, v in zip(names, vals)]).T
        ax.barh(ypos + (k - (len(keys) - 1) / 2) * height, vals, height=height * 0.95, xerr=err, capsize=2,
                label=key.replace("_", " "), alpha=0.8)
    if baseline:
        styles = {"histogram": ("crimson", "--"), "mean_std": ("darkorange", ":")}
        for kind, entry in baseline.items():
            if isinstance(entry, dict) and "accuracy" in entry and kind in styles:
                colour, style = styles[kind]
                ax.axvline(entry["accuracy"]["value"], color=colour, linestyle=style,
                           label=f"colour-only baseline ({kind}) {entry['accuracy']['value']:.2f}")
    ax.set_yticks(ypos, names)
    ax.invert_yaxis()
    ax.set_xlim(0, 1.02)
    ax.set_xlabel("accuracy (95 % bootstrap CI)")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.6 / fig.get_figheight()), ncol=2, fontsize=8)
    ax.set_title(title or "accuracy under perturbations that keep morphology")
    return _save(fig, path)


def audit_panel(examples: Sequence[dict], path: Path, title: str = "", ncols: int = 6) -> Path:
    """Grid of images with their heatmap overlaid and the white-cell mask outlined.

    Each example: ``image`` uint8 HxWx3, ``heatmap`` HxW in [0, 1] or None,
    ``mask`` bool HxW or None, ``title`` str, ``wrong`` bool (title in red).
    Also the evaluation's error gallery (no heatmap, no mask).
    """
    plt = _pyplot()
    n = max(len(examples), 1)
    ncols = min(ncols, n)
    nrows = int(np.ceil(n / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(2.3 * ncols, 2.6 * nrows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, ex in zip(axes.ravel(), examples):
        ax.imshow(ex["image"])
        if ex.get("heatmap") is not None:
            ax.imshow(ex["heatmap"], cmap="jet", alpha=0.4, vmin=0.0, vmax=1.0, interpolation="bilinear")
        mask = np.asarray(ex["mask"] if ex.get("mask") is not None else 0.0, dtype=float)
        if mask.ndim == 2 and 0 < mask.mean() < 1:
            ax.contour(mask, levels=[0.5], colors="white", linewidths=1.0)
        ax.set_title(ex["title"], fontsize=7, color="red" if ex.get("wrong") else "black")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, path)
