"""Assemble a bundle directory: staging, metadata, model card, checksums, commit.

A bundle is first written to a hidden staging directory next to ``--out``
and renamed into place when complete, so an interrupted conversion never
leaves a half bundle that the device might load.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
from pathlib import Path

import numpy as np

from .. import RESEARCH_NOTICE, __version__
from ..bundle import (
    EDGETPU_MODEL_NAME,
    FORMAT_NAME,
    FORMAT_VERSION,
    LABELS_NAME,
    META_NAME,
    MODEL_NAME,
    write_manifest,
)
from ..errors import RunError, UsageError
from ..files import atomic_write_text, write_json
from ..train.training_scale import card_markdown as scale_markdown
from ..train.training_scale import card_section as scale_section
from . import trust_report as trust_report_md


def staging_dir(out: Path) -> Path:
    path = out.parent / f".{out.name}.staging-{os.getpid()}"
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


def check_target(out: Path, force: bool) -> None:
    if out.exists() and not force:
        raise UsageError(f"{out} already exists", hint="pass --force to replace it, or choose another --out")
    if out.exists() and not (out / META_NAME).is_file() and any(out.iterdir()):
        raise UsageError(f"{out} exists and is not a bundle; refusing to replace it even with --force")


def commit(staging: Path, out: Path) -> Path:
    """Replace ``out`` with the finished staging directory (old bundle removed only now)."""
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        out.rename(old)
        staging.rename(out)
        shutil.rmtree(old)
    else:
        staging.rename(out)
    return out


def interpreter_io(model_path: Path) -> tuple[dict, dict]:
    """Input/output description for bundle.json, read from the converted model itself."""
    from ..runtime import adapters
    from ..runtime.backend import find_litert

    interp = find_litert().interpreter_cls(model_path=str(model_path))
    inputs, outputs = adapters.signature_tensors(interp)

    def describe(name, details):
        scale, zero = adapters.quant_params(details)
        return {
            "name": name,
            "dtype": np.dtype(details["dtype"]).name,
            "shape": [int(d) for d in details["shape"]],
            "quantization": {"scale": scale, "zero_point": zero},
        }

    (name, details), = inputs.items()
    return describe(name, details), {n: describe(n, d) for n, d in sorted(outputs.items())}


def bundle_meta(
    *,
    model_name: str,
    version: str,
    run_dir: Path,
    labels: list[str],
    spec: dict,
    quantize: str,
    input_desc: dict,
    outputs: dict,
    abstention: dict | None,
    temperature: float,
    heatmap: dict | None,
    has_edgetpu: bool,
    valid: bool,
    invalid_reason: str | None,
    parity: dict | None,
    size: dict,
    edgetpu: dict | None,
    calibration: dict | None = None,
    scale: dict | None = None,
    quality: dict | None = None,
    repair: dict | None = None,
    ensemble: dict | None = None,
) -> dict:
    """bundle.json; ``calibration`` (from ``convert --calibrate``) replaces the bare ``temperature``.

    ``scale`` (:func:`.pixel_size.bundle_scale`) says where ``preprocessing.um_per_px`` came from;
    ``quality`` is the capture gate's thresholds (:meth:`leukoedge.quality.QualityThresholds.to_dict`).
    """
    files = {"model": MODEL_NAME, "labels": LABELS_NAME}
    if has_edgetpu:
        files["model_edgetpu"] = EDGETPU_MODEL_NAME
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "model": {
            "name": model_name,
            "version": version,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "run": run_dir.name,
            "leukoedge_version": __version__,
        },
        "labels": labels,
        "preprocessing": spec,
        "scale": scale,
        "quantize": quantize,
        "input": input_desc,
        "outputs": outputs,
        "files": files,
        "abstention": abstention,
        "calibration": dict(calibration) if calibration else {"temperature": temperature},
        "quality": quality,
        "heatmap": heatmap,
        "valid": valid,
        "invalid_reason": invalid_reason,
        "parity": parity,
        "size": size,
        "edgetpu": edgetpu,
        "notice": RESEARCH_NOTICE,
        **({"repair": repair} if repair is not None else {}),
        **({"ensemble": ensemble} if ensemble is not None else {}),
    }


def write_common(staging: Path, labels: list[str], meta: dict) -> None:
    atomic_write_text(staging / LABELS_NAME, "\n".join(labels) + "\n")
    write_json(staging / META_NAME, meta)


def write_model_card(
    staging: Path, run_card_md: str | None, run_card: dict | None, meta: dict, trust_report: dict | None = None
) -> None:
    """The run's model card plus 'On-device model' and 'Calibration' sections (or a minimal card if the run has none).

    ``trust_report`` (``trust.json``) adds the float vs converted calibration
    figures and a link to the bundle's reliability diagram.
    """
    conversion = {
        "quantize": meta["quantize"],
        "input": meta["input"],
        "valid": meta["valid"],
        "invalid_reason": meta["invalid_reason"],
        "parity": meta["parity"],
        "size": meta["size"],
        "abstention": _without_scorer_arrays(meta["abstention"]),
        "calibration": meta.get("calibration"),
        **({"repair": meta["repair"]} if meta.get("repair") else {}),
        **({"ensemble": meta["ensemble"]} if meta.get("ensemble") else {}),
    }
    card = dict(run_card or {"model": meta["model"]["name"], "labels": meta["labels"]})
    card["on_device"] = conversion
    device_rule = (meta.get("abstention") or {}).get("score")
    if device_rule and card.get("ood"):
        # One abstention section, the one the device uses: the run's rule is kept for reference only (issue 14).
        card["training_run_ood"] = {**card.pop("ood"), "used_on_device": False}
    if trust_report:
        # Under on_device (next to the converted model's "calibration"), so a run card's own keys are never replaced.
        conversion["calibration_float"] = trust_report.get("calibration_float")
        conversion["reliability_plot"] = trust_report.get("reliability_plot")
    card.setdefault("notice", RESEARCH_NOTICE)
    scale_card = _bundle_scale_card(meta, ((run_card or {}).get("scale") or {}).get("scale_jitter", 0.0))
    if scale_card is not None:
        card["scale"] = scale_card  # the bundle's scale, which --um-per-px may have set after training
    write_json(staging / "model_card.json", card)
    head = run_card_md.rstrip() if run_card_md else f"# Model card: {meta['model']['name']}\n\n{RESEARCH_NOTICE}"
    if scale_card is not None and (meta.get("scale") or {}).get("source") == "conversion":
        head = replace_section(head, "## Scale", scale_markdown(scale_card))
    if device_rule:
        head = replace_section(head, "## Out-of-distribution abstention", [
            f"This bundle abstains by its own rule, measured on the converted model: score `{device_rule}` "
            "(see \"On-device model\" below). The training run's threshold is not used on the device."])
    parity = meta["parity"] or {}
    size = meta["size"]
    section = [
        "",
        "",
        f"## On-device model ({meta['quantize']})",
        "",
        f"- bundle version {meta['model']['version']}, created {meta['model']['created']}",
        f"- input {meta['input']['dtype']} {meta['input']['shape']}, "
        f"scale {meta['input']['quantization']['scale']:g}, zero point {meta['input']['quantization']['zero_point']}",
        f"- size: {size.get('converted_bytes', 0):,} bytes ({size.get('ratio', 0):.2f}x smaller than float32 TFLite)",
        f"- parity gate: {'passed' if meta['valid'] else 'FAILED: ' + str(meta['invalid_reason'])}; "
        f"float accuracy {parity.get('float_accuracy', float('nan')):.4f}, converted {parity.get('quant_accuracy', float('nan')):.4f}, "
        f"agreement {parity.get('agreement', float('nan')):.4f} (details in parity.md)",
        *_ensemble_lines(meta),
        *_repair_lines(meta),
        *_scale_lines(meta),
        *_trust_lines(meta),
        *trust_report_md.calibration_section(trust_report, meta["quantize"]),
        "",
        RESEARCH_NOTICE,
        "",
    ]
    atomic_write_text(staging / "model_card.md", head + "\n".join(section))


def _ensemble_lines(meta: dict) -> list[str]:
    """``--member`` / ``--tta``: which runs and views the one model averages, and what that costs per image."""
    ens = meta.get("ensemble")
    if not ens:
        return []
    members = "; ".join(f"{m['run']} ({m['model']}, {m['parameters']:,} parameters, version {m['version']})"
                        for m in ens["members"])
    return [f"- averages {len(ens['members'])} member(s) x {len(ens['views'])} view(s) "
            f"({', '.join(ens['views'])}): {ens['invokes_per_image']} sub-model invokes per tile; members: {members}; "
            f"the gate graded the average against the same average of the float members; heatmap and "
            f"feature-based abstention read {ens['features_from']}"]


def _repair_lines(meta: dict) -> list[str]:
    """What ``convert --repair`` changed, so the card never presents a repaired model as plain full int8."""
    fix = meta.get("repair")
    if not fix:
        return []
    chosen = "chosen on the val split" if fix.get("passed_validation") else "the best FAILED attempt, left for inspection"
    floats = ", ".join(fix.get("float_ops") or []) or "none"
    mapped = fix.get("edgetpu_mapped_ops") or []
    tpu = f"; Edge TPU would map {mapped[0]} of {mapped[1]} ops" if len(mapped) == 2 else ""
    return [f"- repaired (`convert --repair`): full int8 failed the gate; this model is {fix['remedy']} "
            f"({fix['detail']}), {chosen}; activations {fix.get('activations', 'int8')}, ops in float: {floats}{tpu} "
            f"(every attempt in {fix.get('report', 'repair.md')})"]


def replace_section(markdown: str, title: str, body: list[str]) -> str:
    """``markdown`` with the section headed ``title`` (up to the next ``## ``) replaced by ``body`` lines."""
    lines = markdown.split("\n")
    try:
        start = lines.index(title)
    except ValueError:
        return markdown
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    return "\n".join(lines[:start] + [title, "", *body, ""] + lines[end:])


def _without_scorer_arrays(abstention: dict | None) -> dict | None:
    if not abstention or "scorer" not in abstention:
        return abstention
    scorer = abstention["scorer"]
    return {**abstention, "scorer": {k: scorer.get(k) for k in ("method", "input", "params")}}


def _bundle_scale_card(meta: dict, scale_jitter: float) -> dict | None:
    """The card's ``scale`` entry for the bundle's own spec (None for metadata without a scale record)."""
    from ..preprocess import PreprocessSpec

    if meta.get("scale") is None:
        return None
    spec = PreprocessSpec.from_dict(meta["preprocessing"])
    training = meta["scale"].get("training") or {}
    merged = {**training, **{k: v for k, v in meta["scale"].items() if k != "training"}}
    return scale_section(merged, spec, scale_jitter)


def _scale_lines(meta: dict) -> list[str]:
    """The on-device section's scale line: what ``preprocessing.um_per_px`` the device tiles at."""
    scale = meta.get("scale")
    if scale is None:
        return []
    um = scale.get("um_per_px")
    if um is None:
        return ["- scale: unknown; the device stretches the whole frame to the model input "
                "(add it with `leukoedge convert RUN_DIR --um-per-px X`)"]
    field_um = meta["preprocessing"].get("field_um") or [0.0, 0.0]
    return [f"- scale: {um:.4g} um/px ({scale.get('how')}); the device brings captures to it and tiles them "
            f"into fields of {field_um[0]:.0f} x {field_um[1]:.0f} um"]


def _trust_lines(meta: dict) -> list[str]:
    """Model-card lines on abstention and calibration of THIS converted model (details in trust.md)."""
    lines = []
    ab = meta.get("abstention") or {}
    if ab.get("score") and ab.get("threshold") is not None:
        lines.append(
            f"- abstention (\"not like the images this model was trained on\"): score `{ab['score']}`, "
            f"abstain when {ab.get('abstain_when', '?')} {ab['threshold']:.6g}"
            + (f", chosen on {ab['chosen_on']} for {ab['target_abstain_rate']:.0%} abstained" if "chosen_on" in ab else "")
        )
        for name, ood in (ab.get("ood") or {}).items():
            held = ood["held_out"]["auroc"]
            lines.append(
                f"  - vs {name} ({ood['n']} images): AUROC {ood['auroc']:.3f}, abstained {ood['abstain_rate']:.1%}; "
                f"held-out half AUROC {'n/a' if held is None else format(held, '.3f')}"
            )
        if "test_abstain_rate" in ab:
            lines.append(f"  - in-distribution test images abstained: {ab['test_abstain_rate']:.1%}")
        if ab.get("ood"):
            lines.append("  - the OOD images were used for evaluation only (details and a held-out half in trust.md)")
    cal = meta.get("calibration") or {}
    if "ece_before" in cal:
        lines.append(
            f"- calibration: temperature {cal['temperature']:.3f} fitted on {cal.get('fitted_on', 'val')}; "
            f"test ECE {cal['ece_before']:.4f} -> {cal['ece_after']:.4f} (reliability table in trust.md)"
        )
    return lines


def finalize(staging: Path) -> None:
    write_manifest(staging)


def read_text_or_none(path: Path) -> str | None:
    return path.read_text(encoding="utf-8") if path.is_file() else None


def read_json_or_none(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise RunError(f"{path}: not valid JSON ({err})") from None

