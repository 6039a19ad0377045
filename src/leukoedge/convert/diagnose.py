"""Why an int8 model flips answers: per-layer error, and which layer kept in float removes the flips.

The parity gate says *that* the converted model classifies differently; this
says *where* (issue 17, item 1). Two measurements, of different strength:

1. **Per-layer error** (TensorFlow's ``QuantizationDebugger``): every quantised
   op runs next to its float twin on the same (quantised) input, so each
   layer's error is its own, not what earlier layers handed it. The ranking
   metric is ``rmse_per_step``: the RMS of (int8 - float) output in units of the
   layer's int8 step (output scale). Pure rounding gives ~0.29; far above 1
   means the layer loses more than rounding: crushed weights or clipped values.
   It is measured on the calibration + validation images, never on test, so the
   ranking does not see the images the gate grades.
2. **Flips explained** (the arbiter): for the :data:`TESTED_LAYERS` worst layers,
   the calibrated model is quantised again with that one layer denylisted (kept
   in float, ``mlir_quantize(denylisted_nodes=...)``, what the debugger itself
   calls) and run through the device runtime (:class:`leukoedge.runtime.Classifier`,
   as the gate does) on the gate's test images: the share of the gate's flips that
   disappear is what the layer explains. A metric is a guess; this is a measurement.

A limit worth knowing (measured while writing this): a tensor whose range one
huge channel sets (per-tensor activation scale) is NOT repaired by any single
layer in float: the next int8 op quantises the same tensor with the same range.
Its ``rmse_per_step`` also stays near rounding (the step is huge, so is the
signal). On the tiny test model with one constant-1000 channel after the first
conv: 30 of 40 flips with any single layer in float, 30 with both convs, 0 only
with conv, pool and conv (every op that reads or writes a tensor of that range).
The diagnosis then says that no single layer explains the flips.

TensorFlow only (``convert/`` may import it). What can fail: :class:`ConversionError`
when the debugger or a re-quantisation fails.
"""
from __future__ import annotations

import csv
import io
import logging
import math
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..bundle import META_NAME, MODEL_NAME, load_bundle, write_manifest
from ..errors import ConversionError
from ..files import atomic_write_bytes, write_json
from . import calibration, export, parity, writer
from .modes import QuantMode

log = logging.getLogger(__name__)

#: How many of the worst layers are each kept in float alone and re-measured
#: (one re-quantisation and one pass over the gate's images each).
TESTED_LAYERS = 5
DIAGNOSIS_NAME = "diagnosis.json"
#: RMS error of uniform rounding, in steps: 1/sqrt(12).
ROUNDING_RMSE_STEPS = 1 / math.sqrt(12)

METRIC = "rmse_per_step"
METRIC_MEANING = (
    "root-mean-square difference between the layer's int8 output and its float output on the same input, "
    f"in int8 steps (the output scale); rounding alone gives about {ROUNDING_RMSE_STEPS:.2f}, and far above 1 "
    "means the layer loses more than rounding explains (weights crushed by an outlier, values clipped)"
)
SHARE_MEANING = "share of the gate's flips (test images whose top-1 answer differs from float) that disappear when this layer alone is kept in float"

_OUTPUT_TENSOR = re.compile(r"^StatefulPartitionedCall(?:_\d+)?:(\d+)$")
_SUFFIX = re.compile(r"^(.*)_\d+$")


@dataclass(frozen=True)
class LayerError:
    """One quantised op's own error (from the debugger), and what keeping it in float changed."""

    tensor: str  # the op's output tensor in the TFLite model: what ``denylisted_nodes`` names
    layer: str  # the Keras layer it came from (best reading of the tensor name)
    op: str
    rmse_per_step: float
    max_error_steps: float
    scale: float
    tested: bool = False
    flips_when_float: int | None = None  # flips of the model with this layer in float
    flips_removed: int | None = None
    flips_added: int | None = None  # images that agreed in full int8 and flip with this layer in float
    share_removed: float | None = None
    still_flipped: list[str] = field(default_factory=list)


def diagnose(
    keras_model,
    export_model,
    mode: QuantMode,
    *,
    calibration_images: np.ndarray,
    error_images: np.ndarray,
    gate_images: np.ndarray,
    gate_paths: list[str],
    float_probs: np.ndarray,
    quant_probs: np.ndarray,
    bundle_dir: Path,
    classes: list[str],
    y_true: np.ndarray,
    k: int | None = TESTED_LAYERS,
) -> dict:
    """The diagnosis of one full-integer conversion, as ``diagnosis.json`` holds it.

    Args:
        calibration_images: the images the bundle was calibrated on (the debugger
            calibrates again on them, so its model is the bundle's).
        error_images: calibration + validation images the per-layer error is measured on.
        gate_images / gate_paths / float_probs / quant_probs / y_true: the gate's test
            images and what the float and converted models answered on them.
        bundle_dir: the provisional bundle; each fallback model runs in a copy of it.
        k: how many of the worst-ranked layers are kept in float one at a time (None: all).
    """
    if not mode.full_integer:
        raise ConversionError(f"--diagnose explains full-integer quantisation; --quantize {mode.name} has none")
    flipped = float_probs.argmax(1) != quant_probs.argmax(1)
    debugger = _debugger(export_model, mode, calibration_images, error_images)
    layers = sorted(_layer_errors(debugger, keras_model, export_model), key=lambda r: -r.rmse_per_step)
    result = {
        "mode": mode.name,
        "metric": METRIC,
        "metric_meaning": METRIC_MEANING,
        "share_meaning": SHARE_MEANING,
        "error_images": len(error_images),
        "gate_images": len(gate_images),
        "gate_flips": int(flipped.sum()),
        "flipped_images": [
            {"path": gate_paths[i], "true": classes[int(y_true[i])],
             "float_label": classes[int(float_probs[i].argmax())], "quant_label": classes[int(quant_probs[i].argmax())]}
            for i in np.flatnonzero(flipped)
        ],
        "tested_layers": 0,
        "reproduced_flips": None,
    }
    if flipped.any():
        float_top = float_probs.argmax(1)
        runner = Requantizer(debugger.converter, debugger.calibrated_model, mode, bundle_dir)
        try:
            # The full int8 model again, from the debugger's calibration: if it does not flip
            # the same images as the bundle, the fallback figures below are not comparable.
            result["reproduced_flips"] = int((runner.top1(None, gate_images) != float_top).sum())
            tested = []
            for row in tqdm(layers[:k], desc="diagnosis: layers kept in float", unit="layer", leave=False):
                variant = runner.top1(row.tensor, gate_images) != float_top
                tested.append(_with_fallback(row, flipped, variant, gate_paths))
        finally:
            runner.close()
        layers = tested + layers[len(tested):]
        result["tested_layers"] = len(tested)
    result["layers"] = [asdict(r) for r in layers]
    result["blame"] = _blame(layers, int(flipped.sum()))
    result["verdict"] = verdict(result)
    return result


def write(bundle_dir: Path, diagnosis: dict) -> None:
    write_json(bundle_dir / DIAGNOSIS_NAME, diagnosis)


def verdict(diagnosis: dict) -> str:
    """One sentence: what the diagnosis found (also used in the failure hint)."""
    m = diagnosis["gate_flips"]
    if m == 0:
        return f"no test image changed its answer ({diagnosis['mode']} vs float): nothing to blame"
    blame = diagnosis.get("blame")
    if blame is None:
        return (f"no single layer kept in float removes any of the {m} flips (the {diagnosis['tested_layers']} "
                "worst layers tested): the error is spread over layers, or a range that several layers share")
    return f"keeping layer {blame['layer']} ({blame['op']}) in float removes {blame['flips_removed']} of {m} flips"


def to_markdown(diagnosis: dict) -> str:
    """The "Diagnosis" section of parity.md, worst layer first."""
    lines = ["## Diagnosis", "", f"**{verdict(diagnosis)}.**", ""]
    reproduced = diagnosis.get("reproduced_flips")
    if reproduced is not None and reproduced != diagnosis["gate_flips"]:
        lines += [(f"Caution: re-quantising from the diagnosis's own calibration gives {reproduced} flips, "
                  f"not the bundle's {diagnosis['gate_flips']}; the shares below compare against the bundle."), ""]
    lines += [
        (f"Per-layer error on {diagnosis['error_images']} calibration + validation images: `{METRIC}`, the "
        f"{METRIC_MEANING}. Flips explained, on the gate's {diagnosis['gate_images']} test images: the {SHARE_MEANING} "
        f"(measured for the {diagnosis['tested_layers']} worst layers through the device runtime)."),
        "",
        "| # | layer | op | rmse / step | max error / step | flips with it in float | removed | added | share removed |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for i, r in enumerate(diagnosis["layers"], 1):
        tested = r["tested"]
        lines.append(
            f"| {i} | {r['layer']} | {r['op']} | {r['rmse_per_step']:.3g} | {r['max_error_steps']:.3g} | "
            + (f"{r['flips_when_float']} | {r['flips_removed']} | {r['flips_added']} | {r['share_removed']:.0%} |"
               if tested else "not tested | | | |")
        )
    if diagnosis["flipped_images"]:
        lines += ["", "Images that flipped (float -> converted):", ""]
        lines += [f"- {f['path']} (true {f['true']}): {f['float_label']} -> {f['quant_label']}" for f in diagnosis["flipped_images"]]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- the debugger
def _debugger(export_model, mode: QuantMode, calibration_images: np.ndarray, error_images: np.ndarray):
    """TensorFlow's QuantizationDebugger on the bundle's converter settings, run on ``error_images``."""
    import tensorflow as tf

    converter = export.make_converter(export_model, mode, calibration.representative_dataset(calibration_images))
    log.info("diagnosis: per-layer error on %d images ...", len(error_images))
    try:
        with export.quiet_converter():
            debugger = tf.lite.experimental.QuantizationDebugger(
                converter=converter, debug_dataset=calibration.representative_dataset(error_images))
            debugger.run()
    except (ValueError, RuntimeError, TypeError) as err:
        raise ConversionError(f"the quantisation debugger failed on this model: {_last_line(err)}") from None
    return debugger


def _layer_errors(debugger, keras_model, export_model) -> list[LayerError]:
    """The debugger's per-layer table (its public CSV dump), with Keras layer names and step units."""
    buffer = io.StringIO()
    debugger.layer_statistics_dump(buffer)
    names = _keras_names(keras_model)
    outputs = sorted(export_model.output.keys()) if isinstance(export_model.output, dict) else ["probabilities"]
    rows = []
    for row in csv.DictReader(io.StringIO(buffer.getvalue())):
        scale = float(row["scale"])
        step = scale if scale > 0 else float("nan")
        rows.append(LayerError(
            tensor=row["tensor_name"],
            layer=_layer_name(row["tensor_name"], names, outputs),
            op=row["op_name"],
            rmse_per_step=_finite(math.sqrt(max(float(row["mean_squared_error"]), 0.0)) / step),
            max_error_steps=_finite(float(row["max_abs_error"]) / step),
            scale=scale,
        ))
    return rows


def _keras_names(model) -> set[str]:
    """Every layer name, nested models included (a backbone's layers have their own names)."""
    names, stack = set(), [model]
    while stack:
        layer = stack.pop()
        names.add(layer.name)
        stack.extend(getattr(layer, "layers", []))
    return names


def _layer_name(tensor: str, names: set[str], outputs: list[str]) -> str:
    """The Keras layer behind a TFLite tensor name (the deepest scope that names a layer).

    Keras 3 scopes ops by layer name and TensorFlow makes scopes unique with a
    ``_N`` suffix (``conv2d`` -> ``conv2d_1``, ``conv2d_1`` -> ``conv2d_1_2``), so one
    suffix is dropped first. The signature's outputs are renamed
    ``StatefulPartitionedCall_1:i``: i indexes the export model's output names in
    sorted order (how dict outputs are flattened). Unknown: the tensor's first scope.
    """
    match = _OUTPUT_TENSOR.match(tensor)
    if match and int(match.group(1)) < len(outputs):
        return outputs[int(match.group(1))]
    found = None
    for part in tensor.split(";")[0].split("/"):
        stripped = _SUFFIX.match(part)
        if stripped and stripped.group(1) in names:
            found = stripped.group(1)
        elif part in names:
            found = part
    return found or tensor.split(";")[0]


# ---------------------------------------------------------------- selective float fallback
class Requantizer:
    """Quantises a calibrated model (the debugger's, or :mod:`.repair`'s) again, optionally with nodes in float, and runs it on the device path.

    Each model runs in a copy of the provisional bundle (its bundle.json input /
    outputs rewritten from the model, re-checksummed), loaded by ``load_bundle``
    and classified by :class:`leukoedge.runtime.Classifier`, like any bundle.
    """

    def __init__(self, converter, calibrated_model: bytes, mode: QuantMode, bundle_dir: Path) -> None:
        self._converter, self._calibrated, self._mode, self._bundle = converter, calibrated_model, mode, Path(bundle_dir)
        self._tmp = Path(tempfile.mkdtemp(prefix="leukoedge-diagnose-"))

    def quantize(self, denylisted: str | list[str] | None) -> bytes:
        """The calibrated model quantised again, the ``denylisted`` op output tensor(s) kept in float."""
        from tensorflow.lite.python import (
            convert as tf_convert,  # what the debugger itself calls
        )

        converter = self._converter
        nodes = [denylisted] if isinstance(denylisted, str) else list(denylisted or [])
        io_type = export.io_dtype(self._mode)
        try:
            with export.quiet_converter():
                # The arguments the converter's own int8 path passes (lite.py, ``_quantize``).
                return bytes(tf_convert.mlir_quantize(
                    self._calibrated,
                    disable_per_channel=converter._experimental_disable_per_channel,
                    input_data_type=io_type,
                    output_data_type=io_type,
                    disable_per_channel_for_dense_layers=(
                        converter._experimental_disable_per_channel_quantization_for_dense_layers),
                    denylisted_nodes=nodes or None,
                ))
        except (ValueError, RuntimeError, TypeError) as err:
            what = f"with {', '.join(nodes)} in float" if nodes else "again"
            raise ConversionError(f"diagnosis: quantising the model {what} failed: {_last_line(err)}") from None

    def top1(self, denylisted: str | None, images: np.ndarray) -> np.ndarray:
        return parity.predict_device(self.classifier(self.quantize(denylisted)), images).argmax(1)

    def classifier(self, model: bytes, num_threads: int | None = None, *, name: str = "bundle"):
        """A :class:`~leukoedge.runtime.Classifier` of ``model`` in a copy of the bundle (input/outputs read from the model).

        Each ``name`` is one copy, replaced by the next call with that name: a classifier
        that must outlive the next call (a latency reference) takes a name of its own.
        """
        from ..runtime import Classifier

        variant = self._tmp / name
        if variant.exists():
            shutil.rmtree(variant)
        shutil.copytree(self._bundle, variant)
        atomic_write_bytes(variant / MODEL_NAME, model, fsync=False)
        meta = writer.read_json_or_none(variant / META_NAME)
        meta["input"], meta["outputs"] = writer.interpreter_io(variant / MODEL_NAME)
        write_json(variant / META_NAME, meta)
        write_manifest(variant)
        return Classifier(load_bundle(variant, allow_invalid=True), num_threads=num_threads, edgetpu="off")

    def close(self) -> None:
        shutil.rmtree(self._tmp, ignore_errors=True)


def _with_fallback(row: LayerError, flipped: np.ndarray, variant: np.ndarray, paths: list[str]) -> LayerError:
    removed = int(np.sum(flipped & ~variant))
    return LayerError(**{
        **asdict(row), "tested": True, "flips_when_float": int(variant.sum()), "flips_removed": removed,
        "flips_added": int(np.sum(variant & ~flipped)), "share_removed": removed / int(flipped.sum()),
        "still_flipped": [paths[i] for i in np.flatnonzero(flipped & variant)],
    })


def _blame(layers: list[LayerError], flips: int) -> dict | None:
    """The tested layer whose float fallback removes the most flips (ties: the worse metric); None if none removes any."""
    tested = [r for r in layers if r.tested and r.flips_removed]
    if not flips or not tested:
        return None
    best = max(tested, key=lambda r: (r.flips_removed - r.flips_added, r.rmse_per_step))
    return {"layer": best.layer, "op": best.op, "tensor": best.tensor, "flips_removed": best.flips_removed,
            "flips_added": best.flips_added, "of": flips, "share_removed": best.share_removed}


def _finite(value: float) -> float:
    return value if math.isfinite(value) else 0.0


def _last_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[-1] if text else type(err).__name__
