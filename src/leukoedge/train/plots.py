"""Report plots as PNG (matplotlib, Agg backend: no display needed).

Each function writes one file atomically (temp + rename) and returns its
path. Inputs are plain numpy/JSON values, so plots can be redrawn from
``history.json`` / ``metrics.json`` without TensorFlow.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from .metrics import roc_curve


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    _pyplot().close(fig)
    tmp.replace(path)
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
