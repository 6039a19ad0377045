"""The device-side classifier: one interpreter per process, safe across threads.

``Classifier(bundle)`` builds the LiteRT interpreter once (habit 8: never per
request or frame), checks that the model's tensors match ``bundle.json``, and
``classify(source)`` runs the ONE preprocessing path, the model and the pure
post-processing. The parity gate in ``convert`` calls :meth:`Classifier.run`
so the converted model is validated through exactly this code.

Thread safety: LiteRT interpreters are not re-entrant, so setting the input,
invoking and reading the outputs happen under one lock; decoding and
post-processing run outside it, in the caller's thread.

What can fail: :class:`BundleError` (the model does not match its bundle),
:class:`RuntimeUnavailableError` (no LiteRT, or ``edgetpu="on"`` without an
Edge TPU), :class:`InvalidImageError` (bad input image).
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image

from .. import __version__
from ..bundle import Bundle, load_bundle
from ..errors import BundleError, InvalidImageError, UsageError
from ..decode import open_pending
from ..preprocess import decode_rgb, decode_size, load_image, prepare, to_rgb
from ..stats.calibration import temperature_scale_probs
from . import adapters, heatmap as heatmaps, postprocess
from .backend import DelegateChoice, LiteRT, find_litert, select_delegate


@dataclass(frozen=True)
class Prediction:
    """The result of one classification.

    Attributes:
        label: the most probable class.
        probabilities: class name -> probability (after calibration temperature).
        confidence: probability of ``label``.
        abstained: True when the image is "not like the training images".
        ood_score: the bundle's abstention score (for ``max_softmax`` the top
            probability: low = unusual; for ``mahalanobis`` / ``knn`` a distance
            in feature space: high = unusual; see ``postprocess``) or None.
            Always computed on the model's output BEFORE temperature scaling.
        ood_score_name: the name of that score (None without abstention).
        latency_ms: wall time of the whole call.
        timings: ``preprocess_ms``, ``invoke_ms``, ``postprocess_ms``.
        heatmap: float32 HxW (model input size) in [0, 1], or None.
        class_index: index of ``label`` in the bundle's labels.
    """

    label: str
    probabilities: dict[str, float]
    confidence: float
    abstained: bool
    ood_score: float | None
    latency_ms: float
    timings: dict[str, float]
    heatmap: np.ndarray | None = field(default=None, repr=False)
    class_index: int = 0
    ood_score_name: str | None = None

    def to_dict(self, include_heatmap: bool = False) -> dict:
        """JSON-ready dict (the heatmap, large, only on request).

        ``label`` is None when the model abstained; its top class is always ``predicted``.
        """
        out = {
            "label": None if self.abstained else self.label,
            "predicted": self.label,
            "probabilities": dict(self.probabilities),
            "confidence": self.confidence,
            "abstained": self.abstained,
            "ood_score": self.ood_score,
            "ood_score_name": self.ood_score_name,
            "latency_ms": self.latency_ms,
            "timings": dict(self.timings),
            "has_heatmap": self.heatmap is not None,
        }
        if include_heatmap and self.heatmap is not None:
            out["heatmap"] = np.round(self.heatmap, 4).tolist()
        return out


@dataclass(frozen=True)
class RawOutput:
    """Dequantised model outputs for one image (no temperature, no abstention)."""

    probabilities: np.ndarray
    features: np.ndarray | None
    invoke_ms: float


class Classifier:
    """Classify images with a verified bundle.

    Args:
        bundle: a :class:`~leukoedge.bundle.Bundle` (or a path, loaded with checks).
        num_threads: interpreter CPU threads (None: the runtime's default).
        edgetpu: ``"auto"`` (Edge TPU when present, else CPU with the reason in
            :meth:`info`), ``"on"`` (required) or ``"off"``.
        delegate_loader: loads a delegate library by name; defaults to the
            runtime's ``load_delegate``. Tests pass a fake.
        litert: the runtime to use (default: :func:`find_litert`).
    """

    def __init__(
        self,
        bundle: Bundle | str | Path,
        num_threads: int | None = None,
        edgetpu: str = "auto",
        *,
        delegate_loader: Callable[[str], Any] | None = None,
        litert: LiteRT | None = None,
    ) -> None:
        if num_threads is not None and (not isinstance(num_threads, int) or num_threads < 1):
            raise UsageError(f"num_threads must be a positive integer or None, got {num_threads!r}")
        self.bundle = bundle if isinstance(bundle, Bundle) else load_bundle(bundle)
        self._litert = litert or find_litert()
        self._num_threads = num_threads
        choice = select_delegate(
            self.bundle.model_path,
            self.bundle.edgetpu_model_path,
            edgetpu,
            delegate_loader or self._litert.load_delegate,
        )
        self._interpreter, self._choice = self._make_interpreter(choice, edgetpu)
        self._inputs, self._outputs = adapters.signature_tensors(self._interpreter)
        self._input = self._check_tensors()
        self._lock = threading.Lock()
        heat = self.bundle.heatmap
        self._heat_output = heat.get("output") if heat else None
        self._cam_weights = self.bundle.cam_weights() if heat else None
        # The feature map is read when a heatmap or a feature-based abstention score needs it.
        self._feature_output = self._heat_output or ("features" if "features" in self.bundle.output_names else None)
        if self.bundle.abstention and self.bundle.abstention.get("score"):
            postprocess.abstain_side(self.bundle.abstention)  # unknown score or side: fail now, not per image
        self._scorer = self._load_scorer()
        self._bundle_sha256 = self.bundle.sha256
        calibration = self.bundle.calibration
        self._temperature = float(calibration.get("temperature", 1.0))
        floor = calibration.get("log_prob_floor")
        self._log_prob_floor = None if floor is None else float(floor)

    # -- set-up -------------------------------------------------------------
    def _load_scorer(self):
        """The bundle's fitted abstention scorer (Mahalanobis / kNN), or None for rule-only bundles."""
        state = self.bundle.ood_state()
        if state is None:
            return None
        from .ood import OODScorer

        meta, arrays = state
        scorer = OODScorer.from_state({**meta, "arrays": sorted(arrays)}, arrays)
        if scorer.input == "features" and "features" not in self.bundle.output_names:
            raise BundleError(f"{self.bundle.source}: the abstention score needs the 'features' output")
        if scorer.input == "features":
            self._feature_output = "features"
        return scorer

    def _make_interpreter(self, choice: DelegateChoice, edgetpu: str):
        cls = self._litert.interpreter_cls
        try:
            interp = cls(
                model_path=str(choice.model_path),
                experimental_delegates=list(choice.delegates) or None,
                num_threads=self._num_threads,
            )
            interp.allocate_tensors()
            return interp, choice
        except (ValueError, RuntimeError) as err:
            if choice.delegate == "edgetpu" and edgetpu == "auto":
                fallback = DelegateChoice(
                    self.bundle.model_path, (), "cpu", f"the Edge TPU model failed to load ({err}); running on the CPU"
                )
                return self._make_interpreter(fallback, "off")
            raise BundleError(f"{self.bundle.source}: {choice.model_path.name} cannot be loaded by {self._litert.name} ({err})") from None

    def _check_tensors(self) -> dict:
        """The model's signature must match what bundle.json promises."""
        meta_in = self.bundle.input
        name = meta_in.get("name", "image")
        if name not in self._inputs or len(self._inputs) != 1:
            raise BundleError(f"{self.bundle.source}: the model's inputs {sorted(self._inputs)} are not [{name!r}]")
        details = self._inputs[name]
        dtype = np.dtype(details["dtype"]).name
        shape = [int(d) for d in details["shape"]]  # numpy ints would print as np.int32(1)
        if dtype != meta_in["dtype"] or shape[1:] != [int(d) for d in meta_in["shape"][1:]]:
            raise BundleError(
                f"{self.bundle.source}: the model's input is {dtype} {shape}, "
                f"bundle.json says {meta_in['dtype']} {list(meta_in['shape'])}"
            )
        scale, zero = adapters.quant_params(details)
        promised = meta_in.get("quantization") or {}
        if not np.isclose(scale, float(promised.get("scale", 0.0)), rtol=1e-6) or zero != int(promised.get("zero_point", 0)):
            raise BundleError(
                f"{self.bundle.source}: the model's input quantisation (scale {scale:g}, zero point {zero}) "
                f"differs from bundle.json ({promised})"
            )
        missing = sorted(set(self.bundle.output_names) - set(self._outputs))
        if missing:
            raise BundleError(f"{self.bundle.source}: the model has no output(s) {missing}; it has {sorted(self._outputs)}")
        return details

    # -- inference ----------------------------------------------------------
    def decode(self, source) -> np.ndarray:
        """uint8 RGB of a file or bytes at the least resolution this model needs (2x its input).

        :meth:`classify` of the returned array gives exactly what :meth:`classify`
        of ``source`` gives, so a caller that also wants the pixels (the app's
        thumbnail and heatmap) decodes once.
        """
        return decode_rgb(source, self.bundle.spec)

    def decode_plan(self, source):
        """The checked header and memory estimate of decoding ``source`` for this model, nothing decoded.

        A context manager (:class:`leukoedge.decode.PendingImage`); its ``decode()``
        returns a Pillow image, :meth:`decode` the RGB array.
        """
        return open_pending(source, min_size=decode_size(self.bundle.spec))

    def to_pixels(self, source) -> np.ndarray:
        """Any accepted source -> model-sized uint8 RGB through the ONE preprocessing path."""
        spec = self.bundle.spec
        if isinstance(source, np.ndarray):
            if source.dtype != np.uint8:
                raise InvalidImageError(f"expected a uint8 image array, got {source.dtype}")
            return prepare(source, spec)
        if isinstance(source, Image.Image):
            return prepare(to_rgb(source), spec)
        return load_image(source, spec)

    def run(self, pixels: np.ndarray) -> RawOutput:
        """Invoke the model on one model-sized uint8 RGB image (the parity gate's entry)."""
        if pixels.shape != (*self.bundle.spec.size, 3) or pixels.dtype != np.uint8:
            raise InvalidImageError(
                f"expected uint8 {self.bundle.spec.height}x{self.bundle.spec.width}x3, got {pixels.dtype} {pixels.shape}"
            )
        with self._lock:
            start = time.perf_counter()
            adapters.set_input(self._interpreter, self._input, pixels)
            self._interpreter.invoke()
            probs = adapters.get_output(self._interpreter, self._outputs["probabilities"])
            feats = adapters.get_output(self._interpreter, self._outputs[self._feature_output]) if self._feature_output else None
            invoke_ms = (time.perf_counter() - start) * 1000.0
        return RawOutput(postprocess.normalise(probs), feats, invoke_ms)

    def classify(self, source, *, heatmap: bool = True) -> Prediction:
        """Classify bytes, a path, a file object, a PIL image or a uint8 array."""
        t0 = time.perf_counter()
        pixels = self.to_pixels(source)
        t1 = time.perf_counter()
        raw = self.run(pixels)
        t2 = time.perf_counter()
        probs = temperature_scale_probs(raw.probabilities, self._temperature, self._log_prob_floor)
        idx, label, confidence = postprocess.top1(probs, self.bundle.labels)
        # Thresholds are chosen on the model's own output (convert / leukoedge.train.ood), so
        # the score sees the probabilities before temperature scaling.
        score, abstained = self.abstain(raw)
        heat = None
        if heatmap and self._heat_output and raw.features is not None:
            cam = heatmaps.class_activation_map(raw.features, self._cam_weights, idx)
            heat = heatmaps.normalise_map(cam, self.bundle.spec.size)
        t3 = time.perf_counter()
        return Prediction(
            label=label,
            probabilities={name: float(p) for name, p in zip(self.bundle.labels, probs)},
            confidence=confidence,
            abstained=abstained,
            ood_score=score,
            latency_ms=(t3 - t0) * 1000.0,
            timings={
                "preprocess_ms": (t1 - t0) * 1000.0,
                "invoke_ms": raw.invoke_ms,
                "postprocess_ms": (t3 - t2) * 1000.0,
            },
            heatmap=heat,
            class_index=idx,
            ood_score_name=(self.bundle.abstention or {}).get("score") or None,
        )

    def abstain(self, raw: RawOutput) -> tuple[float | None, bool]:
        """(ood_score, abstained) for one :meth:`run` output, by the rule stored in the bundle.

        ``convert`` measures abstention through this method, so its report is
        what the device does.
        """
        return postprocess.abstain(raw.probabilities, raw.features, self.bundle.abstention, self._scorer)

    def info(self) -> dict:
        """What is running: model, version, runtime, delegate and any fallback reason."""
        meta = self.bundle.meta
        return {
            "model": self.bundle.name,
            "version": self.bundle.version,
            "created": meta["model"].get("created"),
            "quantize": meta.get("quantize"),
            "labels": list(self.bundle.labels),
            "input": {"height": self.bundle.spec.height, "width": self.bundle.spec.width, "dtype": self.bundle.input["dtype"]},
            "runtime": self._litert.name,
            "runtime_version": self._litert.version,
            "leukoedge_version": __version__,
            "delegate": self._choice.delegate,
            "model_file": self._choice.model_path.name,
            "fallback_reason": self._choice.fallback_reason,
            "num_threads": self._num_threads,
            "heatmap": self._heat_output is not None,
            "heatmap_method": (self.bundle.heatmap or {}).get("method"),
            "abstention": _abstention_info(self.bundle.abstention),
            "temperature": self._temperature,
            "valid": self.bundle.valid,
            "invalid_reason": self.bundle.invalid_reason,
            "bundle": str(self.bundle.source),
            "bundle_sha256": self._bundle_sha256,
        }


def _abstention_info(abstention: dict | None) -> dict | None:
    """The abstention rule without the bulky scorer details (JSON-safe for the app's /info)."""
    if not abstention:
        return abstention
    info = {k: v for k, v in abstention.items() if k != "scorer"}
    if abstention.get("scorer"):
        info["scorer"] = {k: abstention["scorer"].get(k) for k in ("method", "input")}
    return info
