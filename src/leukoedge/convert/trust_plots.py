"""The bundle's reliability diagram (``reliability.png``): float and converted, before and after temperature.

Why a figure in the bundle: an ECE of 0.02 hides where the miscalibration
sits (a few confident errors or a general over-confidence); the diagram
shows it, next to the model it describes. Drawn from the reliability tables
of ``trust.json`` only (plain lists), so it can be redrawn without
TensorFlow. Same look as :func:`leukoedge.train.plots.reliability` (bars of
accuracy per confidence bin, the diagonal dotted), plus the mean confidence
per bin and the image count (at the foot of each bar), because test splits of a few hundred images
leave most bins nearly empty.

What can fail: :class:`ConversionError` when the report has no reliability
table; matplotlib missing raises ImportError (it is in the ``train`` extra,
which ``convert`` needs anyway for TensorFlow).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import ConversionError
from ..files import atomic_path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _array(values) -> np.ndarray:
    return np.array([np.nan if v is None else v for v in values], dtype=np.float64)


def _panel(ax, table: dict, title: str) -> None:
    edges = np.asarray(table["edges"], dtype=np.float64)
    centers = (edges[:-1] + edges[1:]) / 2
    width = edges[1] - edges[0]
    acc, conf = _array(table["accuracy"]), _array(table["confidence"])
    counts = np.asarray(table["counts"])
    ax.bar(centers, np.nan_to_num(acc), width=width * 0.9, edgecolor="black", alpha=0.7, label="accuracy")
    filled = counts > 0
    ax.plot(conf[filled], acc[filled], "o", color="tab:red", markersize=4, label="(mean confidence, accuracy) per bin")
    for x, n in zip(centers[filled], counts[filled]):
        ax.annotate(str(int(n)), (x, 0.02), ha="center", fontsize=6, color="black")  # images in the bin
    ax.plot([0, 1], [0, 1], ":", color="grey", label="perfect calibration")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("confidence (max probability)")
    ax.set_ylabel("accuracy")
    ax.set_title(f"{title} (ECE {table['ece']:.4f})", fontsize=9)
    ax.grid(alpha=0.3)


def reliability_figure(report: dict, path: Path, converted_name: str) -> Path:
    """Write the reliability diagram of a :func:`leukoedge.convert.trust.build` report to ``path``.

    One row per model (float Keras first when the report has it, then the
    converted model), columns "before" and "after" temperature; the ECE and
    the temperature are in the titles. Written atomically.
    """
    rows = []
    if report.get("reliability_test_float"):
        rows.append(("float", report["calibration_float"], report["reliability_test_float"]))
    if not report.get("reliability_test"):
        raise ConversionError("the trust report has no reliability table to draw")
    rows.append((converted_name, report["calibration"], report["reliability_test"]))
    plt = _pyplot()
    fig, axes = plt.subplots(len(rows), 2, figsize=(9, 4.2 * len(rows)), squeeze=False)
    for (name, cal, tables), row in zip(rows, axes):
        n = cal.get("n_test", sum(tables["before"]["counts"]))
        _panel(row[0], tables["before"], f"{name}, before (test, n={n})")
        _panel(row[1], tables["after"], f"{name}, after T={cal['temperature']:.3f}")
    axes[0][0].legend(loc="center left", fontsize=7)
    fig.suptitle("Reliability on the test split (temperature chosen on validation)", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    finally:
        plt.close(fig)
    return path
