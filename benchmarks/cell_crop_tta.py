"""Cell-centred crops at test time: does classifying crops around the white cells help? (issue 7)

The ``cells`` training recipe shows the net crops centred on white cells. The
obvious next step would be a device that classifies a field by its cells: find
the white cells, classify a crop around each of the largest, and average. This
script measures that before anyone builds it, on trained run directories
(the Taleqani capture-block test split, float Keras model):

- ``field``: the whole field, as the device classifies today;
- ``crops``: the mean probability over crops centred on the K largest
  white-cell components (side = ``--side`` x the field), scaled to the input size;
- ``field + crops``: the mean of the two.

Fields without a detected white cell fall back to the field. Needs TensorFlow
and the run directories (see robustness.py for how they are trained).

    python benchmarks/cell_crop_tta.py /work/runs/robust-leuko-small-cells /work/runs/robust-leuko-small-consistency-48ep
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from _common import main_guard, write_results


def cell_crops(image: np.ndarray, k: int, side: float) -> list[np.ndarray]:
    """Up to ``k`` square crops centred on the largest white-cell components, resized to the image size."""
    from PIL import Image

    from leukoedge.train.cells import label_components, white_cell_mask

    labels, n = label_components(white_cell_mask(image))
    if n == 0:
        return []
    h, w = image.shape[:2]
    s = int(round(side * min(h, w)))
    areas = np.bincount(labels.ravel())[1:]
    out = []
    for comp in np.argsort(-areas)[:k]:
        rows, cols = np.nonzero(labels == comp + 1)
        y0 = int(np.clip(rows.mean() - s / 2, 0, h - s))
        x0 = int(np.clip(cols.mean() - s / 2, 0, w - s))
        crop = Image.fromarray(image[y0:y0 + s, x0:x0 + s]).resize((w, h), Image.Resampling.BILINEAR)
        out.append(np.asarray(crop))
    return out


def evaluate(run: Path, k: int, side: float) -> dict:
    import keras

    from leukoedge.preprocess import apply_colour
    from leukoedge.train.dataset import ImageCache, load_split
    from leukoedge.train.metrics import accuracy
    from leukoedge.train.rundir import RunDir

    rd = RunDir(run)
    config, manifest = rd.config(), rd.manifest()
    spec = config.preprocess_spec
    raw, y, _ = load_split(manifest, "test", spec.geometry_only(), ImageCache(), config.data_root or manifest.root)
    model = keras.models.load_model(rd.model_path, compile=False)

    def predict(images: list[np.ndarray]) -> np.ndarray:
        batch = np.stack([apply_colour(im, spec) for im in images]).astype("float32")
        return np.asarray(model.predict(batch, verbose=0))

    field = predict(list(raw))
    crops = field.copy()
    n_with_cells = 0
    for i, image in enumerate(raw):
        found = cell_crops(image, k, side)
        if found:
            crops[i] = predict(found).mean(axis=0)
            n_with_cells += 1
    both = (field + crops) / 2
    return {"run": run.name, "recipe": config.augmentation.get("recipe"), "n": len(y), "n_with_cells": n_with_cells,
            "field": accuracy(y, field.argmax(1)), "crops": accuracy(y, crops.argmax(1)),
            "field_plus_crops": accuracy(y, both.argmax(1))}


def markdown(rows: list[dict], k: int, side: float) -> str:
    lines = ["Research use only; not a diagnostic device.", "",
             f"Capture-block test split; float Keras models; crops: the {k} largest white-cell components, square side "
             f"{side:g} x the field, scaled to the input size. Fields without a detected white cell use the field.", "",
             "| run | augmentation recipe | test images (with cells) | field | crops | field + crops |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['run']} | {r['recipe']} | {r['n']} ({r['n_with_cells']}) | {r['field']:.1%} | "
                     f"{r['crops']:.1%} | {r['field_plus_crops']:.1%} |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", type=Path, help="trained run directories")
    p.add_argument("--k", type=int, default=4, help="crops per field (default 4)")
    p.add_argument("--side", type=float, default=0.55, help="crop side as a fraction of the field (default 0.55)")
    args = p.parse_args()
    missing = [str(r) for r in args.runs if not (r / "model.keras").exists()]
    if missing:
        print(f"not trained run directories: {', '.join(missing)}", file=sys.stderr)
        return 1
    rows = [evaluate(run, args.k, args.side) for run in args.runs]
    write_results("cell_crop_tta", {"rows": rows, "k": args.k, "side": args.side}, markdown(rows, args.k, args.side),
                  "Cell-centred crops at test time (Taleqani, block split)")
    return 0


if __name__ == "__main__":
    main_guard(main)
