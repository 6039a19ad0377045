"""The model registry: every architecture by name, with its metadata.

Modelled on timm (``@register_model``, ``create_model``, ``list_models``) with
one improvement: an unknown name raises :class:`ModelNotFoundError` listing
the valid names. Each :class:`ModelEntry` carries what the rest of the
pipeline needs to know without building the model: default input size,
whether the input size may change, the documented parameter count (checked
by the tests, so a silent architecture change cannot slip through) and the
recommended training defaults (from the paper for the paper nets).

What can fail: :class:`ModelNotFoundError` (unknown name), :class:`UsageError`
(an input size the architecture cannot take, a duplicate registration).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable

from ..errors import ModelNotFoundError, UsageError


@dataclass(frozen=True)
class TrainDefaults:
    """Recommended hyper-parameters; the CLI uses them unless overridden.

    Attributes:
        epochs: maximum epochs (early stopping usually ends sooner).
        batch_size: global batch size.
        learning_rate: peak learning rate of the cosine schedule.
        optimizer: ``"adam"`` or ``"sgd"``.
        augment: augmentation recipe name (see ``leukoedge.train.augment``).
    """

    epochs: int = 30
    batch_size: int = 32
    learning_rate: float = 1e-3
    optimizer: str = "adam"
    augment: str = "default"


@dataclass(frozen=True)
class ModelEntry:
    """One registered architecture.

    Attributes:
        name: registry name (``seed-*`` for paper nets, others edge-first).
        builder: ``builder(input_size, num_classes, **kw) -> keras.Model``.
        default_input: square input size used when none is given.
        params: documented trainable+non-trainable parameter count at the
            default input size with 4 classes (tests assert it).
        family: ``"paper"`` or ``"edge"``.
        source: the paper file or design reference.
        summary: one line for ``--list-models``.
        min_input: smallest input size the architecture accepts.
        resizable: False when the parameter count depends on the input size
            (Flatten heads); the input size may still be changed.
        train: recommended :class:`TrainDefaults`.
    """

    name: str
    builder: Callable
    default_input: int
    params: int
    family: str
    source: str
    summary: str
    min_input: int = 32
    resizable: bool = True
    train: TrainDefaults = field(default_factory=TrainDefaults)


_REGISTRY: dict[str, ModelEntry] = {}


def register_model(name: str, *, default_input: int, params: int, family: str, source: str,
                   summary: str, min_input: int = 32, resizable: bool = True,
                   train: TrainDefaults | None = None) -> Callable:
    """Decorator registering ``builder(input_size, num_classes, **kw)`` under ``name``."""

    def wrap(builder: Callable) -> Callable:
        if name in _REGISTRY:
            raise UsageError(f"model {name!r} is registered twice")
        _REGISTRY[name] = ModelEntry(name, builder, default_input, params, family, source, summary,
                                     min_input, resizable, train or TrainDefaults())
        return builder

    return wrap


def list_models(family: str | None = None) -> list[str]:
    """Registered names, paper nets first, each group in registration order."""
    entries = [e for e in _REGISTRY.values() if family is None or e.family == family]
    return [e.name for e in sorted(entries, key=lambda e: e.family != "paper")]


def get_entry(name: str) -> ModelEntry:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ModelNotFoundError(
            f"unknown model {name!r}; registered models: {', '.join(list_models())}",
            hint="`leukoedge train --list-models` shows them with sizes and MACs",
        ) from None


def create_model(name: str, input_size: int | None = None, num_classes: int = 4, **kw):
    """Build a fresh (untrained) Keras model by registry name.

    Every model takes raw 0..255 RGB as input ``image`` of shape
    ``(None, S, S, 3)``, rescales inside, exposes a layer ``features`` (last
    spatial feature map) and ends in ``probabilities`` (float32 softmax).
    """
    entry = get_entry(name)
    size = int(input_size or entry.default_input)
    if size < entry.min_input:
        raise UsageError(f"{name} needs an input of at least {entry.min_input} px, got {size}")
    if num_classes < 2:
        raise UsageError(f"a classifier needs at least 2 classes, got {num_classes}")
    model = entry.builder(size, int(num_classes), **kw)
    model.leukoedge_name = name  # plain attribute, not serialised; handy in logs
    return model


def model_info(name: str, input_size: int | None = None, num_classes: int = 4) -> dict:
    """Build the model and report input size, parameters and analytic MACs."""
    from .macs import count_macs

    entry = get_entry(name)
    size = int(input_size or entry.default_input)
    model = create_model(name, size, num_classes)
    info = {
        "name": name,
        "family": entry.family,
        "input_size": size,
        "default_input": entry.default_input,
        "params": int(model.count_params()),
        "documented_params": entry.params,
        "macs": int(count_macs(model)),
        "source": entry.source,
        "summary": entry.summary,
        "train_defaults": asdict(entry.train),
    }
    del model
    return info
