"""Which TFLite runtime and which delegate: LiteRT discovery and Edge TPU selection.

The device must never need TensorFlow, so the interpreter comes from
``ai_edge_litert`` (Google's current package) or, on older installs,
``tflite_runtime``. There is deliberately no ``tensorflow.lite`` fallback: it
would drag a 500 MB dependency onto a Raspberry Pi and hide a broken install.

Edge TPU: a bundle made with ``convert --edgetpu`` on a machine with
``edgetpu_compiler`` carries ``model_edgetpu.tflite``; it runs only with the
``libedgetpu`` delegate. :func:`select_delegate` is pure apart from the
``loader`` it is given, so delegate selection is tested with a fake loader.
What can fail: :class:`RuntimeUnavailableError` when no runtime is installed,
or when ``edgetpu="on"`` and the Edge TPU cannot be used.
"""
from __future__ import annotations

import importlib
import importlib.metadata
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..errors import RuntimeUnavailableError, UsageError

#: The Edge TPU runtime library per OS (from Coral's documentation).
EDGETPU_LIBRARY = {"Linux": "libedgetpu.so.1", "Darwin": "libedgetpu.1.dylib", "Windows": "edgetpu.dll"}
#: auto: use the Edge TPU when present, else the CPU with a reason in info();
#: on: require it (error otherwise); off: CPU only.
EDGETPU_MODES = ("auto", "on", "off")
#: (import path, distribution name) in order of preference.
_RUNTIMES = (("ai_edge_litert.interpreter", "ai-edge-litert"), ("tflite_runtime.interpreter", "tflite-runtime"))


@dataclass(frozen=True)
class LiteRT:
    """One importable TFLite runtime."""

    name: str
    version: str
    interpreter_cls: Any
    load_delegate: Callable[..., Any]


def find_litert() -> LiteRT:
    """The first installed TFLite runtime (never TensorFlow)."""
    tried = []
    for module_name, dist in _RUNTIMES:
        try:
            module = importlib.import_module(module_name)
        except ImportError as err:
            tried.append(f"{dist} ({err})")
            continue
        try:
            version = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            version = "unknown"
        return LiteRT(dist, version, module.Interpreter, module.load_delegate)
    raise RuntimeUnavailableError(
        "no TFLite runtime is installed (tried " + "; ".join(tried) + ")",
        hint="pip install 'leukoedge[edge]' (installs ai-edge-litert)",
    )


def edgetpu_library() -> str:
    return EDGETPU_LIBRARY.get(platform.system(), "libedgetpu.so.1")


@dataclass(frozen=True)
class DelegateChoice:
    """The model file to load, the delegates to pass, and why.

    Attributes:
        model_path: ``model_edgetpu.tflite`` when the Edge TPU is used, else ``model.tflite``.
        delegates: delegate objects for the interpreter (empty on the CPU).
        delegate: ``"edgetpu"`` or ``"cpu"``.
        fallback_reason: why the CPU is used although an Edge TPU was wanted, else None.
    """

    model_path: Path
    delegates: tuple
    delegate: str
    fallback_reason: str | None = None


def select_delegate(cpu_model: Path, edgetpu_model: Path | None, edgetpu: str, loader: Callable[[str], Any]) -> DelegateChoice:
    """Decide between the Edge TPU and the CPU.

    The Edge TPU library is only loaded when the bundle has a compiled model,
    because an uncompiled model gains nothing from the delegate.
    """
    if edgetpu not in EDGETPU_MODES:
        raise UsageError(f"edgetpu={edgetpu!r} is not one of {', '.join(EDGETPU_MODES)}")
    if edgetpu == "off":
        return DelegateChoice(cpu_model, (), "cpu", None)
    if edgetpu_model is None:
        reason = (
            "this bundle has no model_edgetpu.tflite; re-run `leukoedge convert --edgetpu` "
            "on a machine with edgetpu_compiler to use a Coral Edge TPU"
        )
        if edgetpu == "on":
            raise RuntimeUnavailableError(f"Edge TPU requested but {reason}")
        return DelegateChoice(cpu_model, (), "cpu", reason)
    library = edgetpu_library()
    try:
        delegate = loader(library)
    except (OSError, ValueError, RuntimeError) as err:
        reason = f"Edge TPU runtime {library} could not be loaded ({err}); running on the CPU"
        if edgetpu == "on":
            raise RuntimeUnavailableError(
                f"Edge TPU requested but {library} could not be loaded ({err})",
                hint="install libedgetpu1-std from Coral's apt repository and plug in the Edge TPU",
            ) from None
        return DelegateChoice(cpu_model, (), "cpu", reason)
    return DelegateChoice(edgetpu_model, (delegate,), "edgetpu", None)
