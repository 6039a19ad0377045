"""``leukoedge eval RUN_DIR --audit``: the shortcut audit of a trained run, end to end.

Issue 7 found that on Taleqani a colour histogram alone nearly matches the CNN
and that the CNN collapses on grayscale or colour-normalised copies: a high
accuracy can come from the slide and the capture, not the cells. This module
runs the numpy building blocks of :mod:`.audit` on a run directory:

1. images of the TRAIN split and of the audited split through the one
   preprocessing path, with ``spec.geometry_only()``: perturbations act on the
   raw resized pixels, and ``predict_fn`` then applies the run's colour step
   (``preprocess.apply_colour``) as the device would before the model;
2. a colour-only baseline fitted on train, evaluated on the split;
3. accuracy, agreement with the clean predictions and benign-vs-malignant
   accuracy under every perturbation of :data:`.audit.PERTURBATIONS`, with 95 %
   bootstrap intervals;
4. the class activation map of the predicted class (``features`` x the dense
   kernel, ReLU, bilinear upsampling, as the device draws it) and the fraction
   of its mass on the white-cell mask, against the mask's area (the chance level);
5. ``RUN_DIR/audit.json`` and ``plots/audit_panel.png`` / ``plots/audit_perturbations.png``.

TensorFlow/Keras is imported inside the functions that need it, so the card
can import :func:`load_audit` and :func:`readings` cheaply.

What can fail: :class:`RunError` (incomplete run directory), :class:`DatasetError`
(missing or unreadable images, empty split), :class:`UsageError` (unknown split
or perturbation, too few bootstrap resamples).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image
from tqdm import tqdm

from .. import RESEARCH_NOTICE
from ..data.records import SPLITS
from ..errors import RunError, UsageError
from ..files import sha256_file, write_json
from ..preprocess import COLOUR_STEPS, PreprocessSpec, apply_colour
from . import audit as A
from .cells import white_cell_masks_of
from .dataset import ImageCache, load_split
from .rundir import RunDir, read_json

AUDIT_JSON = "audit.json"
PANEL_PNG = "audit_panel.png"
PERTURBATIONS_PNG = "audit_perturbations.png"
#: Examples per class in the panel (errors first, when there are any).
PANEL_PER_CLASS = 3
SEED = 0

#: What each figure in audit.json means (copied into the file so it explains itself).
MEANINGS = {
    "clean_accuracy": "accuracy of the Keras model on the unchanged split (run's colour step applied), 95 % bootstrap CI",
    "colour_baseline": "multinomial logistic regression on colour statistics only (histograms of RGB and HSV + "
                       "channel mean/std, or mean/std alone), fitted on the train split's as-captured pixels and "
                       "tested on this split: it sees no shape, so what it reaches is reachable without the cells",
    "perturbations": "accuracy, agreement with the clean predictions and (Benign + >= 2 malignant classes) "
                     "benign-vs-malignant accuracy after each change; every change keeps the morphology, so a "
                     "model that reads the cells should hardly move. The background_* rows also make images "
                     "unlike any training image (a flat field), so part of their drop is plain distribution shift",
    "heatmap.mass_on_cells": "per image, the fraction of the positive class-activation-map mass (predicted class) "
                             "inside the white-cell mask; mean with 95 % CI",
    "heatmap.chance": "the mask's area fraction: what a heatmap spread uniformly over the image would score",
    "heatmap.excess_over_chance": "mean per-image difference mass_on_cells - mask area; > 0 with a CI above 0 means "
                                  "the evidence concentrates on the white cells",
    "majority_class_rate": "accuracy of always answering the split's most frequent class",
}


def audit_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / AUDIT_JSON


def load_run_model(run_dir: str | Path):
    """The run's best Keras model (``model.keras``); RunError if missing or unreadable."""
    import keras

    from .. import models  # noqa: F401  (registers custom layers for loading)

    rd = RunDir(run_dir)
    rd.require(rd.model_path)
    try:
        return keras.models.load_model(rd.model_path, compile=False)
    except (OSError, ValueError, TypeError) as err:
        raise RunError(f"{rd.model_path}: cannot load the Keras model ({err})") from None


def make_predict_fn(model, spec: PreprocessSpec, batch_size: int = 64) -> Callable[[np.ndarray], np.ndarray]:
    """``fn(uint8 (N,H,W,3) raw resized pixels) -> (N,K) probabilities`` with the run's colour step first.

    The colour step runs per image, exactly as ``preprocess.load_image`` would
    have run it, so a run trained on grayscale or stain-normalised input is
    audited as the device runs it (its own grayscale row then equals clean).
    """

    def predict_fn(batch: np.ndarray) -> np.ndarray:
        x = np.stack([apply_colour(np.ascontiguousarray(im), spec) for im in batch]).astype(np.float32)
        out = [np.asarray(model(x[i:i + batch_size], training=False)) for i in range(0, len(x), batch_size)]
        return np.concatenate(out).astype(np.float64)

    return predict_fn


# --- class activation maps ----------------------------------------------------------------------


def _producer(layer):
    inputs = layer.input
    if isinstance(inputs, (list, tuple)):
        return None
    history = getattr(inputs, "_keras_history", None)
    return history[0] if history else None


def cam_kernel(model) -> tuple[np.ndarray | None, str]:
    """``(dense kernel channels x classes, "")`` when the head is features -> GAP -> [Dropout] -> Dense(softmax).

    Mirrors ``convert.export.cam_weights`` (the bundle's CAM weights, which the
    device uses); it is repeated here because ``train`` must not import ``convert``.
    Otherwise ``(None, reason)``: the audit then reports no heatmap figure.
    """
    import keras

    names = {layer.name for layer in model.layers}
    if "features" not in names or "probabilities" not in names:
        return None, "the model has no 'features' and 'probabilities' layers"
    dense = model.get_layer("probabilities")
    if not isinstance(dense, keras.layers.Dense) or getattr(dense.activation, "__name__", "") != "softmax":
        return None, "the 'probabilities' layer is not a softmax Dense layer"
    layer = _producer(dense)
    while isinstance(layer, keras.layers.Dropout):
        layer = _producer(layer)
    if not isinstance(layer, keras.layers.GlobalAveragePooling2D) or _producer(layer) is not model.get_layer("features"):
        return None, "the head is not features -> global average pooling -> dense, so a CAM is not defined"
    kernel = np.asarray(dense.get_weights()[0], dtype=np.float32)
    if kernel.ndim != 2:
        return None, f"the dense kernel has shape {kernel.shape}"
    return kernel, ""


def class_activation_maps(model, kernel: np.ndarray, images: np.ndarray, batch_size: int = 64
                          ) -> tuple[np.ndarray, np.ndarray]:
    """``(probabilities (N,K), CAMs (N,H,W) float32 >= 0)`` of the predicted class, upsampled to the image size.

    ``images`` are model input (colour step already applied). CAM = ReLU of the
    ``features`` map times the dense kernel column of the predicted class,
    upsampled bilinearly (Pillow, as ``runtime.heatmap.normalise_map``), ReLU again.
    """
    import keras

    inputs = model.inputs[0] if len(model.inputs) == 1 else model.inputs
    both = keras.Model(inputs, [model.get_layer("features").output, model.get_layer("probabilities").output])
    n, height, width = images.shape[:3]
    probs = np.empty((n, kernel.shape[1]), dtype=np.float64)
    cams = np.empty((n, height, width), dtype=np.float32)
    for i in tqdm(range(0, n, batch_size), desc="heatmaps", unit="batch", leave=False):
        feats, p = both(images[i:i + batch_size].astype(np.float32), training=False)
        feats, p = np.asarray(feats, dtype=np.float32), np.asarray(p, dtype=np.float64)
        probs[i:i + len(p)] = p
        small = np.maximum(np.einsum("nhwc,cn->nhw", feats, kernel[:, p.argmax(axis=1)]), 0.0)
        for j, cam in enumerate(small):
            up = Image.fromarray(np.ascontiguousarray(cam, dtype=np.float32))
            cams[i + j] = np.maximum(np.asarray(up.resize((width, height), Image.Resampling.BILINEAR)), 0.0)
    return probs, cams


def heatmap_report(cams: np.ndarray, masks: np.ndarray, n_boot: int) -> dict:
    """Mass on cells vs the mask area (chance), with intervals; all-zero heatmaps are counted and left out."""
    mass = np.array([A.heatmap_mass_on_cells(c, m) for c, m in zip(cams, masks)])
    area = masks.reshape(len(masks), -1).mean(axis=1)
    ok = np.isfinite(mass)
    out = {"method": "cam", "layer": "features", "n_images": int(len(mass)), "n_zero_heatmaps": int((~ok).sum()),
           "chance": A.bootstrap_ci(area, n_boot, seed=SEED)}
    if ok.any():
        out["mass_on_cells"] = A.bootstrap_ci(mass[ok], n_boot, seed=SEED)
        out["excess_over_chance"] = A.bootstrap_ci(mass[ok] - area[ok], n_boot, seed=SEED)
    else:
        out["mass_on_cells"] = out["excess_over_chance"] = None
    return out


# --- the run -------------------------------------------------------------------------------------------


#: Perturbations that test a trait of one dataset only: Taleqani's burnt-in scale-bar label (bottom right).
LABEL_CORNER_CHECKS = ("label_corner_covered", "control_corner_covered")


def default_perturbations(layout: str) -> list[str]:
    """Every perturbation, minus the scale-bar label checks on data that have no such label (issue 14)."""
    from .card import TALEQANI_LAYOUTS

    return [n for n in A.PERTURBATIONS if layout in TALEQANI_LAYOUTS or n not in LABEL_CORNER_CHECKS]


def audit_run(run_dir: str | Path, split: str = "test", *, n_boot: int = 1000,
              perturbations: Sequence[str] | None = None, panel: bool = True,
              cache: ImageCache | None = None, model=None, batch_size: int = 64) -> dict:
    """Audit ``run_dir``'s best model on ``split``; writes ``audit.json`` and the plots; returns the audit dict."""
    if split not in SPLITS:
        raise UsageError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    if n_boot < 100:
        raise UsageError("the audit needs at least 100 bootstrap resamples for a 95 % interval")
    rd = RunDir(run_dir)
    rd.require(rd.config_path, rd.manifest_path, rd.model_path)
    config, manifest = rd.config(), rd.manifest()
    names = list(perturbations) if perturbations is not None else default_perturbations(manifest.layout)
    for name in names:
        A.get_perturbation(name)
    model = model if model is not None else load_run_model(rd.path)
    spec = config.preprocess_spec
    raw_spec = spec.geometry_only()
    cache = cache or ImageCache()
    root = config.data_root or manifest.root
    classes = list(config.classes)

    train_x, train_y, _ = load_split(manifest, "train", raw_spec, cache, root)
    x, y, entries = load_split(manifest, split, raw_spec, cache, root)
    baseline = A.colour_baseline_report(list(train_x), train_y, list(x), y, classes, n_boot=n_boot)
    predict_fn = make_predict_fn(model, spec, batch_size)
    result = A.run_audit(predict_fn, list(x), y, classes, np.random.default_rng(SEED), names,
                         n_boot=n_boot, batch_size=batch_size)

    masks = white_cell_masks_of(x)
    model_input = np.stack([apply_colour(im, spec) for im in x])
    probs, cams, heatmap = _heatmaps(model, model_input, masks, n_boot, batch_size)
    plots_written = _write_plots(rd, result["perturbations"], baseline,
                                 panel_examples(model_input, y, probs, cams, masks, classes, entries) if panel else None,
                                 f"{config.model} on {split} ({manifest.split_kind} split, n={len(y)})")

    report = {
        "notice": RESEARCH_NOTICE,
        "model": config.model,
        "model_sha256": sha256_file(rd.model_path),
        "split": split,
        "split_kind": manifest.split_kind,
        "leaky": manifest.leaky,
        "n_images": int(len(y)),
        "n_train_images": int(len(train_y)),
        "classes": classes,
        "input_size": [spec.height, spec.width],
        "colour_step": spec.colour,
        "colour_step_description": COLOUR_STEPS[spec.colour],
        "majority_class_rate": float(np.bincount(y, minlength=len(classes)).max() / len(y)),
        "clean_accuracy": result["perturbations"]["clean"]["accuracy"],
        "colour_baseline": {**baseline, "fitted_on": "train", "pixels": "as-captured (before the run's colour step)"},
        "perturbations": result["perturbations"],
        "heatmap": heatmap,
        "bootstrap": {"resamples": n_boot, "level": 0.95, "seed": SEED},
        "plots": plots_written,
        "meaning": MEANINGS,
    }
    report["readings"] = readings(report)
    write_json(audit_path(rd.path), report)
    return report


def _heatmaps(model, model_input: np.ndarray, masks: np.ndarray, n_boot: int, batch_size: int
              ) -> tuple[np.ndarray, np.ndarray | None, dict]:
    """``(probabilities, CAMs or None, heatmap report)``; without a CAM-able head the report says why."""
    kernel, reason = cam_kernel(model)
    if kernel is None:
        probs = np.concatenate([np.asarray(model(model_input[i:i + batch_size].astype(np.float32), training=False))
                                for i in range(0, len(model_input), batch_size)])
        chance = A.bootstrap_ci(masks.reshape(len(masks), -1).mean(axis=1), n_boot, seed=SEED)
        return probs, None, {"method": None, "skipped": reason, "chance": chance}
    probs, cams = class_activation_maps(model, kernel, model_input, batch_size)
    return probs, cams, heatmap_report(cams, masks, n_boot)


def _write_plots(rd: RunDir, perturbations: dict, baseline: dict, examples: list[dict] | None, what: str) -> dict:
    """The two PNGs; returns their paths relative to the run directory (the card links them)."""
    from . import plots

    out = {"perturbations": plots.audit_perturbations(perturbations, baseline, rd.plots_dir / PERTURBATIONS_PNG,
                                                      title=f"shortcut audit: {what}")}
    if examples is not None:
        out["panel"] = plots.audit_panel(examples, rd.plots_dir / PANEL_PNG,
                                         title=f"{what}: CAM of the predicted class (white line: white-cell mask)")
    return {k: str(Path(v).relative_to(rd.path)) for k, v in out.items()}


def panel_examples(images: np.ndarray, y: np.ndarray, probs: np.ndarray, cams: np.ndarray | None,
                   masks: np.ndarray, classes: Sequence[str], entries, per_class: int = PANEL_PER_CLASS) -> list[dict]:
    """A deterministic choice: per class, its first misclassified image (if any) then evenly spaced correct ones."""
    pred = probs.argmax(axis=1)
    chosen: list[int] = []
    for c in range(len(classes)):
        idx = np.flatnonzero(y == c)
        if not idx.size:
            continue
        wrong, right = idx[pred[idx] != c], idx[pred[idx] == c]
        pick = list(wrong[:1])
        k = min(per_class - len(pick), right.size)
        if k > 0:
            pick += list(right[np.linspace(0, right.size - 1, k).round().astype(int)])
        if len(pick) < per_class:
            pick += [i for i in wrong[1:per_class - len(pick) + 1]]
        chosen += sorted(int(i) for i in pick)
    out = []
    for i in chosen:
        heat = None
        if cams is not None:
            peak = float(cams[i].max())
            heat = cams[i] / peak if peak > 0 else np.zeros_like(cams[i])
        out.append({"image": images[i], "heatmap": heat, "mask": masks[i], "wrong": bool(pred[i] != y[i]),
                    "title": f"true {classes[y[i]]} / pred {classes[pred[i]]}\n"
                             f"conf {probs[i, pred[i]]:.2f}  {Path(entries[i].path).name}"})
    return out


def load_audit(run_dir: str | Path) -> dict | None:
    """``audit.json`` if present, with ``stale`` = True when ``model.keras`` changed since the audit."""
    rd = RunDir(run_dir)
    path = audit_path(rd.path)
    if not path.exists():
        return None
    data = read_json(path)
    data["stale"] = bool(rd.model_path.exists() and data.get("model_sha256") != sha256_file(rd.model_path))
    return data


# --- reading the numbers --------------------------------------------------------------------------------


def _pct(x: float) -> str:
    return f"{100 * x:.1f} %"


def _worse(p: dict, clean: dict) -> bool:
    """The perturbed interval lies entirely below the clean one."""
    return p["high"] < clean["low"]


def _verdict(entry: dict, key: str, clean: dict) -> str:
    """``drop`` / ``no meaningful drop`` / ``inconclusive`` from the paired test; older audits: marginal intervals."""
    change = entry.get(key)
    if change and "verdict" in change:
        return change["verdict"]
    return "drop" if _worse(entry["accuracy"], clean) else "no meaningful drop"


def _paired_figures(change: dict | None) -> str:
    if not change:
        return "intervals apart"
    return (f"{change['lost']} images lost, {change['gained']} gained; paired test p = {change['p_value']:.2g}, "
            f"drop {100 * change['low']:.1f} to {100 * change['high']:.1f} points at 95 %")


def _label_reading(perts: dict, clean: dict, colour_step: str = "as-captured") -> list[str]:
    """Label corner against the control corner: does the model read the burnt-in scale-bar label?"""
    if "label_corner_covered" not in perts or "control_corner_covered" not in perts:
        return []
    label, control = perts["label_corner_covered"]["accuracy"], perts["control_corner_covered"]["accuracy"]
    figures = (f"covering the bottom-right corner (scale-bar label) gives {_pct(label['value'])}, the same area "
               f"bottom-left {_pct(control['value'])} (clean {_pct(clean['value'])})")
    change = perts["label_corner_covered"].get("change_vs_control")
    verdict = change["verdict"] if change and "verdict" in change else (
        "drop" if label["high"] < control["low"] else "no meaningful drop")
    if verdict == "inconclusive" and change["drop"] >= change.get("negligible", 0.05):
        return [f"Use of the scale-bar label is inconclusive at n = {change['n']}: {figures}; "
                f"{_paired_figures(change)}."]
    if verdict == "inconclusive":
        return [f"No detectable use of the scale-bar label: {figures}; at n = {change['n']} a cost of up to "
                f"{100 * change['high']:.1f} points cannot be ruled out."]
    if verdict == "drop":
        how = (f" The run's per-image colour step ({colour_step}) estimates its statistics from every pixel, the "
               "label's included, so covering the label also changes how the whole field is normalised."
               if colour_step in ("reinhard", "macenko") else "")
        return [f"Reads the scale-bar label: {figures}; the label corner costs more than the control "
                f"({_paired_figures(change)}).{how}"]
    return [f"No detectable use of the scale-bar label: {figures}."]


def readings(audit: dict) -> list[str]:
    """Plain-language statements computed from the audit's numbers (nothing here is hard-coded)."""
    out = []
    clean = audit["clean_accuracy"]
    a = clean["value"]
    chance = audit.get("majority_class_rate", 0.0)
    base_kind, base = max(((k, v["accuracy"]) for k, v in audit["colour_baseline"].items()
                           if isinstance(v, dict) and "accuracy" in v), key=lambda kv: kv[1]["value"])
    b = base["value"]
    if b >= a - 0.05 or base["high"] >= clean["low"]:
        out.append(f"Colour alone ({base_kind} features, no shape) reaches {_pct(b)} against the CNN's {_pct(a)}: "
                   "high accuracy on this split proves little about reading the cells.")
    elif b - chance >= 0.5 * (a - chance):
        out.append(f"Colour alone reaches {_pct(b)} (CNN {_pct(a)}, majority class {_pct(chance)}): a large part "
                   "of the score is reachable without seeing any cell.")
    else:
        out.append(f"Colour alone reaches only {_pct(b)} (CNN {_pct(a)}, majority class {_pct(chance)}): colour "
                   "statistics do not explain the CNN's score.")
    perts = audit["perturbations"]
    for name, what in (("grayscale", "colour"), ("colour_normalised", "the slide's colour statistics"),
                       ("background_flattened", "the background's texture and red cells (its tint is kept)"),
                       ("background_neutral", "the background outside the white cells, tint included")):
        if name not in perts:
            continue
        p = perts[name]["accuracy"]
        change = perts[name].get("change_vs_clean")
        verdict = _verdict(perts[name], "change_vs_clean", clean)
        if verdict == "drop":
            how = "depends heavily on" if a - p["value"] >= 0.2 else "is sensitive to"
            shift = ("; a flat background never occurs in training, so part of this drop is plain distribution "
                     "shift" if name.startswith("background") else "")
            out.append(f"Under {name} accuracy falls from {_pct(a)} to {_pct(p['value'])} "
                       f"({100 * (a - p['value']):.1f} points; {_paired_figures(change)}): the model {how} "
                       f"{what}{shift}.")
        elif verdict == "no meaningful drop":
            bound = f" (the drop is below {100 * change['high']:.1f} points at 95 %)" if change else ""
            out.append(f"Under {name} accuracy is {_pct(p['value'])} (clean {_pct(a)}): removing {what} "
                       f"causes no meaningful drop{bound}.")
        elif change["drop"] >= change.get("negligible", 0.05):
            out.append(f"Under {name} accuracy is {_pct(p['value'])} (clean {_pct(a)}): inconclusive at "
                       f"n = {change['n']} -- a {100 * change['drop']:.1f}-point drop that {change['n']} images "
                       f"cannot tell from chance ({_paired_figures(change)}); more test images are needed to say "
                       f"whether the model relies on {what}.")
        else:
            out.append(f"Under {name} accuracy is {_pct(p['value'])} (clean {_pct(a)}): no detectable drop from "
                       f"removing {what}, but at n = {change['n']} a drop of up to {100 * change['high']:.1f} "
                       "points cannot be ruled out.")
    out += _label_reading(perts, clean, audit.get("colour_step", "as-captured"))
    if audit.get("colour_step") == "grayscale" and "grayscale" in perts:
        out.append("This run already feeds grayscale to the model, so the grayscale row equals clean by construction.")
    others = {k: v["accuracy"]["value"] for k, v in perts.items() if k != "clean"}
    if others:
        worst = min(others, key=others.get)
        out.append(f"Worst perturbation: {worst} ({_pct(others[worst])}).")
    heat = audit.get("heatmap") or {}
    mass, area, excess = heat.get("mass_on_cells"), heat.get("chance"), heat.get("excess_over_chance")
    if not heat.get("method") or not mass:
        out.append(f"No heatmap figure: {heat.get('skipped', 'every heatmap was zero')}.")
    elif excess["low"] > 0:
        ratio = mass["value"] / max(area["value"], 1e-12)
        where = ("most of it lies on the cells" if mass["value"] >= 0.5
                 else "yet most of it still lies outside the cells")
        out.append(f"The heatmap puts {_pct(mass['value'])} of its mass on white cells that cover "
                   f"{_pct(area['value'])} of the image: {ratio:.1f} x chance, {where}.")
    elif excess["high"] < 0:
        out.append(f"The heatmap puts only {_pct(mass['value'])} of its mass on white cells that cover "
                   f"{_pct(area['value'])} of the image: below chance, the evidence lies mostly outside the cells.")
    else:
        out.append(f"The heatmap puts {_pct(mass['value'])} of its mass on white cells that cover "
                   f"{_pct(area['value'])} of the image: no better than a heatmap spread uniformly.")
    if audit.get("split") == "train":
        out.append("Audited on the training split: the model and the colour baseline were fitted on these images, "
                   "so every accuracy here is optimistic.")
    if audit.get("leaky"):
        out.append("The split is image-level random (LEAKY): every figure here is optimistic.")
    return out


def summary_lines(audit: dict) -> list[str]:
    """Short console summary for ``leukoedge eval --audit``."""
    def ci(d: dict | None) -> str:
        return "n/a" if not d else f"{_pct(d['value'])} [{_pct(d['low'])}, {_pct(d['high'])}]"

    perts = audit["perturbations"]
    base = audit["colour_baseline"]
    lines = [f"shortcut audit on {audit['split']} (n={audit['n_images']}, {audit['split_kind']} split, "
             f"colour step {audit['colour_step']}):",
             f"  clean accuracy            {ci(audit['clean_accuracy'])}",
             f"  colour baseline (hist)    {ci(base['histogram']['accuracy'])}",
             f"  colour baseline (mean/sd) {ci(base['mean_std']['accuracy'])}"]
    for name in ("grayscale", "colour_normalised", "background_flattened", "background_neutral"):
        if name in perts:
            lines.append(f"  {name:<25} {ci(perts[name]['accuracy'])}")
    heat = audit["heatmap"]
    if heat.get("method"):
        lines.append(f"  heatmap mass on cells     {ci(heat.get('mass_on_cells'))} vs chance {ci(heat['chance'])}")
    else:
        lines.append(f"  heatmap: skipped ({heat.get('skipped')})")
    return lines + [f"  - {r}" for r in audit["readings"]]
