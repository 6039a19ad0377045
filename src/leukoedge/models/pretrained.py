"""Pretrained backbones shipped inside the package (``leukoedge train --init NAME``).

Why: on a lab's own 200-300 images a net trained from scratch is mostly
noise over folds (leuko-small: 82 +/- 15 % over five folds of 260 images),
and the usual cure, ImageNet weights, cannot be downloaded on an offline
workstation and does not fit int8 compact nets anyway. So the package
carries leuko-small's feature extractor trained on blood smears, a few
hundred KB, and ``--init`` starts a new run from it: every layer up to and
including ``features`` is copied, the classifier (``probabilities``) is new
because the lab's classes are its own.

File format (one ``.npz``, read with numpy only, ``allow_pickle=False``):
one array per weight, keyed ``"<layer name>/<index>"`` in
``layer.get_weights()`` order, and ``__meta__``: a JSON string with the
name, version, architecture, input size, colour step, the data it was
trained on (its provenance, which every model card that uses it repeats),
the command that made it and its figures. The SHA-256 of the file is taken
when it is opened, so a run records exactly which bytes it started from.

A backbone is named (:data:`SHIPPED`, resolved inside the installed package,
never over a network) or given as a path to a file of the same format (a
lab's own, made by ``benchmarks/make_backbone.py``).

What can fail: :class:`BackboneError` (unknown name, missing, damaged or
foreign file), :class:`UsageError` (a model whose layers do not match).
"""
from __future__ import annotations

import hashlib
import io
import json
import zipfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from ..errors import BackboneError, UsageError
from ..files import atomic_path

FORMAT = "leukoedge-backbone"
FORMAT_VERSION = 1
#: Backbones inside the package: name -> file in ``leukoedge/models/weights/``.
SHIPPED = {"leukoedge-smear": "leukoedge-smear-v1.npz"}
#: Layers never copied: the classifier is the lab's own (its classes, its count).
HEAD_LAYERS = ("probabilities",)
META_KEY = "__meta__"
#: A backbone of a compact net is well under 1 MB (mobilenetv2-1.0's would be ~9 MB); anything far larger is
#: not one, and is refused before it is read into memory.
MAX_FILE_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class Backbone:
    """An opened backbone file.

    Attributes:
        meta: the ``__meta__`` record (name, version, model, input_size, colour, provenance, ...).
        weights: layer name -> that layer's weight arrays, in ``get_weights()`` order.
        source: the shipped name or the path it was read from.
        sha256: hex digest of the file's bytes.
    """

    meta: dict
    weights: dict[str, list[np.ndarray]]
    source: str
    sha256: str

    @property
    def name(self) -> str:
        return str(self.meta["name"])

    @property
    def model(self) -> str:
        return str(self.meta["model"])

    def check_model(self, model_name: str) -> None:
        """Refuse a registry model other than the backbone's own architecture."""
        if model_name != self.model:
            raise UsageError(f"the backbone {self.name!r} ({self.source}) is a {self.model} feature extractor, "
                             f"not {model_name}",
                             hint=f"use --model {self.model}, or drop --init to train {model_name} from scratch")

    def record(self) -> dict:
        """What a run stores about its initialisation (config.json, the model card)."""
        keys = ("name", "version", "model", "input_size", "colour", "provenance", "trained_with", "figures")
        return {"source": self.source, "sha256": self.sha256, "layers": len(self.weights),
                **{k: self.meta.get(k) for k in keys}}


def list_backbones() -> list[str]:
    return sorted(SHIPPED)


def shipped_path(name: str):
    """The package resource of a shipped backbone (a Traversable; no network, no download)."""
    return resources.files("leukoedge.models").joinpath("weights", SHIPPED[name])


def source_key(name_or_path: str | Path) -> str:
    """How a run records where its backbone came from: the shipped name, or the file's absolute path."""
    key = str(name_or_path)
    return key if key in SHIPPED else str(Path(key).expanduser().resolve())


def load_backbone(name_or_path: str | Path) -> Backbone:
    """Open a shipped backbone by name, or a backbone file by path; check it is whole."""
    key = source_key(name_or_path)
    if key in SHIPPED:
        resource = shipped_path(key)
        if not resource.is_file():
            raise BackboneError(f"the shipped backbone {key!r} is missing from this installation ({SHIPPED[key]})",
                                hint="reinstall leukoedge; the file ships inside the wheel")
        data = resource.read_bytes()
    else:
        path = Path(key)
        if path.suffix != ".npz" and not path.exists():
            raise BackboneError(f"unknown backbone {str(name_or_path)!r}; shipped: {', '.join(list_backbones())}",
                                hint="pass a shipped name, or the path of a .npz made by benchmarks/make_backbone.py")
        try:
            size = path.stat().st_size
            if size > MAX_FILE_BYTES:
                raise BackboneError(f"{path} is {size / 2**20:.0f} MB: not a leukoedge backbone (they are under "
                                    f"{MAX_FILE_BYTES // 2**20} MB)")
            data = path.read_bytes()
        except OSError as err:
            raise BackboneError(f"cannot read the backbone file {path}: {err.strerror or err}") from None
    return _parse(data, key)


def _parse(data: bytes, source: str) -> Backbone:
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as err:
        raise BackboneError(f"{source} is not a readable backbone file (damaged or not an .npz): {err}") from None
    if META_KEY not in arrays:
        raise BackboneError(f"{source} has no {META_KEY} record: not a leukoedge backbone file")
    try:
        meta = json.loads(str(arrays.pop(META_KEY)))
    except ValueError:
        raise BackboneError(f"{source}: its {META_KEY} record is not JSON (damaged file)") from None
    if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
        raise BackboneError(f"{source} is format {meta.get('format')!r} v{meta.get('format_version')}, "
                            f"not {FORMAT} v{FORMAT_VERSION}", hint="make it again with benchmarks/make_backbone.py")
    missing = [k for k in ("name", "version", "model", "input_size", "colour", "layers") if k not in meta]
    if missing:
        raise BackboneError(f"{source}: its record lacks {', '.join(missing)}")
    weights: dict[str, list[np.ndarray]] = {}
    for layer, count in meta["layers"].items():
        try:
            weights[layer] = [arrays.pop(f"{layer}/{i}") for i in range(int(count))]
        except KeyError as err:
            raise BackboneError(f"{source} lacks the weight {err.args[0]} (damaged or truncated file)") from None
    if arrays:
        raise BackboneError(f"{source} holds weights its record does not list: {', '.join(sorted(arrays)[:3])}")
    return Backbone(meta=meta, weights=weights, source=source, sha256=hashlib.sha256(data).hexdigest())


def backbone_layers(model) -> list:
    """The layers a backbone covers: every layer with weights except the classifier."""
    return [layer for layer in model.layers if layer.weights and layer.name not in HEAD_LAYERS]


def apply_backbone(model, backbone: Backbone, model_name: str) -> int:
    """Copy the backbone into ``model`` (a fresh registry model named ``model_name``); returns layers set.

    Refused, before anything is assigned, when the architecture differs or a
    layer's weight shapes do not match (another width, another net): a
    partial copy would train a net that is neither pretrained nor fresh.
    """
    backbone.check_model(model_name)
    layers = {layer.name: layer for layer in backbone_layers(model)}
    missing = sorted(set(layers) - set(backbone.weights))
    extra = sorted(set(backbone.weights) - set(layers))
    if missing or extra:
        raise UsageError(f"the backbone {backbone.name!r} does not match this {model_name}: "
                         f"{len(missing)} layer(s) it lacks ({', '.join(missing[:3])}), "
                         f"{len(extra)} it has and the model does not ({', '.join(extra[:3])})")
    for name, layer in layers.items():
        shapes = [tuple(w.shape) for w in layer.get_weights()]
        given = [tuple(w.shape) for w in backbone.weights[name]]
        if shapes != given:
            raise UsageError(f"backbone layer {name} has weight shapes {given}, the model {shapes}")
    for name, layer in layers.items():
        layer.set_weights(backbone.weights[name])
    return len(layers)


def export_backbone(model, path: str | Path, meta: dict) -> Path:
    """Write ``model``'s backbone (all but the classifier) and ``meta`` to ``path`` (atomic)."""
    layers = backbone_layers(model)
    arrays = {f"{layer.name}/{i}": np.asarray(w) for layer in layers for i, w in enumerate(layer.get_weights())}
    record = {"format": FORMAT, "format_version": FORMAT_VERSION, **meta,
              "layers": {layer.name: len(layer.get_weights()) for layer in layers}}
    arrays[META_KEY] = np.array(json.dumps(record, sort_keys=True))
    path = Path(path)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.savez_compressed(fh, **arrays)
    return path
