"""One conversion, start to finish: run dir -> TFLite -> parity gate -> bundle.

The story, in order: read the run (config, manifest, model, abstention,
temperature, training scale: the run's, or ``--um-per-px``, :mod:`.pixel_size`); build the batch-1 export model with named outputs; decode a
TRAIN-split selection once, to calibrate on (full-integer modes) and to fit the
capture quality gate's thresholds on (:mod:`leukoedge.quality`); convert;
write a provisional bundle and load it back through the device runtime; grade it against the float model on
the TEST split; fit the abstention score and the temperature on the converted
model's own outputs (:mod:`.trust`: train subsample, val, test, ``--ood-dir``),
measuring the float model's calibration alongside (its test probabilities
come from the gate) and drawing ``reliability.png`` (:mod:`.trust_plots`);
for a full-integer mode whose gate failed (or with ``--diagnose``), find the
layers behind the flips (:mod:`.diagnose`: ``diagnosis.json``, a section of parity.md);
write the final bundle (valid or not, model card with a Calibration section)
and commit it.

A failed gate still writes the bundle, marked ``valid: false`` with the
reason, so nothing is lost and the device refuses it unless forced; then
:class:`ParityError` is raised (exit code 7) carrying the result.
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..bundle import CAM_WEIGHTS_NAME, EDGETPU_MODEL_NAME, MODEL_NAME, load_bundle, make_archive
from ..data.records import Manifest
from ..errors import BundleError, ConversionError, ParityError, RunError
from ..files import atomic_path, atomic_write_bytes, atomic_write_text, sha256_file, write_json
from ..preprocess import PreprocessSpec
from ..train.rundir import RunConfig, RunDir
from ..runtime.scores import FEATURE_METHODS
from .. import quality
from . import calibration, diagnose, edgetpu as edgetpu_check, ensemble, export, parity, repair, trust, trust_plots, trust_report, writer
from .pixel_size import bundle_scale
from .modes import MIN_CALIBRATION, MODES
from .options import ConvertOptions

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ConvertResult:
    bundle: Path
    archive: Path | None
    parity: parity.ParityReport
    size: dict
    edgetpu: edgetpu_check.EdgeTpuReport | None
    heatmap_method: str | None
    trust: dict | None = None
    scale: dict | None = None
    diagnosis: dict | None = None
    repair: dict | None = None


@dataclass(frozen=True)
class _Run:
    """What the conversion reads from the run directory, checked once.

    ``spec`` is the run's preprocessing spec with the bundle's training scale
    (the run's, or ``--um-per-px``); ``scale`` says where that came from.
    """

    dir: RunDir
    config: RunConfig
    manifest: Manifest
    abstention: dict | None
    temperature: float
    spec: PreprocessSpec
    scale: dict


def convert_run(options: ConvertOptions, *, representative_images: np.ndarray | None = None) -> ConvertResult:
    """Convert ``options.run_dir`` into a bundle at ``options.out``.

    Args:
        representative_images: uint8 (N, H, W, 3) calibration images replacing
            the train-split selection. Only for tests and experiments (e.g. a
            deliberately broken calibration the gate must catch).

    Raises:
        ParityError: after writing the bundle marked invalid, when the gate fails.
    """
    run = _read_run(options)
    writer.check_target(options.out, options.force)
    test_entries = run.manifest.subset("test")
    if not test_entries:
        raise ConversionError("the manifest's test split is empty; the parity gate needs test images")

    log.info("loading %s", run.dir.model_path)
    first = export.load_keras_model(run.dir.model_path)
    model, ensemble_meta = _combine(options, run, first)
    score = _resolve_score(options, model)
    # A feature-based abstention score (fitted here, or declared by ood.json with
    # "uses": "features") needs the feature map even without a heatmap.
    need_features = (
        options.with_heatmap or score in FEATURE_METHODS or (run.abstention or {}).get("uses") == "features"
    )
    export.check_conventions(model, need_features)
    _check_shapes(model, run.spec.size, len(run.config.classes))
    train_entries, train_images = _train_sample(options, run)
    quality_meta = _fit_quality(options, run, train_entries, train_images)
    export_model = export.build_export_model(model, need_features)
    calibration_images = train_images if representative_images is None else representative_images
    tflite, size = _convert(options, run, model, export_model, calibration_images)
    test_images = calibration.load_images(run.manifest, test_entries, run.spec, options.data_root, "test")

    staging = writer.staging_dir(options.out)
    try:
        common, tpu_report = _write_model_files(staging, options, run, first, tflite, size)
        common["ensemble"] = ensemble_meta
        if ensemble_meta is not None:  # the bundle's model is all members and views: its version names them all
            common["version"] = hashlib.sha256(
                " ".join([*(m["version"] for m in ensemble_meta["members"]), options.tta]).encode()).hexdigest()[:12]
        common["quality"] = quality_meta
        meta = writer.bundle_meta(valid=False, invalid_reason="parity gate not run yet", parity=None, **common)
        writer.write_common(staging, list(run.config.classes), meta)
        writer.finalize(staging)
        report, float_test, quant_test = _grade(staging, model, run.manifest, test_entries, test_images, options)
        report = dataclasses.replace(report, size=size, split_kind=run.manifest.split_kind, leaky=run.manifest.leaky)
        diagnosis = None
        if options.mode.full_integer and (options.diagnose or not report.passed):
            diagnosis = _diagnose(staging, options, run, model, export_model, calibration_images, test_entries,
                                  test_images, float_test, quant_test)
        repaired = None
        if options.repair and not report.passed and diagnosis is not None:
            report, float_test, repaired = _repair(staging, options, run, model, export_model, calibration_images,
                                                   diagnosis, common, report, float_test, test_entries, test_images,
                                                   given_calibration=representative_images is not None)
        trusted = _fit_trust(staging, options, run, score, test_entries, test_images, model, float_test)
        for name, array in trusted.arrays.items():
            with atomic_path(staging / name) as tmp:
                np.save(tmp, np.ascontiguousarray(array), allow_pickle=False)
        common.update(abstention=trusted.abstention, calibration=trusted.calibration)
        trust_plots.reliability_figure(trusted.report, staging / trust.RELIABILITY_PLOT, options.quantize)
        trusted.report["reliability_plot"] = trust.RELIABILITY_PLOT
        write_json(staging / "trust.json", trusted.report)
        atomic_write_text(staging / "trust.md", trust_report.to_markdown(trusted.report, f"Trust report: {run.config.model} ({options.quantize})"))
        _write_reports(staging, run, report, common, trusted.report, diagnosis, repaired)
        writer.commit(staging, options.out)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    archive = make_archive(options.out, options.archive) if options.archive else None
    heatmap = common["heatmap"]
    if common.get("edgetpu") is not None:
        tpu_report = edgetpu_check.EdgeTpuReport(**common["edgetpu"])  # the repaired model's, after --repair
    result = ConvertResult(
        options.out, archive, report, common["size"], tpu_report, heatmap["method"] if heatmap else None, trusted.report,
        run.scale, diagnosis, repaired.to_dict() if repaired is not None else None,
    )
    if not report.passed:
        err = ParityError(
            f"the {options.quantize} model does not classify like the float model: {'; '.join(report.reasons)}. "
            f"The bundle was written to {options.out} but marked invalid",
            hint=_failure_hint(diagnosis, repaired, options.repair),
        )
        err.result = result
        raise err
    return result


def _failure_hint(diagnosis: dict | None, repaired: repair.RepairResult | None = None, tried: bool = False) -> str:
    """What to look at after a failed gate: the diagnosis's finding when there is one, and the repair's."""
    generic = "more calibration images (--calibration) or --quantize float16/dynamic may help"
    if diagnosis is None:
        return f"see parity.md in the bundle; {generic}"
    found = diagnosis.get("verdict") or f"the diagnosis failed ({diagnosis.get('error')})"
    if repaired is not None:
        return f"diagnosis (parity.md, {diagnose.DIAGNOSIS_NAME}): {found}; repair ({repair.REPAIR_MD}): {repaired.verdict}"
    offer = "" if tried else "; --repair tries more calibration images, float fallback for the worst layers, then 16x8"
    return f"diagnosis (parity.md, {diagnose.DIAGNOSIS_NAME}): {found}{offer}; {generic}"


def _repair(staging: Path, options: ConvertOptions, run: _Run, model, export_model, calibration_images: np.ndarray,
            diagnosis: dict, common: dict, report: parity.ParityReport, float_test: np.ndarray, test_entries,
            test_images: np.ndarray, given_calibration: bool = False):
    """``--repair`` after a failed gate (:mod:`.repair`): choose a remedy on VAL, grade it on TEST with the gate.

    A kept remedy replaces model.tflite in the provisional bundle (its input/outputs
    and size read again from the model) and is graded like any bundle; with none kept
    the bundle and its failed report stay as they are. ``given_calibration``: the caller
    replaced the calibration images (an experiment), so there is no train-split sample
    to enlarge and every remedy calibrates on the caller's images.
    """
    val_entries = run.manifest.subset("val")
    if not val_entries:
        raise ConversionError("--repair chooses a remedy on the val split, and the manifest's val split is empty")
    val_images = calibration.load_images(run.manifest, val_entries, run.spec, options.data_root, "val")
    result = repair.repair(
        export_model, options.mode,
        calibration_images=calibration_images, diagnosis=diagnosis, bundle_dir=staging,
        val_images=val_images,
        y_val=np.array([run.manifest.label_index(e.label) for e in val_entries], dtype=np.int64),
        float_val=parity.predict_float(model, val_images), classes=list(run.config.classes),
        max_drop=options.max_drop, min_agreement=options.min_agreement,
        full_int8=(staging / MODEL_NAME).read_bytes(),
        more_calibration=lambda: _more_calibration(options, run, len(calibration_images), given_calibration),
    )
    log.info("repair: %s", result.verdict)
    repair.record_test(result.attempts[0], report)  # the gate that failed: full int8 on test
    if result.model is None:
        return report, float_test, result
    kept = result.kept or result.best
    atomic_write_bytes(staging / MODEL_NAME, result.model)
    common["input_desc"], common["outputs"] = writer.interpreter_io(staging / MODEL_NAME)
    size = dict(common["size"])
    size.update(converted_bytes=len(result.model), ratio=size["float32_bytes"] / len(result.model),
                full_int8_bytes=common["size"]["converted_bytes"])
    common["size"] = size
    if options.edgetpu:
        _recheck_edgetpu(staging, common, result.model)
    # bundle.json["quantize"] names the model the bundle holds, not the mode that was asked for.
    common["quantize"] = {"16x8": "int16x8", "float fallback": f"{options.quantize}+float-fallback"}.get(
        kept.remedy, options.quantize)
    common["repair"] = {"remedy": kept.remedy, "detail": kept.detail, "denylisted": kept.denylisted,
                        "passed_validation": result.kept is not None,
                        "activations": "int16" if kept.remedy == "16x8" else "int8", "float_ops": kept.float_ops,
                        "edgetpu_mapped_ops": [kept.tpu_mapped_ops, kept.total_ops],
                        "report": repair.REPAIR_MD}
    meta = writer.bundle_meta(valid=False, invalid_reason="parity gate not run yet", parity=None, **common)
    writer.write_common(staging, list(run.config.classes), meta)
    writer.finalize(staging)
    graded, float_test, _ = _grade(staging, model, run.manifest, test_entries, test_images, options)
    graded = dataclasses.replace(graded, size=size, split_kind=run.manifest.split_kind, leaky=run.manifest.leaky)
    repair.record_test(kept, graded)
    if result.kept is None:
        # The best failed attempt is left for inspection; test must not turn it valid (it was not chosen).
        graded = dataclasses.replace(graded, passed=False, reasons=[
            *graded.reasons, "--repair: no remedy passed on the validation images (the best attempt is left here)"])
    elif graded.passed:
        result.verdict += "; the test gate PASSES"
    else:
        result.verdict += "; but the test gate FAILS, so the bundle is marked invalid (test never chooses a remedy)"
    return graded, float_test, result


def _combine(options: ConvertOptions, run: _Run, first):
    """``--member`` / ``--tta``: the one Keras model the bundle converts (:mod:`.ensemble`), and bundle.json's record.

    Without either, the run's own model and None.
    """
    if not options.members and options.tta == "none":
        return first, None
    others = []
    for path in options.members:
        rd = RunDir(path)
        rd.require(rd.config_path, rd.manifest_path, rd.model_path)
        others.append((rd, rd.config(), rd.manifest()))
    ensemble.check_members((run.dir, run.config, run.manifest), others, given_scale=options.um_per_px is not None)
    views = ensemble.check_views(options.tta, *run.spec.size)
    runs = [(run.dir, run.config)] + [(rd, cfg) for rd, cfg, _ in others]
    models = [first] + [export.load_keras_model(rd.model_path) for rd, _, _ in others]
    for m in models:
        export.check_conventions(m, False)
    members = [ensemble.MemberInfo(rd.path.name, cfg.model, sha256_file(rd.model_path)[:12], int(m.count_params()))
               for (rd, cfg), m in zip(runs, models)]
    with_features = "features" in {layer.name for layer in first.layers}
    combined = ensemble.combined_model(models, views, with_features)
    meta = {"members": [m.to_dict() for m in members], "tta": options.tta, "views": list(views),
            "invokes_per_image": len(models) * len(views),
            "features_from": "member 1, identity view (heatmap and feature-based abstention)"}
    log.info("ensemble: %d member(s) x %d view(s) averaged in one model", len(models), len(views))
    return combined, meta


def _recheck_edgetpu(staging: Path, common: dict, model: bytes) -> None:
    """``--edgetpu`` with ``--repair``: the TPU check and compile of the model the bundle now holds, not full int8's."""
    (staging / EDGETPU_MODEL_NAME).unlink(missing_ok=True)
    tpu_report, compiled = _edgetpu(staging, model)
    common["edgetpu"], common["has_edgetpu"] = tpu_report.to_dict(), compiled is not None


def _edgetpu(staging: Path, model: bytes):
    """The Edge TPU check of ``model`` (the bundle's model.tflite), compiled when edgetpu_compiler exists."""
    return edgetpu_check.compile_model(staging / MODEL_NAME, staging, edgetpu_check.inspect(model))


def _more_calibration(options: ConvertOptions, run: _Run, used: int, given: bool) -> tuple[np.ndarray, str]:
    """The repair's larger calibration sample: another stratified train-split draw (another seed), n times larger."""
    if given:
        raise ConversionError("the calibration images were given by the caller, so there is no train-split "
                              "sample to enlarge")
    train = len(run.manifest.subset("train"))
    n = min(train, repair.MORE_CALIBRATION_MAX, repair.MORE_CALIBRATION_FACTOR * options.calibration_size)
    if n <= used:
        raise ConversionError(f"the train split has {train} images and calibration already used {used}: no more to add")
    seed = run.config.seed + 1
    entries = calibration.select_calibration(run.manifest, n, seed)
    images = calibration.load_images(run.manifest, entries, run.spec, options.data_root, "more calibration")
    return images, f"{n} train images (stratified, seed {seed}; the gate's model used {used})"


def _diagnose(staging: Path, options: ConvertOptions, run: _Run, model, export_model, calibration_images: np.ndarray,
              test_entries, test_images: np.ndarray, float_test: np.ndarray, quant_test: np.ndarray) -> dict:
    """The per-layer diagnosis (:mod:`.diagnose`); ``_write_reports`` writes it into the bundle.

    Per-layer error on the calibration + validation images; flips on the gate's test images.
    Asked for (``--diagnose``), a failure is raised; run only because the gate failed,
    a :class:`ConversionError` is recorded in diagnosis.json and logged, so the
    gate's own verdict (and the invalid bundle) still reach the user.
    """
    val_entries = run.manifest.subset("val")
    val_images = calibration.load_images(run.manifest, val_entries, run.spec, options.data_root, "val")
    try:
        result = diagnose.diagnose(
            model, export_model, options.mode,
            calibration_images=calibration_images,
            error_images=np.concatenate([calibration_images, val_images]),
            gate_images=test_images,
            gate_paths=[e.path for e in test_entries],
            float_probs=float_test,
            quant_probs=quant_test,
            bundle_dir=staging,
            classes=list(run.config.classes),
            y_true=np.array([run.manifest.label_index(e.label) for e in test_entries], dtype=np.int64),
            k=options.diagnose_layers or None,
        )
    except ConversionError as err:
        if options.diagnose:
            raise
        log.warning("diagnosis of the failed gate did not complete: %s", err.message)
        result = {"mode": options.quantize, "error": err.message}
    if "verdict" in result:
        log.info("diagnosis: %s", result["verdict"])
    return result


def _read_run(options: ConvertOptions) -> _Run:
    rundir = RunDir(options.run_dir)
    rundir.require(rundir.config_path, rundir.manifest_path, rundir.model_path)
    config, manifest = rundir.config(), rundir.manifest()
    if tuple(config.classes) != tuple(manifest.classes):
        raise RunError(f"{rundir.path}: config classes {list(config.classes)} differ from the manifest's {list(manifest.classes)}")
    spec, scale = bundle_scale(config, manifest, options.um_per_px, options.data_root)
    return _Run(rundir, config, manifest, _abstention(rundir), _temperature(rundir), spec, scale)


def _train_sample(options: ConvertOptions, run: _Run) -> tuple[list, np.ndarray]:
    """Train-split entries and images at model size, decoded once for int8 calibration and the quality gate.

    The stratified selection calibration always used (the run's seed,
    ``--calibration`` images in full-integer modes, so calibration is unchanged),
    or :data:`leukoedge.quality.FIT_IMAGES` in float modes.
    """
    full = options.mode.full_integer
    entries = calibration.select_calibration(
        run.manifest, options.calibration_size if full else quality.FIT_IMAGES, run.config.seed,
        purpose="calibration" if full else "quality thresholds", minimum=MIN_CALIBRATION if full else 1,
    )
    return entries, calibration.load_images(run.manifest, entries, run.spec, options.data_root, "calibration")


def _fit_quality(options: ConvertOptions, run: _Run, entries: list, images: np.ndarray) -> dict:
    """``bundle.json["quality"]`` (issue 15): the capture gate's thresholds, from training images at model size.

    The gate reads colour as captured (its white-cell rule), so a run with a
    colour step (grayscale, Reinhard, Macenko) decodes the same images again without it.
    """
    if run.spec.colour != "as-captured":
        images = calibration.load_images(run.manifest, entries, run.spec.geometry_only(), options.data_root, "quality")
    return quality.fit_thresholds(images).to_dict()


def _convert(options: ConvertOptions, run: _Run, model, export_model, representative_images) -> tuple[bytes, dict]:
    """The converted model and the size report (against a float32 TFLite of the same graph)."""
    mode = options.mode
    representative = None
    if mode.full_integer:
        if representative_images is None:
            entries = calibration.select_calibration(run.manifest, options.calibration_size, run.config.seed)
            representative_images = calibration.load_images(run.manifest, entries, run.spec, options.data_root, "calibration")
        representative = calibration.representative_dataset(representative_images)
    log.info("converting (%s) ...", mode.name)
    tflite = export.convert(export_model, mode, representative)
    float_bytes = len(tflite) if mode.name == "none" else len(export.convert(export_model, MODES["none"]))
    size = {
        "float32_bytes": float_bytes,
        "converted_bytes": len(tflite),
        "ratio": float_bytes / len(tflite),
        "keras_file_bytes": run.dir.model_path.stat().st_size,
        "parameters": int(model.count_params()),
    }
    return tflite, size


def _write_model_files(staging: Path, options: ConvertOptions, run: _Run, model, tflite: bytes, size: dict):
    """model.tflite, heatmap weights, Edge TPU model; returns the bundle.json fields and the TPU report."""
    atomic_write_bytes(staging / MODEL_NAME, tflite)
    heatmap = _write_heatmap(staging, model) if options.with_heatmap else None
    tpu_report, compiled = None, None
    if options.edgetpu:
        tpu_report, compiled = _edgetpu(staging, tflite)
    input_desc, outputs = writer.interpreter_io(staging / MODEL_NAME)
    common = dict(
        model_name=run.config.model,
        version=sha256_file(run.dir.model_path)[:12],
        run_dir=run.dir.path.resolve(),
        labels=list(run.config.classes),
        spec=run.spec.to_dict(),
        scale=run.scale,
        quantize=options.quantize,
        input_desc=input_desc,
        outputs=outputs,
        abstention=run.abstention,
        temperature=run.temperature,
        heatmap=heatmap,
        has_edgetpu=compiled is not None,
        size=size,
        edgetpu=tpu_report.to_dict() if tpu_report else None,
    )
    return common, tpu_report


def _write_reports(staging: Path, run: _Run, report: parity.ParityReport, common: dict, trust_report_: dict | None = None,
                   diagnosis: dict | None = None, repaired: repair.RepairResult | None = None) -> None:
    """Final bundle.json (valid or not), parity.json/.md (with the diagnosis), model card (with the trust figures), checksums."""
    reason = None if report.passed else "parity gate failed: " + "; ".join(report.reasons)
    meta = writer.bundle_meta(valid=report.passed, invalid_reason=reason, parity=report.summary(), **common)
    writer.write_common(staging, list(run.config.classes), meta)
    write_json(staging / "parity.json", report.to_dict())
    if diagnosis is not None:
        diagnose.write(staging, diagnosis)
    if repaired is not None:
        repair.write(staging, repaired)
    markdown = report.to_markdown(f"Parity report: {run.config.model} ({report.mode})")
    if diagnosis is not None:
        section = (diagnose.to_markdown(diagnosis) if "verdict" in diagnosis
                   else f"## Diagnosis\n\nThe diagnosis did not complete: {diagnosis['error']}\n")
        footer = markdown.rfind("Research use only")  # the notice stays last
        markdown = markdown[:footer] + section + "\n" + markdown[footer:] if footer >= 0 else markdown + "\n" + section
    if repaired is not None:
        chosen = repaired.kept or repaired.best
        section = (f"## Repair\n\n{repaired.verdict}. Every attempt (validation flips, size, latency, ops in float) "
                   f"is in {repair.REPAIR_MD}; the figures above grade the bundle's model"
                   + (f" ({chosen.remedy}: {chosen.detail}); the diagnosis explains full int8.\n"
                      if chosen else " (full int8).\n"))
        footer = markdown.rfind("Research use only")
        markdown = markdown[:footer] + section + "\n" + markdown[footer:] if footer >= 0 else markdown + "\n" + section
    atomic_write_text(staging / "parity.md", markdown)
    writer.write_model_card(
        staging, writer.read_text_or_none(run.dir.model_card_md), writer.read_json_or_none(run.dir.model_card_json), meta,
        trust_report=trust_report_,
    )
    writer.finalize(staging)


def _grade(
    staging: Path, model, manifest: Manifest, entries, images: np.ndarray, options: ConvertOptions
) -> tuple[parity.ParityReport, np.ndarray, np.ndarray]:
    """Float Keras vs the provisional bundle through the device runtime; also both models' test probabilities."""
    from ..runtime import Classifier

    bundle = load_bundle(staging, allow_invalid=True)
    clf = Classifier(bundle, edgetpu="off")
    y_true = np.array([manifest.label_index(e.label) for e in entries], dtype=np.int64)
    float_probs = parity.predict_float(model, images)
    quant_probs = parity.predict_device(clf, images)
    graded = parity.compare(
        float_probs,
        quant_probs,
        y_true,
        list(manifest.classes),
        [e.path for e in entries],
        mode=options.quantize,
        max_drop=options.max_drop,
        min_agreement=options.min_agreement,
        worst=options.worst,
    )
    return graded, float_probs, quant_probs


def _resolve_score(options: ConvertOptions, model) -> str:
    """``--ood-score``, or the default: Mahalanobis when the model has a ``features`` layer."""
    if options.ood_score is not None:
        return options.ood_score
    return "mahalanobis" if "features" in {layer.name for layer in model.layers} else "max_softmax"


def _fit_trust(
    staging: Path, options: ConvertOptions, run: _Run, score: str, test_entries, test_images, model, float_test: np.ndarray
) -> trust.TrustResult:
    """Abstention + calibration on the provisional bundle, through the device runtime (see ``convert.trust``).

    The float Keras model's calibration is measured alongside (its test
    probabilities come from the parity gate, its validation ones are computed here).
    """
    from ..runtime import Classifier

    clf = Classifier(load_bundle(staging, allow_invalid=True), edgetpu="off")
    manifest, spec, root = run.manifest, run.spec, options.data_root
    feats = score in FEATURE_METHODS or "features" in clf.bundle.output_names

    def labels(entries) -> np.ndarray:
        return np.array([manifest.label_index(e.label) for e in entries], dtype=np.int64)

    n_fit = min(options.ood_fit, len(manifest.subset("train")))
    fit_entries = (calibration.select_calibration(manifest, n_fit, run.config.seed + 1, purpose="abstention fit",
                                                  minimum=1) if feats else [])
    val_entries = manifest.subset("val")
    if not val_entries:
        raise ConversionError("the manifest's val split is empty; the abstention threshold and temperature are chosen on it")
    fit_images = calibration.load_images(manifest, fit_entries, spec, root, "train") if fit_entries else None
    val_images = calibration.load_images(manifest, val_entries, spec, root, "val")
    empty = trust.Outputs(np.empty((0, len(run.config.classes))), None)
    outputs = {
        "train": trust.device_outputs(clf, fit_images, "trust train", feats) if fit_images is not None else empty,
        "val": trust.device_outputs(clf, val_images, "trust val", feats),
        "test": trust.device_outputs(clf, test_images, "trust test", feats),
    }
    ood_sets = [trust.load_ood_set(clf, Path(d), spec, feats) for d in options.ood_dirs]
    return trust.build(
        score,
        train=outputs["train"], y_train=labels(fit_entries),
        val=outputs["val"], y_val=labels(val_entries),
        test=outputs["test"], y_test=labels(test_entries),
        ood_sets=ood_sets,
        rate=options.abstain_rate,
        calibrate_flag=options.calibrate,
        run_temperature=run.temperature,
        seed=run.config.seed,
        float_val=parity.predict_float(model, val_images),
        float_test=float_test,
    )


def _check_shapes(model, size: tuple[int, int], n_classes: int) -> None:
    in_shape = tuple(model.inputs[0].shape[1:3])
    if in_shape != tuple(size):
        raise RunError(f"the model's input is {in_shape[0]}x{in_shape[1]} but the run config says {size[0]}x{size[1]}")
    out_units = model.get_layer("probabilities").output.shape[-1]
    if out_units != n_classes:
        raise RunError(f"the model outputs {out_units} probabilities for {n_classes} classes")


def _write_heatmap(staging: Path, model) -> dict:
    weights = export.cam_weights(model)
    if weights is None:
        return {"output": "features", "method": "channel_mean", "weights": None}
    np.save(staging / CAM_WEIGHTS_NAME, weights, allow_pickle=False)
    return {"output": "features", "method": "cam", "weights": CAM_WEIGHTS_NAME}


def _abstention(run: RunDir) -> dict | None:
    """The run's ood.json (score name, threshold, reference statistics), checked against the runtime."""
    from ..runtime import postprocess

    data = run.read(run.ood_path)
    if data is None:
        log.warning("%s has no ood.json: the bundle will never abstain", run.path)
        return None
    if not isinstance(data, dict) or "score" not in data or "threshold" not in data:
        raise RunError(f"{run.ood_path}: needs at least 'score' and 'threshold'")
    data = dict(data)
    try:
        # Resolve the side explicitly so the device never relies on a default.
        data["abstain_when"] = postprocess.abstain_side(data)
    except BundleError as err:
        raise RunError(f"{run.ood_path}: {err.message}", hint=err.hint) from None
    return data


def _temperature(run: RunDir) -> float:
    data = run.read(run.calibration_path) or {}
    temperature = float(data.get("temperature", 1.0))
    if not temperature > 0:
        raise RunError(f"{run.calibration_path}: temperature must be > 0, got {temperature}")
    return temperature
