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
    atomic_write_text,
    write_json,
    write_manifest,
)
from ..errors import RunError, UsageError


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
) -> dict:
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
        "quantize": quantize,
        "input": input_desc,
        "outputs": outputs,
        "files": files,
        "abstention": abstention,
        "calibration": {"temperature": temperature},
        "heatmap": heatmap,
        "valid": valid,
        "invalid_reason": invalid_reason,
        "parity": parity,
        "size": size,
        "edgetpu": edgetpu,
        "notice": RESEARCH_NOTICE,
    }


def write_common(staging: Path, labels: list[str], meta: dict) -> None:
    atomic_write_text(staging / LABELS_NAME, "\n".join(labels) + "\n")
    write_json(staging / META_NAME, meta)


def write_model_card(staging: Path, run_card_md: str | None, run_card: dict | None, meta: dict) -> None:
    """The run's model card plus an 'On-device model' section (or a minimal card if the run has none)."""
    conversion = {
        "quantize": meta["quantize"],
        "input": meta["input"],
        "valid": meta["valid"],
        "invalid_reason": meta["invalid_reason"],
        "parity": meta["parity"],
        "size": meta["size"],
        "abstention": meta["abstention"],
    }
    card = dict(run_card or {"model": meta["model"]["name"], "labels": meta["labels"]})
    card["on_device"] = conversion
    card.setdefault("notice", RESEARCH_NOTICE)
    write_json(staging / "model_card.json", card)
    head = run_card_md.rstrip() if run_card_md else f"# Model card: {meta['model']['name']}\n\n{RESEARCH_NOTICE}"
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
        "",
        RESEARCH_NOTICE,
        "",
    ]
    atomic_write_text(staging / "model_card.md", head + "\n".join(section))


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

