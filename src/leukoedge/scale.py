"""The microscope's pixel size, measured from the red cells in a field.

Why: a model sees cells at the size its training images showed them, and a
camera behind another objective, adapter or sensor shows them at another size
(issue 15). Red cells are the ruler every blood smear carries: about 7.5 um
across (:data:`RBC_UM`; 7-8 um in life, ``--rbc-um`` where a lab knows better),
dozens per field, round. So ``um/px = RBC_UM / (red-cell diameter in px)``,
the diameter measured by :mod:`leukoedge.rbc` (how, and how well, is said there
and in ``benchmarks/results/scale_estimator.md``: median error 3.9 % on the 349
BCCD fields against their boxes, 4.3 % on the half not used to fit the outline
factor; 1.8-3.5 % on 200 Taleqani fields zoomed 0.5-2x).

numpy + Pillow only: the Raspberry Pi runs it on every capture without a
calibration (``Classifier.classify``), the app's Scale page calibrates with it,
``train`` records the training images' scale with :func:`estimate_dataset`, and
``leukoedge data scale`` reports it for a folder.

Fields without red cells (blank, black, noise, a white cell filling the frame,
a stage micrometer) raise :class:`~leukoedge.errors.ScaleError` with a hint to
calibrate or type the scale; nothing here raises anything else on an array of
odd size or content (a non-image array is an
:class:`~leukoedge.errors.InvalidImageError`).
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import rbc
from .errors import LeukoEdgeError, ScaleError
from .rbc import OUTLINE_FACTOR

__all__ = [
    "OUTLINE_FACTOR",
    "RBC_UM",
    "DatasetScale",
    "ScaleEstimate",
    "check_rbc_um",
    "estimate_dataset",
    "estimate_scale",
    "measure_rbc_diameter",
]

#: Default red-cell diameter in micrometres (``--rbc-um`` overrides).
RBC_UM = 7.5
#: The red-cell diameters accepted (um): anything outside is a typo, not a blood smear.
RBC_UM_RANGE = (3.0, 15.0)


@dataclass(frozen=True)
class ScaleEstimate:
    """The pixel size of one measured array.

    Attributes:
        um_per_px: micrometres per pixel of the array as given (not of any resized copy).
        rbc_diameter_px: the red cells' outline diameter in those pixels (consensus of ``n_cells``).
        n_cells: red cells that agreed on it.
        spread: interquartile range / median of their diameters (0.1-0.3 in these fields).
        rbc_um: the red-cell diameter in micrometres assumed for the conversion.
    """

    um_per_px: float
    rbc_diameter_px: float
    n_cells: int
    spread: float
    rbc_um: float

    def to_dict(self) -> dict:
        return {"um_per_px": self.um_per_px, "rbc_diameter_px": self.rbc_diameter_px,
                "n_cells": self.n_cells, "spread": self.spread, "rbc_um": self.rbc_um}


def check_rbc_um(value, error: type[LeukoEdgeError] = ScaleError) -> float:
    """``value`` as a red-cell diameter in um within :data:`RBC_UM_RANGE`, else ``error`` (the CLI: UsageError)."""
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise error(f"the red-cell diameter must be a number of micrometres, got {value!r}") from None
    lo, hi = RBC_UM_RANGE
    if not lo <= out <= hi:  # also false for NaN
        raise error(f"a red-cell diameter of {value!r} um makes no sense (expected {lo:g}-{hi:g})",
                    hint=f"human red cells are 7-8 um across; the default is {RBC_UM:g}")
    return out


def measure_rbc_diameter(rgb: np.ndarray) -> tuple[float, int, float]:
    """(red cells' outline diameter in px of ``rgb``, cells that agreed, their IQR/median); ScaleError without red cells."""
    return rbc.measure(rgb)


def estimate_scale(rgb: np.ndarray, rbc_um: float = RBC_UM) -> ScaleEstimate:
    """um per pixel of ``rgb`` (the array as given) from its red cells; :class:`ScaleError` when there are none."""
    rbc_um = check_rbc_um(rbc_um)
    diameter, n, spread = rbc.measure(rgb)
    return ScaleEstimate(um_per_px=rbc_um / diameter, rbc_diameter_px=diameter, n_cells=n,
                         spread=spread, rbc_um=rbc_um)


# ---------------------------------------------------------------- datasets


@dataclass
class DatasetScale:
    """The pixel size of a set of images: the median over the images where it could be measured.

    Attributes:
        um_per_px: median um/px over the measured images (None when none could be measured).
        spread: interquartile range / median of the per-image um/px (None with fewer than 2).
        images: path -> um/px of the image as stored (None where it failed).
        failed: the paths where it failed, in input order.
        n_images: how many images were tried.
        errors: path -> why it failed (for the user).
        rbc_um: the red-cell diameter assumed.
    """

    um_per_px: float | None
    spread: float | None
    images: dict[str, float | None]
    failed: list[str]
    n_images: int
    errors: dict[str, str] = field(default_factory=dict)
    rbc_um: float = RBC_UM

    def to_dict(self) -> dict:
        return {"um_per_px": self.um_per_px, "spread": self.spread, "rbc_um": self.rbc_um,
                "n_images": self.n_images, "n_measured": self.n_images - len(self.failed),
                "images": dict(self.images), "failed": list(self.failed), "errors": dict(self.errors)}

    def to_text(self, root: str | Path | None = None, max_rows: int = 30) -> str:
        """A short table (every image up to ``max_rows``, else percentiles) and a summary, for people.

        Paths are shown relative to ``root`` where they lie below it.
        """
        def name(path: str) -> str:
            if root is not None:
                try:
                    return str(Path(path).relative_to(root)) or Path(path).name
                except ValueError:
                    pass
            return path

        measured = {p: v for p, v in self.images.items() if v is not None}
        lines = []
        if measured and len(measured) <= max_rows:
            width = max(len(name(p)) for p in measured)
            lines += [f"{'image':<{width}}  um/px", *(f"{name(p):<{width}}  {v:.4g}" for p, v in measured.items())]
        elif measured:
            qs = np.percentile(list(measured.values()), [0, 10, 50, 90, 100])
            lines += ["um/px over the images: " + "   ".join(f"{k} {v:.4g}" for k, v in
                                                           zip(("min", "p10", "median", "p90", "max"), qs)),
                      "(--json lists every image)"]
        if self.failed:
            lines += ["", f"failed: {len(self.failed)} image(s)"]
            lines += [f"  {name(p)}: {self.errors.get(p, 'failed')}" for p in self.failed[:20]]
            if len(self.failed) > 20:
                lines.append(f"  ... and {len(self.failed) - 20} more (--json lists all)")
        lines.append("")
        n_ok = self.n_images - len(self.failed)
        if self.um_per_px is None:
            lines.append(f"no scale: red cells were measured in none of the {self.n_images} image(s)")
        else:
            spread = "" if self.spread is None else f", spread (IQR / median) {self.spread:.1%}"
            lines.append(f"pixel size: {self.um_per_px:.4g} um/px (median of {n_ok} of {self.n_images} image(s)"
                         f"{spread}; red cells taken as {self.rbc_um:g} um)")
        return "\n".join(lines)


#: Decode at least this (height, width): JPEG DCT scaling and box reduction keep red cells measurable.
_DECODE_MIN = (1024, 1024)


def _image_scale(path: Path, rbc_um: float) -> float:
    """um per stored pixel of one image file (decoded at reduced size when it is large)."""
    from .decode import open_pending
    from .preprocess import to_rgb

    with open_pending(path, min_size=_DECODE_MIN) as pending:
        img = pending.decode()
        full_width = pending.upright_size[0]
    rgb = to_rgb(img)
    return estimate_scale(rgb, rbc_um).um_per_px * rgb.shape[1] / full_width


def estimate_dataset(paths: Iterable[str | Path], rbc_um: float = RBC_UM, progress: bool = True) -> DatasetScale:
    """:func:`estimate_scale` of every image file; unreadable files and fields without red cells are listed.

    Never raises for one bad file (it goes to ``failed`` with the reason in
    ``errors``); ``um_per_px`` is None when no image could be measured, and the
    caller decides whether that is an error.
    """
    rbc_um = check_rbc_um(rbc_um)
    paths = list(dict.fromkeys(Path(p) for p in paths))  # each file once, in the order given
    iterator = paths
    if progress:
        from tqdm import tqdm

        iterator = tqdm(paths, desc="scale", unit="img", leave=False, disable=None)
    images: dict[str, float | None] = {}
    errors: dict[str, str] = {}
    for path in iterator:
        try:
            images[str(path)] = _image_scale(path, rbc_um)
        except LeukoEdgeError as err:
            images[str(path)] = None
            # decode errors name the file already; the listing does too
            errors[str(path)] = err.message.removeprefix(f"{path}: ")
    values = np.array([v for v in images.values() if v is not None])
    median = float(np.median(values)) if values.size else None
    spread = None
    if values.size >= 2:
        q1, q3 = np.percentile(values, [25, 75])
        spread = float((q3 - q1) / median)
    return DatasetScale(um_per_px=median, spread=spread, images=images, failed=list(errors),
                        n_images=len(paths), errors=errors, rbc_um=rbc_um)
