"""The bundle format: what ``convert`` writes and the device loads.

A bundle is a directory (optionally packed as one ``.tar`` or ``.zip``)::

    bundle.json            metadata: format version, model name + version, labels,
                           preprocessing spec, input dtype + quantisation, output
                           names, abstention, calibration, heatmap, valid flag, parity
    model.tflite           the converted model
    model_edgetpu.tflite   optional, from edgetpu_compiler
    cam_weights.npy        optional, class-activation-map weights (C x K)
    ood_<array>.npy        optional, the fitted abstention scorer's arrays (issue 7):
                           ``abstention.scorer`` in bundle.json names them
    trust.json / trust.md  optional, abstention and calibration measured at conversion
    labels.txt             one class name per line, in label-index order
    model_card.md/.json, parity.json/.md
    diagnosis.json         optional (issue 17): per-layer int8 error and the flips each worst layer
                           explains when kept in float (``convert --diagnose``, or a failed int8 gate)
    repair.json / .md      optional (issue 17): the remedies ``convert --repair`` tried and the one kept
    MANIFEST.sha256        "<sha256>  <file>" for every other file (sha256sum -c works)

Why so strict: the device has nothing but the bundle (habit 3: the bundle
carries its spec), so a damaged download, a hand-edited threshold or a model
file swapped in by mistake must be refused rather than classify silently.
:func:`load_bundle` checks every checksum, that every listed file exists and no
unlisted file sneaked in, the metadata and the preprocessing spec, and refuses
bundles whose parity gate failed unless ``allow_invalid=True``. Archives are
extracted with path-traversal, link and size checks.

numpy + stdlib only: this module runs on the Raspberry Pi.
"""
from __future__ import annotations

import json
import shutil
import tarfile
import tempfile
import weakref
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np

from .errors import BundleError, LeukoEdgeError
from .files import atomic_path, atomic_write_text, sha256_file
from .preprocess import PreprocessSpec
from .quality import QualityThresholds

FORMAT_NAME = "leukoedge-bundle"
FORMAT_VERSION = 1
MANIFEST_NAME = "MANIFEST.sha256"
META_NAME = "bundle.json"
LABELS_NAME = "labels.txt"
MODEL_NAME = "model.tflite"
EDGETPU_MODEL_NAME = "model_edgetpu.tflite"
CAM_WEIGHTS_NAME = "cam_weights.npy"
#: Files every bundle must contain (besides MANIFEST.sha256).
REQUIRED_FILES = (META_NAME, MODEL_NAME, LABELS_NAME)
#: Input tensor dtypes the runtime knows how to feed.
INPUT_DTYPES = ("int8", "uint8", "float32")
ARCHIVE_KINDS = ("tar", "zip")
#: Refuse archives that would unpack to more than this (a zip bomb guard).
MAX_EXTRACTED_BYTES = 2 * 1024**3


# --------------------------------------------------------------------- writing
def write_manifest(bundle_dir: str | Path) -> Path:
    """Checksum every file of ``bundle_dir`` (flat) into MANIFEST.sha256.

    Sub-directories are refused: a bundle is flat, which keeps the checks
    (and the threat model) simple.
    """
    bundle_dir = Path(bundle_dir)
    lines = []
    for path in sorted(bundle_dir.iterdir()):
        if path.name == MANIFEST_NAME:
            continue
        if not path.is_file() or path.is_symlink():
            raise BundleError(f"{path}: a bundle holds only regular files (no folders or links)")
        lines.append(f"{sha256_file(path)}  {path.name}")
    return atomic_write_text(bundle_dir / MANIFEST_NAME, "\n".join(lines) + "\n")


def make_archive(bundle_dir: str | Path, kind: str, out: str | Path | None = None) -> Path:
    """Pack a bundle directory into ``<dir>.tar`` / ``<dir>.zip`` (members under ``<dir name>/``)."""
    bundle_dir = Path(bundle_dir)
    if kind not in ARCHIVE_KINDS:
        raise BundleError(f"unknown archive kind {kind!r}; use one of {', '.join(ARCHIVE_KINDS)}")
    out = Path(out) if out else bundle_dir.with_name(f"{bundle_dir.name}.{kind}")
    files = sorted(p for p in bundle_dir.iterdir() if p.is_file())
    with atomic_path(out) as tmp:
        if kind == "tar":
            with tarfile.open(tmp, "w") as tar:
                for path in files:
                    tar.add(path, arcname=f"{bundle_dir.name}/{path.name}", recursive=False)
        else:
            with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
                for path in files:
                    zf.write(path, arcname=f"{bundle_dir.name}/{path.name}")
    return out


# --------------------------------------------------------------------- reading
@dataclass(frozen=True)
class Bundle:
    """A verified bundle. Everything the device needs comes from here.

    Attributes:
        path: the directory holding the (verified) files; for an archive, a
            private temporary extraction removed when the Bundle is collected.
        source: what the user passed (directory or archive path).
        meta: the parsed ``bundle.json``.
        spec: the preprocessing spec.
        labels: class names in label-index order.
    """

    path: Path
    source: Path
    meta: dict
    spec: PreprocessSpec
    labels: tuple[str, ...]
    _keepalive: object = field(default=None, repr=False, compare=False)

    @property
    def model_path(self) -> Path:
        return self.path / MODEL_NAME

    @property
    def sha256(self) -> str:
        """SHA-256 of MANIFEST.sha256: one fingerprint for the whole verified bundle (what a report cites)."""
        return sha256_file(self.path / MANIFEST_NAME)

    @property
    def edgetpu_model_path(self) -> Path | None:
        name = self.meta.get("files", {}).get("model_edgetpu")
        return self.path / name if name else None

    @property
    def valid(self) -> bool:
        return bool(self.meta.get("valid"))

    @property
    def invalid_reason(self) -> str | None:
        return self.meta.get("invalid_reason")

    @property
    def name(self) -> str:
        return str(self.meta["model"]["name"])

    @property
    def version(self) -> str:
        return str(self.meta["model"]["version"])

    @property
    def input(self) -> dict:
        return self.meta["input"]

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(self.meta["outputs"])

    @property
    def abstention(self) -> dict | None:
        return self.meta.get("abstention")

    @property
    def calibration(self) -> dict:
        """``temperature`` (1.0 when absent) and, from ``convert --calibrate``, ``log_prob_floor`` and ECE figures."""
        return dict(self.meta.get("calibration") or {"temperature": 1.0})

    @property
    def temperature(self) -> float:
        return float(self.calibration.get("temperature", 1.0))

    def ood_state(self) -> tuple[dict, dict[str, np.ndarray]] | None:
        """(scorer meta, {array name: array}) of the fitted abstention scorer, or None for rule-only bundles.

        Rebuild it with :meth:`leukoedge.runtime.ood.OODScorer.from_state`, which
        validates shapes and values (the checksums were verified at load).
        """
        scorer = (self.abstention or {}).get("scorer")
        if not scorer:
            return None
        arrays = {}
        for name, filename in (scorer.get("files") or {}).items():
            try:
                arrays[name] = np.load(self.path / filename, allow_pickle=False)
            except (OSError, ValueError) as err:
                raise BundleError(f"{self.source}: unreadable abstention array {filename} ({err})") from None
        return scorer, arrays

    @property
    def quality(self) -> QualityThresholds | None:
        """The capture quality gate's thresholds (checked at load); None for bundles made before the gate."""
        section = self.meta.get("quality")
        return QualityThresholds.from_dict(section) if section is not None else None

    @property
    def heatmap(self) -> dict | None:
        return self.meta.get("heatmap")

    def cam_weights(self) -> np.ndarray | None:
        """Class-activation weights (channels x classes) or None (channel-mean heatmap)."""
        heat = self.heatmap or {}
        name = heat.get("weights")
        if not name:
            return None
        try:
            weights = np.load(self.path / name, allow_pickle=False)
        except (OSError, ValueError) as err:
            raise BundleError(f"{self.source}: unreadable heatmap weights {name} ({err})") from None
        if weights.ndim != 2 or weights.shape[1] != len(self.labels):
            raise BundleError(
                f"{self.source}: heatmap weights have shape {weights.shape}, "
                f"expected (channels, {len(self.labels)})"
            )
        return weights.astype(np.float32)


def load_bundle(path: str | Path, allow_invalid: bool = False) -> Bundle:
    """Open and verify a bundle directory, ``.tar`` or ``.zip``.

    Raises:
        BundleError: missing, damaged (checksum mismatch), tampered (unlisted
            or unexpected files, edited metadata), unsupported format, or
            marked invalid by the parity gate (unless ``allow_invalid``).
    """
    source = Path(path)
    if not source.exists():
        raise BundleError(f"{source}: no such bundle", hint="make one with `leukoedge convert RUN_DIR --out BUNDLE`")
    keepalive = None
    if source.is_dir():
        root = source
    elif source.suffix == ".tar" or source.suffix == ".zip":
        tmp = tempfile.mkdtemp(prefix="leukoedge-bundle-")
        keepalive = _TempDir(tmp)
        root = extract_archive(source, Path(tmp))
    else:
        raise BundleError(f"{source}: not a bundle directory, .tar or .zip")
    verify_checksums(root, label=str(source))
    meta = _read_meta(root, str(source))
    spec, labels = _check_meta(root, meta, str(source))
    bundle = Bundle(path=root, source=source, meta=meta, spec=spec, labels=labels, _keepalive=keepalive)
    if not bundle.valid and not allow_invalid:
        raise BundleError(
            f"{source}: this bundle is marked invalid: {bundle.invalid_reason or 'no reason given'}",
            hint="its int8 model does not classify like the float model; re-convert it, or load it anyway "
            "for debugging only (`leukoedge serve --force-invalid-bundle`, `leukoedge bench latency "
            "--allow-invalid`, `load_bundle(..., allow_invalid=True)`)",
        )
    return bundle


class _TempDir:
    """Removes a private extraction directory when the owning Bundle is collected."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._finalizer = weakref.finalize(self, shutil.rmtree, path, True)


def read_manifest(root: Path, label: str) -> dict[str, str]:
    """Parse MANIFEST.sha256 into {file name: sha256}, refusing odd names."""
    manifest = root / MANIFEST_NAME
    if not manifest.is_file():
        raise BundleError(f"{label}: missing {MANIFEST_NAME}; not a bundle or damaged")
    entries: dict[str, str] = {}
    for lineno, line in enumerate(manifest.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        digest, sep, name = line.partition("  ")
        if not sep or len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise BundleError(f"{label}: {MANIFEST_NAME} line {lineno} is malformed")
        if not _is_plain_name(name) or name == MANIFEST_NAME:
            raise BundleError(f"{label}: {MANIFEST_NAME} lists an unsafe file name {name!r}")
        if name in entries:
            raise BundleError(f"{label}: {MANIFEST_NAME} lists {name} twice")
        entries[name] = digest
    return entries


def verify_checksums(root: Path, label: str) -> dict[str, str]:
    """Every listed file exists with its checksum; nothing unlisted is present."""
    entries = read_manifest(root, label)
    for name in REQUIRED_FILES:
        if name not in entries:
            raise BundleError(f"{label}: {MANIFEST_NAME} does not list the required file {name}")
    present = {p.name for p in root.iterdir()} - {MANIFEST_NAME}
    unlisted = sorted(present - set(entries))
    if unlisted:
        raise BundleError(
            f"{label}: unlisted file(s) {', '.join(unlisted)} in the bundle (tampered?)",
            hint="a bundle holds exactly the files in MANIFEST.sha256; re-copy it from the workstation",
        )
    for name, digest in entries.items():
        path = root / name
        if not path.is_file() or path.is_symlink():
            raise BundleError(f"{label}: {name} is listed in {MANIFEST_NAME} but missing")
        if sha256_file(path) != digest:
            raise BundleError(
                f"{label}: {name} is damaged or was modified (SHA-256 mismatch)",
                hint="re-copy the bundle; if you edited it on purpose, re-run `leukoedge convert`",
            )
    return entries


def _read_meta(root: Path, label: str) -> dict:
    try:
        meta = json.loads((root / META_NAME).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise BundleError(f"{label}: {META_NAME} is not valid JSON ({err})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise BundleError(f"{label}: {META_NAME} is not a leukoedge bundle description")
    if meta.get("format_version") != FORMAT_VERSION:
        raise BundleError(
            f"{label}: bundle format version {meta.get('format_version')!r} is not supported "
            f"(this leukoedge reads version {FORMAT_VERSION})",
            hint="convert the run again with this version of leukoedge",
        )
    return meta


def _check_meta(root: Path, meta: dict, label: str) -> tuple[PreprocessSpec, tuple[str, ...]]:
    """Cross-check bundle.json against itself and the other files."""
    try:
        labels = tuple(str(x) for x in meta["labels"])
        spec = PreprocessSpec.from_dict(meta["preprocessing"])
        model = meta["model"]
        _ = (model["name"], model["version"])
        inp = meta["input"]
        outputs = meta["outputs"]
        files = meta.get("files", {})
        valid = meta["valid"]
    except (KeyError, TypeError) as err:
        raise BundleError(f"{label}: {META_NAME} is missing field {err}") from None
    except LeukoEdgeError as err:
        raise BundleError(f"{label}: bad preprocessing spec in {META_NAME}: {err.message}") from None
    if not isinstance(valid, bool):
        raise BundleError(f"{label}: {META_NAME} 'valid' must be true or false")
    if len(labels) < 2 or len(set(labels)) != len(labels):
        raise BundleError(f"{label}: {META_NAME} needs at least two distinct labels, got {list(labels)}")
    file_labels = tuple(line for line in (root / LABELS_NAME).read_text(encoding="utf-8").splitlines() if line)
    if file_labels != labels:
        raise BundleError(f"{label}: {LABELS_NAME} {list(file_labels)} does not match {META_NAME} {list(labels)}")
    if inp.get("dtype") not in INPUT_DTYPES:
        raise BundleError(f"{label}: unsupported input dtype {inp.get('dtype')!r}; expected one of {INPUT_DTYPES}")
    shape = list(inp.get("shape", []))
    if len(shape) != 4 or shape[1:] != [spec.height, spec.width, 3]:
        raise BundleError(f"{label}: input shape {shape} does not match the preprocessing spec {spec.height}x{spec.width}x3")
    if not isinstance(outputs, dict) or "probabilities" not in outputs:
        raise BundleError(f"{label}: {META_NAME} must name a 'probabilities' output")
    for key, name in files.items():
        if not _is_plain_name(str(name)) or not (root / str(name)).is_file():
            raise BundleError(f"{label}: {META_NAME} refers to {key} file {name!r}, which is not in the bundle")
    heat = meta.get("heatmap")
    if heat and heat.get("output") not in outputs:
        raise BundleError(f"{label}: heatmap output {heat.get('output')!r} is not one of the outputs {list(outputs)}")
    weights = (heat or {}).get("weights")
    if weights and (not _is_plain_name(str(weights)) or not (root / str(weights)).is_file()):
        raise BundleError(f"{label}: heatmap weights file {weights!r} is not in the bundle")
    _check_scorer(root, meta.get("abstention"), outputs, label)
    _check_numbers(meta, label)
    _check_quality(meta, label)
    return spec, labels


#: Integer range of each quantised input dtype (the zero point must lie inside it).
_QUANT_RANGE = {"int8": (-128, 127), "uint8": (0, 255)}


def _number(value, what: str, label: str, *, positive: bool = False, allow_none: bool = False) -> float | None:
    """A finite real number from bundle.json, or BundleError naming the field (NaN/Infinity parse as JSON here)."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value):
        raise BundleError(f"{label}: {META_NAME} {what} is {value!r}, not a finite number",
                          hint="the bundle was edited or written by a broken converter; re-run `leukoedge convert`")
    if positive and value <= 0:
        raise BundleError(f"{label}: {META_NAME} {what} is {value!r}; it must be greater than 0",
                          hint="re-run `leukoedge convert` (a temperature of 0 would divide by zero on every image)")
    return float(value)


def _check_numbers(meta: dict, label: str) -> None:
    """Every number the device computes with is finite and in range, so a bad bundle fails at start-up.

    Without this, a temperature of 0 or NaN loads, reports healthy and answers
    every request with an error (issue 13).
    """
    for name in meta["labels"]:
        if not str(name).strip() or any(ord(c) < 32 for c in str(name)):
            raise BundleError(f"{label}: {META_NAME} has an empty or multi-line label {str(name)[:40]!r}")
    calibration = meta.get("calibration")
    if calibration is not None:
        if not isinstance(calibration, dict):
            raise BundleError(f"{label}: {META_NAME} 'calibration' must be an object")
        _number(calibration.get("temperature", 1.0), "calibration.temperature", label, positive=True)
        floor = _number(calibration.get("log_prob_floor"), "calibration.log_prob_floor", label, allow_none=True)
        if floor is not None and not 0.0 < floor < 1.0:
            raise BundleError(f"{label}: {META_NAME} calibration.log_prob_floor is {floor!r}; it must lie in (0, 1)",
                              hint="the bundle was edited or written by a broken converter; re-run `leukoedge convert`")
    abstention = meta.get("abstention") or {}
    if abstention:
        _number(abstention.get("threshold"), "abstention.threshold", label, allow_none=True)
        side = abstention.get("abstain_when")
        if side is not None and side not in ("below", "above"):
            raise BundleError(f"{label}: {META_NAME} abstention.abstain_when is {side!r}; use 'below' or 'above'")
        scorer = abstention.get("scorer")
        if isinstance(scorer, dict):
            _number(scorer.get("threshold"), "abstention.scorer.threshold", label, allow_none=True)
    for where, desc in [("input", meta["input"])] + [(f"outputs.{k}", v) for k, v in meta["outputs"].items()]:
        quant = (desc or {}).get("quantization") if isinstance(desc, dict) else None
        if not quant:
            continue
        dtype = desc.get("dtype")
        scale = _number(quant.get("scale", 0.0), f"{where}.quantization.scale", label)
        zero = quant.get("zero_point", 0)
        if isinstance(zero, bool) or not isinstance(zero, int):
            raise BundleError(f"{label}: {META_NAME} {where}.quantization.zero_point is {zero!r}, not an integer")
        if dtype in _QUANT_RANGE:
            lo, hi = _QUANT_RANGE[dtype]
            if scale <= 0 or not lo <= zero <= hi:
                raise BundleError(f"{label}: {META_NAME} {where} is {dtype} with scale {scale:g} and zero point "
                                  f"{zero}; a quantised tensor needs scale > 0 and a zero point in [{lo}, {hi}]")


# --- issue 15: the capture quality gate's section (leukoedge.quality owns the rules) ---
def _check_quality(meta: dict, label: str) -> None:
    """``quality``, when present, holds finite thresholds in range; absent or null: a bundle without the gate.

    A NaN focus limit would pass every capture and a negative clipped-pixel
    limit refuse every one, silently: refuse the bundle at load instead.
    """
    section = meta.get("quality")
    if section is None:
        return
    try:
        QualityThresholds.from_dict(section)
    except LeukoEdgeError as err:
        raise BundleError(f"{label}: {META_NAME} {err.message}",
                          hint="the bundle was edited or written by a broken converter; re-run `leukoedge convert`") from None
# --- end issue 15 quality section ---


def _check_scorer(root: Path, abstention, outputs: dict, label: str) -> None:
    """A fitted abstention scorer names its array files and the model output it reads."""
    if abstention is not None and not isinstance(abstention, dict):
        raise BundleError(f"{label}: {META_NAME} 'abstention' must be an object or null")
    scorer = (abstention or {}).get("scorer")
    if not scorer:
        return
    files = scorer.get("files") if isinstance(scorer, dict) else None
    if not isinstance(files, dict) or not files:
        raise BundleError(f"{label}: {META_NAME} abstention.scorer must list its array files")
    for name, filename in files.items():
        if not _is_plain_name(str(filename)) or not str(filename).endswith(".npy") or not (root / str(filename)).is_file():
            raise BundleError(f"{label}: abstention array {name!r} file {filename!r} is not in the bundle")
    if scorer.get("input") == "features" and "features" not in outputs:
        raise BundleError(f"{label}: the abstention score reads the 'features' output, which the model does not have")


def _is_plain_name(name: str) -> bool:
    return bool(name) and name not in (".", "..") and "/" not in name and "\\" not in name and "\x00" not in name


# ----------------------------------------------------------------- extraction
def extract_archive(archive: Path, dest: Path) -> Path:
    """Safely unpack ``archive`` into ``dest`` and return the bundle root.

    Refused: absolute paths, ``..`` components, links, devices, nested folders
    and archives that would unpack to more than :data:`MAX_EXTRACTED_BYTES`.
    Members may sit at the top level or under one folder (as
    :func:`make_archive` writes them).
    """
    members = _tar_members(archive) if archive.suffix == ".tar" else _zip_members(archive)
    prefixes = {parts[0] for parts, _ in members if len(parts) == 2}
    flat = all(len(parts) == 1 for parts, _ in members)
    if not members:
        raise BundleError(f"{archive}: the archive is empty")
    if not flat and (len(prefixes) != 1 or any(len(parts) != 2 for parts, _ in members)):
        raise BundleError(f"{archive}: unexpected layout; a bundle archive holds one flat folder of files")
    total = 0
    for parts, data in members:
        total += len(data)
        if total > MAX_EXTRACTED_BYTES:
            raise BundleError(f"{archive}: unpacks to more than {MAX_EXTRACTED_BYTES // 1024**2} MB; refused")
        target = dest / parts[-1]
        if target.exists():
            raise BundleError(f"{archive}: {parts[-1]} appears twice in the archive")
        target.write_bytes(data)
    return dest


def _check_member_name(archive: Path, name: str) -> tuple[str, ...]:
    pure = PurePosixPath(name.replace("\\", "/"))
    if pure.is_absolute() or any(p in ("..", "") for p in pure.parts) or name.startswith("/"):
        raise BundleError(f"{archive}: member {name!r} would escape the bundle folder (path traversal); refused")
    parts = tuple(p for p in pure.parts if p != ".")
    if not parts or len(parts) > 2 or not all(_is_plain_name(p) for p in parts):
        raise BundleError(f"{archive}: unexpected member {name!r}")
    return parts


def _tar_members(archive: Path):
    try:
        tar = tarfile.open(archive, "r:*")
    except (tarfile.TarError, OSError) as err:
        raise BundleError(f"{archive}: not a readable tar archive ({err})") from None
    out = []
    with tar:
        try:
            infos = tar.getmembers()
        except (tarfile.TarError, OSError, EOFError) as err:
            raise BundleError(f"{archive}: damaged tar archive ({err})") from None
        for info in infos:
            parts = _check_member_name(archive, info.name)
            if info.isdir():
                if len(parts) != 1:
                    raise BundleError(f"{archive}: unexpected folder {info.name!r}")
                continue
            if not info.isfile():
                raise BundleError(f"{archive}: member {info.name!r} is a link or device; refused")
            if info.size > MAX_EXTRACTED_BYTES:
                raise BundleError(f"{archive}: member {info.name!r} is too large")
            try:
                data = tar.extractfile(info).read()
            except (tarfile.TarError, OSError, EOFError) as err:
                raise BundleError(f"{archive}: damaged member {info.name!r} ({err})") from None
            out.append((parts, data))
    return out


def _zip_members(archive: Path):
    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError) as err:
        raise BundleError(f"{archive}: not a readable zip archive ({err})") from None
    out = []
    with zf:
        infos = zf.infolist()
        if sum(i.file_size for i in infos) > MAX_EXTRACTED_BYTES:
            raise BundleError(f"{archive}: unpacks to more than {MAX_EXTRACTED_BYTES // 1024**2} MB; refused")
        for info in infos:
            parts = _check_member_name(archive, info.filename)
            if info.is_dir():
                if len(parts) != 1:
                    raise BundleError(f"{archive}: unexpected folder {info.filename!r}")
                continue
            mode = (info.external_attr >> 16) & 0o170000
            if mode and mode != 0o100000:
                raise BundleError(f"{archive}: member {info.filename!r} is a link or device; refused")
            try:
                data = zf.read(info)
            except (zipfile.BadZipFile, OSError, EOFError, ValueError) as err:
                raise BundleError(f"{archive}: damaged member {info.filename!r} ({err})") from None
            out.append((parts, data))
    return out


def copy_into(src: Path, dest_dir: Path, name: str | None = None) -> Path:
    """Copy one file into a bundle staging dir (used by the writer)."""
    target = dest_dir / (name or src.name)
    shutil.copyfile(src, target)
    return target


__all__ = [
    "Bundle",
    "load_bundle",
    "write_manifest",
    "make_archive",
    "extract_archive",
    "verify_checksums",
    "FORMAT_VERSION",
]
