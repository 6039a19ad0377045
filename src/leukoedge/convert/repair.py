"""``convert --repair``: when the int8 gate fails, try remedies in order of cost until one classifies like float.

Issue 17, item 2. The remedies, cheapest first (each one a TFLite model run
through the device runtime, :class:`leukoedge.runtime.Classifier`, in a copy of
the provisional bundle, as the gate runs any bundle):

1. **more calibration images**: full int8 again, calibrated on a larger and
   different stratified train-split sample (:data:`MORE_CALIBRATION_FACTOR` times
   ``--calibration``, another seed, at most :data:`MORE_CALIBRATION_MAX`): the
   same size and speed as full int8, so it is tried first; skipped when the train
   split has no more images than calibration already used;
2. **float fallback for the k worst layers** of the diagnosis ranking
   (:mod:`.diagnose`, worst ``rmse_per_step`` first), k = 1 .. :data:`MAX_FALLBACK_LAYERS`:
   the calibrated model quantised again with those op outputs denylisted
   (``mlir_quantize(denylisted_nodes=...)``), int8 I/O kept;
3. **16x8** for the whole model (int16 activations, int8 weights,
   ``EXPERIMENTAL_TFLITE_BUILTINS_ACTIVATIONS_INT16_WEIGHTS_INT8``). TFLite allows
   float32 or int16 I/O for it, never int8; the runtime feeds float32 (raw pixels,
   ``Rescaling`` is in the model) and has no int16 input path, so the 16x8 model
   has float32 input/output (a QUANTIZE op in front, a DEQUANTIZE behind) and the
   bundle's ``input`` records float32, read from the model like every bundle.
   16x8 for single layers is not offered: the TFLite converter quantises a whole
   model in one activation width (``ai-edge-quantizer`` has per-op recipes; it is
   not a dependency here).

Every attempt also records how much of its graph the Edge TPU compiler would map
(:func:`.edgetpu.mappable_ops`: the prefix up to the first float, int16 or
unsupported op), so a user who deploys to a Coral sees what a remedy costs there.

**The choice is made on VALIDATION images only**: each attempt is graded by the
gate's own decision (:func:`.parity.compare`, the same tolerances) of float vs the
candidate on the val split, and the first attempt that passes there is kept. The
pipeline then grades the kept model with the normal gate on TEST, once; test never
chooses. If no attempt passes on validation, nothing is kept and the bundle stays
the full int8 one, marked invalid as without ``--repair``. When full int8 itself
passes on validation (the test gate failed, validation does not see it: a
near-chance model's flips are coin flips), a remedy is kept only if it also flips
fewer validation images than full int8; test still grades it and never chooses.

Latency is a rough figure: the median of :data:`LATENCY_INVOKES` invokes on one
thread, on this machine, taken in turn with as many of the full int8 model's, so
only the ratio means something (``leukoedge bench`` measures a Pi).
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np

from ..errors import ConversionError
from ..files import atomic_write_text, write_json
from . import calibration, edgetpu, export, parity
from .diagnose import Requantizer, _last_line
from .modes import QuantMode

log = logging.getLogger(__name__)

#: Most worst-ranked layers kept in float together before trying 16x8.
MAX_FALLBACK_LAYERS = 3
#: The "more calibration images" remedy calibrates on this many times ``--calibration`` images ...
MORE_CALIBRATION_FACTOR = 3
#: ... but on no more than this many (decoding and calibrating on more costs minutes, gains little).
MORE_CALIBRATION_MAX = 1000
#: Invokes behind each attempt's p50 latency (one thread; rough).
LATENCY_INVOKES = 30
REPAIR_JSON = "repair.json"
REPAIR_MD = "repair.md"
#: Ops that only convert between float and integer: not "left int8".
_CONVERSION_OPS = {"QUANTIZE", "DEQUANTIZE"}


@dataclass
class Attempt:
    """One remedy tried, as repair.json lists it."""

    remedy: str  # "full int8", "more calibration", "float fallback", "16x8"
    detail: str
    denylisted: list[str] = field(default_factory=list)
    val_images: int = 0
    val_flips: int = 0
    val_agreement: float = 0.0
    val_accuracy: float = 0.0
    val_passed: bool = False
    val_reasons: list[str] = field(default_factory=list)
    size_bytes: int = 0
    p50_invoke_ms: float = 0.0
    latency_vs_int8: float = 1.0
    size_vs_int8: float = 1.0
    input_dtype: str = ""
    float_ops: list[str] = field(default_factory=list)  # ops computing in float (not int8/int16)
    int16_ops: int = 0
    tpu_mapped_ops: int = 0  # ops the Edge TPU compiler would map (a prefix of the graph)
    total_ops: int = 0
    kept: bool = False
    test: dict | None = None  # the normal gate on test: full int8 (the gate that failed) and the kept attempt only
    error: str | None = None


@dataclass
class RepairResult:
    """``kept``: the attempt that passed on validation. With none, ``best`` is the attempt with the fewest
    validation flips (if it is not full int8 itself): ``model`` is then that one, to be left in the bundle
    marked invalid; ``model`` None leaves the bundle's full int8 model."""

    attempts: list[Attempt]
    kept: Attempt | None
    model: bytes | None
    verdict: str
    best: Attempt | None = None

    def to_dict(self) -> dict:
        return {
            "verdict": self.verdict,
            "chosen_on": "validation split (float vs candidate top-1, the gate's own test at its tolerances)",
            "graded_on": "test split, the normal parity gate, for the kept attempt only",
            "latency_note": (f"p50 of {LATENCY_INVOKES} invokes (set input, invoke, read output: Classifier.run), one "
                             "thread, on the converting machine, taken in turn with full int8's: a rough figure; "
                             "compare attempts by their ratio to full int8"),
            "max_fallback_layers": MAX_FALLBACK_LAYERS,
            "skipped": ["16x8 for the worst layers only (the TFLite converter quantises a whole model in one "
                        "activation width)"],
            "kept": f"{self.kept.remedy} ({self.kept.detail})" if self.kept else None,
            "best_failed": f"{self.best.remedy} ({self.best.detail})" if self.best else None,
            "attempts": [asdict(a) for a in self.attempts],
        }


def repair(
    export_model,
    mode: QuantMode,
    *,
    calibration_images: np.ndarray,
    diagnosis: dict,
    bundle_dir,
    val_images: np.ndarray,
    y_val: np.ndarray,
    float_val: np.ndarray,
    classes: list[str],
    max_drop: float,
    min_agreement: float,
    full_int8: bytes,
    more_calibration: Callable[[], tuple[np.ndarray, str]] | None = None,
) -> RepairResult:
    """Try the remedies in order (module docstring); stop at the first that passes on validation.

    ``more_calibration``: returns the larger calibration sample and a line saying
    what it is; it raises :class:`ConversionError` when the train split has no
    more images (the attempt is then listed as skipped). None skips the remedy.
    """
    paths = [f"val[{i}]" for i in range(len(val_images))]
    converter, calibrated = _calibrated(export_model, mode, calibration_images)
    runner = Requantizer(converter, calibrated, mode, bundle_dir)
    # The latency baseline, measured beside each attempt (its own copy: the next attempts replace theirs).
    reference = runner.classifier(full_int8, num_threads=1, name="reference")
    attempts: list[Attempt] = []
    kept_model = None
    models: dict[int, bytes] = {}
    try:
        def measure(attempt: Attempt, model: bytes) -> bool:
            clf = runner.classifier(model, num_threads=1)
            probs = parity.predict_device(clf, val_images)
            graded = parity.compare(float_val, probs, y_val, classes, paths, mode=attempt.remedy,
                                    max_drop=max_drop, min_agreement=min_agreement, worst=0)
            attempt.val_images, attempt.val_flips = graded.n_images, graded.flips
            attempt.val_agreement, attempt.val_passed, attempt.val_reasons = graded.agreement, graded.passed, graded.reasons
            attempt.val_accuracy = graded.quant_accuracy
            attempt.size_bytes = len(model)
            attempt.p50_invoke_ms, base_ms = p50_beside(clf, reference, val_images[0])
            attempt.input_dtype = clf.bundle.input["dtype"]
            attempt.float_ops, attempt.int16_ops = op_types(model)
            attempt.tpu_mapped_ops, attempt.total_ops = edgetpu.mappable_ops(model)
            base = attempts[0] if attempts else attempt
            models[len(attempts)] = model
            attempt.latency_vs_int8 = attempt.p50_invoke_ms / base_ms if base_ms else float("nan")
            attempt.size_vs_int8 = attempt.size_bytes / base.size_bytes
            log.info("repair: %s %s: %d of %d validation images flip (%s)", attempt.remedy, attempt.detail,
                     attempt.val_flips, attempt.val_images, "passes" if attempt.val_passed else "fails")
            attempts.append(attempt)
            # When full int8 itself passes on validation, a remedy must also flip fewer validation images.
            return attempt.val_passed and (floor is None or attempt.val_flips < floor)

        floor = None
        baseline = Attempt("full int8", "the bundle's model, for reference")
        if measure(baseline, full_int8):
            # The test gate failed but validation does not see it: test never chooses, so a remedy is kept
            # only if validation prefers it (fewer flips than full int8), and test then grades it.
            floor = baseline.val_flips
            if floor == 0:
                return RepairResult(attempts, None, None, (
                    "full int8 flips none of the validation images, so no remedy can do better there and "
                    "none can be chosen without looking at test; nothing was kept"))
        if more_calibration is not None:
            kept_model = _try_more_calibration(export_model, mode, more_calibration, attempts, measure)
        for k, tensors in enumerate([] if kept_model is not None else _fallback_sets(diagnosis), 1):
            names = ", ".join(_layer_names(diagnosis)[:k])
            attempt = Attempt("float fallback", f"{k} worst layer(s) in float: {names}", denylisted=tensors)
            try:
                model = runner.quantize(tensors)
            except ConversionError as err:
                attempt.error = err.message
                attempts.append(attempt)
                continue
            if measure(attempt, model):
                kept_model = model
                break
        if kept_model is None:
            attempt = Attempt("16x8", "int16 activations, int8 weights, whole model (float32 I/O)")
            try:
                model = convert_16x8(export_model, calibration_images)
            except ConversionError as err:
                attempt.error = err.message
                attempts.append(attempt)
            else:
                if measure(attempt, model):
                    kept_model = model
    finally:
        runner.close()
    if kept_model is None and floor is not None:
        return RepairResult(attempts, None, None, (
            f"full int8 passes on the validation images ({floor} of {baseline.val_images} flip) and no remedy flips "
            "fewer, so none can be chosen without looking at test; nothing was kept"))
    if kept_model is None:
        # Fewest validation flips; ties go to the cheaper (earlier) attempt, full int8 first.
        index = min(models, key=lambda i: (attempts[i].val_flips, i))
        best = attempts[index]
        why = (f"the best, {best.remedy} ({best.detail}), still flips {best.val_flips} of {best.val_images} "
               "validation images" + ("; it is left in the bundle, marked invalid" if index else ""))
        return RepairResult(attempts, None, models[index] if index else None,
                            f"no remedy passes on the validation images: {why}", best if index else None)
    kept = attempts[-1]
    kept.kept = True
    return RepairResult(attempts, kept, kept_model, f"kept {kept.remedy} ({kept.detail}): passes on validation")


def _try_more_calibration(export_model, mode: QuantMode, more_calibration, attempts: list, measure) -> bytes | None:
    """Full int8 calibrated on the larger sample; the model when it passes on validation, else None."""
    attempt = Attempt("more calibration", "full int8 calibrated on more train images")
    try:
        images, what = more_calibration()
        attempt.detail = f"full int8 calibrated on {what}"
        model = export.convert(export_model, mode, calibration.representative_dataset(images))
    except ConversionError as err:
        attempt.error = err.message
        attempts.append(attempt)
        return None
    return model if measure(attempt, model) else None


def record_test(attempt: Attempt, report: parity.ParityReport) -> None:
    """The normal gate on test (the pipeline's grading) of full int8 or of the kept model, into its attempt."""
    attempt.test = {"agreement": report.agreement, "flips": report.flips, "n": report.n_images,
                        "float_accuracy": report.float_accuracy, "accuracy": report.quant_accuracy,
                        "passed": report.passed, "reasons": list(report.reasons)}


def write(bundle_dir, result: RepairResult) -> None:
    write_json(bundle_dir / REPAIR_JSON, result.to_dict())
    atomic_write_text(bundle_dir / REPAIR_MD, to_markdown(result))


def to_markdown(result: RepairResult) -> str:
    lines = ["# Repair (`convert --repair`)", "", f"**{result.verdict}.**", "",
             ("Remedies in order of cost, each run through the device runtime. Chosen on the validation split "
              "(the gate's test of float vs candidate top-1 at the gate's tolerances); only the kept attempt is "
              "graded on test. Latency: p50 of "
              f"{LATENCY_INVOKES} invokes on one thread on the converting machine, taken in turn with full int8's, "
              "a rough figure; the ratio to full int8 is what counts. Edge TPU: ops the compiler would map, from the start of the graph to the "
              "first float, int16 or unsupported op (everything after runs on the CPU). Not tried: 16x8 for "
              "single layers (the converter quantises a whole model in one activation width)."),
             "",
             ("| # | remedy | detail | val flips | val agreement | val accuracy | test agreement | test accuracy | "
              "size (B) | size vs int8 | p50 invoke (ms) | vs int8 | input | ops in float | Edge TPU ops |"),
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for i, a in enumerate(result.attempts, 1):
        if a.error:
            lines.append(f"| {i} | {a.remedy} | {a.detail} | no result: {a.error} | | | | | | | | | | | |")
            continue
        test = a.test or {}
        lines.append(
            f"| {i} | {a.remedy}{' (kept)' if a.kept else ''} | {a.detail} | {a.val_flips} of {a.val_images} | "
            f"{a.val_agreement:.4f} | {a.val_accuracy:.4f} | {_num(test.get('agreement'))} | {_num(test.get('accuracy'))} | {a.size_bytes:,} | "
            f"{a.size_vs_int8:.2f}x | {a.p50_invoke_ms:.3f} | {a.latency_vs_int8:.2f}x | {a.input_dtype} | "
            f"{', '.join(a.float_ops) or 'none'} | {a.tpu_mapped_ops} of {a.total_ops} |")
    lines += ["", "Research use only; not a diagnostic device.", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------- models
def _calibrated(export_model, mode: QuantMode, images: np.ndarray):
    """The bundle's converter, calibrated only (what QuantizationDebugger quantises from)."""
    from tensorflow.lite.python.convert_phase import ConverterError

    converter = export.make_converter(export_model, mode, calibration.representative_dataset(images))
    converter._experimental_calibrate_only = True  # the debugger's own switch
    try:
        with export.quiet_converter():
            return converter, bytes(converter.convert())
    except (ConverterError, ValueError, RuntimeError, TypeError) as err:
        raise ConversionError(f"repair: calibrating the model failed: {_last_line(err)}") from None


def convert_16x8(export_model, calibration_images: np.ndarray) -> bytes:
    """The whole model with int16 activations and int8 weights, float32 I/O (see the module docstring)."""
    import tensorflow as tf
    from tensorflow.lite.python.convert_phase import ConverterError

    from .modes import MODES

    converter = export.make_converter(export_model, MODES["int8"], calibration.representative_dataset(calibration_images))
    converter.target_spec.supported_ops = [tf.lite.OpsSet.EXPERIMENTAL_TFLITE_BUILTINS_ACTIVATIONS_INT16_WEIGHTS_INT8]
    converter.inference_input_type = tf.float32
    converter.inference_output_type = tf.float32
    try:
        with export.quiet_converter():
            return bytes(converter.convert())
    except (ConverterError, ValueError, RuntimeError, TypeError) as err:
        raise ConversionError(f"repair: the 16x8 conversion failed: {_last_line(err)}") from None


def op_types(model: bytes) -> tuple[list[str], int]:
    """The ops computing in float (``OP:output``), and how many compute in int16, read from the TFLite model."""
    from ..runtime.backend import find_litert

    interp = find_litert().interpreter_cls(model_content=model)
    dtypes = {t["index"]: np.dtype(t["dtype"]).name for t in interp.get_tensor_details()}
    floats, int16 = [], 0
    for op in interp._get_ops_details():  # the only listing of ops the interpreter offers
        if op["op_name"] in _CONVERSION_OPS:
            continue
        out = [dtypes.get(i) for i in op["outputs"]]
        if "float32" in out:
            floats.append(op["op_name"])
        elif "int16" in out:
            int16 += 1
    return floats, int16


def _fallback_sets(diagnosis: dict) -> list[list[str]]:
    tensors = [r["tensor"] for r in diagnosis.get("layers", [])]
    return [tensors[:k] for k in range(1, min(MAX_FALLBACK_LAYERS, len(tensors)) + 1)]


def _layer_names(diagnosis: dict) -> list[str]:
    """``layer (OP)``: one Keras layer can give several ops (a Dense's FULLY_CONNECTED and its SOFTMAX)."""
    return [f"{r['layer']} ({r['op']})" for r in diagnosis.get("layers", [])]


def p50_beside(clf, reference, image: np.ndarray, invokes: int = LATENCY_INVOKES,
               reference_image: np.ndarray | None = None) -> tuple[float, float]:
    """p50 invoke of ``clf`` and of the full int8 ``reference``, invoke by invoke in turn, so that a busy
    machine slows both alike and their ratio holds (the milliseconds alone do not). ``reference_image``:
    the reference's input when its size differs (another input size's model; default ``image``)."""
    ref_image = image if reference_image is None else reference_image
    clf.run(image), reference.run(ref_image)  # warm-up
    mine, base = [], []
    for i in range(invokes):
        # Which model goes first alternates: the second of a pair finds the caches the first left.
        if i % 2:
            base.append(reference.run(ref_image).invoke_ms)
            mine.append(clf.run(image).invoke_ms)
        else:
            mine.append(clf.run(image).invoke_ms)
            base.append(reference.run(ref_image).invoke_ms)
    return float(np.median(mine)), float(np.median(base))


def _num(value) -> str:
    return "" if value is None else f"{value:.4f}"
