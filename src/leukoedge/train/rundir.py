"""The layout of a training run directory, shared by train, eval and convert.

A run directory is self-describing: everything later stages need (the model,
the exact manifest, the preprocessing spec, the class names, the abstention
threshold) is inside it, so ``eval`` and ``convert`` take only ``RUN_DIR``.
TensorFlow-free: this module only knows paths and JSON.

Layout::

    RUN_DIR/
      config.json        RunConfig: model name, input size, classes, seed, hyper-parameters,
                         augmentation recipe, data root, training scale (um/px), leukoedge/TF versions
      manifest.json      the split manifest used (a copy, so the run survives the original moving)
      model.keras        kept checkpoint (by the run's --select criterion; history.json says which epoch)
      last.keras         last epoch (for --resume)
      state.json         resume state: last completed epoch, best metric, early-stopping counter
      history.json       per-epoch metrics; select, kept_epoch and the kept epoch's val figures
      metrics.json       evaluation (leukoedge eval), per split: metrics_<split>.json
      predictions.csv    every image's answer (path, label, predicted, confidence, probabilities),
                         per split: predictions_<split>.csv
      ood.json           out-of-distribution score name and threshold chosen on validation
      calibration.json   temperature fitted on validation (issue 7), optional
      model_card.md / model_card.json
      plots/             training_curves.png, confusion_matrix.png, roc.png, reliability.png,
                         errors.png (the misclassified images, most confident first; per split errors_<split>.png)

A cross-validation run (``leukoedge train --folds K``, :mod:`.folds`) is a
directory of K ordinary run directories plus what ties them together::

    RUN_DIR/
      cv_config.json     the options every fold trains with (so --resume needs only RUN_DIR)
      folds/             fold-1.json .. fold-K.json + folds.json (as `leukoedge data split --folds` writes)
      fold-1/ .. fold-K/ one run directory per fold, as above (convert or eval any of them)
      cv.json            per-fold test metrics, mean and sd over folds, pooled confusion matrix
      model_card.md / model_card.json   the cross-validation card
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..data.records import Manifest
from ..errors import RunError
from ..files import write_json
from ..preprocess import PreprocessSpec


@dataclass(frozen=True)
class RunConfig:
    """What was trained and how; written once at the start of a run.

    ``scale`` is the training images' pixel size (see :mod:`.training_scale`):
    ``{"um_per_px": float | None, "source": "given" | "measured" | "unknown",
    "source_size": [h, w], "n_images": N, ...}``; empty in runs made before it
    was recorded, which then have no scale (as do their bundles).
    """

    model: str
    input_size: int
    classes: tuple[str, ...]
    seed: int
    epochs: int
    batch_size: int
    learning_rate: float
    augmentation: dict = field(default_factory=dict)
    data_root: str = ""
    extra: dict = field(default_factory=dict)
    colour: str = "as-captured"
    scale: dict = field(default_factory=dict)

    @property
    def preprocess_spec(self) -> PreprocessSpec:
        """The one preprocessing spec of the run, with the training scale when it is known."""
        spec = PreprocessSpec.square(self.input_size, self.colour)
        um = (self.scale or {}).get("um_per_px")
        if um is None:
            return spec
        size = self.scale.get("source_size")
        return spec.with_scale(um, tuple(size) if size else None)

    @property
    def scale_jitter(self) -> float:
        """The run's scale-jitter augmentation (0 = off, and for runs made before it existed)."""
        return float((self.augmentation or {}).get("scale_jitter") or 0.0)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["classes"] = list(self.classes)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "RunConfig":
        try:
            d = dict(d)
            d["classes"] = tuple(d["classes"])
            known = set(cls.__dataclass_fields__)
            return cls(**{k: v for k, v in d.items() if k in known})
        except (KeyError, TypeError) as err:
            raise RunError(f"malformed run config: {err}") from None


class RunDir:
    """Paths and typed readers for one run directory."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    # -- paths -------------------------------------------------------------
    config_path = property(lambda self: self.path / "config.json")
    manifest_path = property(lambda self: self.path / "manifest.json")
    model_path = property(lambda self: self.path / "model.keras")
    last_model_path = property(lambda self: self.path / "last.keras")
    average_path = property(lambda self: self.path / "last_average.npz")
    state_path = property(lambda self: self.path / "state.json")
    history_path = property(lambda self: self.path / "history.json")
    ood_path = property(lambda self: self.path / "ood.json")
    calibration_path = property(lambda self: self.path / "calibration.json")
    model_card_md = property(lambda self: self.path / "model_card.md")
    model_card_json = property(lambda self: self.path / "model_card.json")
    plots_dir = property(lambda self: self.path / "plots")
    cv_path = property(lambda self: self.path / "cv.json")
    cv_config_path = property(lambda self: self.path / "cv_config.json")
    folds_dir = property(lambda self: self.path / "folds")

    def fold_dir(self, k: int) -> Path:
        """Run directory of fold ``k`` (1-based, as the fold manifests are numbered)."""
        return self.path / f"fold-{k}"

    @property
    def is_cv(self) -> bool:
        """A cross-validation run: its folds are the run directories."""
        return self.cv_config_path.exists()

    def metrics_path(self, split: str = "test") -> Path:
        return self.path / ("metrics.json" if split == "test" else f"metrics_{split}.json")

    def predictions_path(self, split: str = "test") -> Path:
        return self.path / ("predictions.csv" if split == "test" else f"predictions_{split}.csv")

    def errors_plot_path(self, split: str = "test") -> Path:
        return self.plots_dir / ("errors.png" if split == "test" else f"errors_{split}.png")

    # -- readers -----------------------------------------------------------
    def require(self, *paths: Path) -> None:
        missing = [p.name for p in paths if not p.exists()]
        if missing and self.is_cv:
            raise RunError(f"{self.path} is a cross-validation run: each fold is a run directory",
                           hint=f"use {self.fold_dir(1)} (or another fold); cv.json and model_card.md summarise them")
        if missing:
            raise RunError(
                f"{self.path} is not a complete run directory: missing {', '.join(missing)}",
                hint="train one with `leukoedge train --data DIR --model NAME --out RUN_DIR`",
            )

    def config(self) -> RunConfig:
        self.require(self.config_path)
        return RunConfig.from_dict(read_json(self.config_path))

    def manifest(self) -> Manifest:
        self.require(self.manifest_path)
        return Manifest.load(self.manifest_path)

    def read(self, path: Path, default=None):
        return read_json(path) if path.exists() else default

    def write(self, path: Path, data) -> Path:
        return write_json(path, data)


def read_json(path: Path):
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as err:
        raise RunError(f"{path}: not valid JSON ({err})") from None
