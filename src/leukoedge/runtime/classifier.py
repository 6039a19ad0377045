"""The device-side classifier: one interpreter per process, safe across threads.

``Classifier(bundle)`` builds the LiteRT interpreter once (habit 8: never per
request or frame), checks that the model's tensors match ``bundle.json``, and
``classify(source)`` runs the ONE preprocessing path, the model and the pure
post-processing. The parity gate in ``convert`` calls :meth:`Classifier.run`
so the converted model is validated through exactly this code.

Two paths (issue 15). A bundle that does not record the scale it was trained
at gets what it always got: the whole frame stretched to the model input, one
tile. A bundle that does (``preprocessing.um_per_px``) gets the capture at the
training magnification: its um/px given (the microscope's calibration) or
estimated from its red cells (:mod:`leukoedge.scale`), the capture decoded at
no more resolution than that needs, rescaled, cut into model-size tiles,
the tiles holding a white cell classified and aggregated (:mod:`.tiling` says
how and why). When the scale cannot be estimated, the whole frame is stretched
as for an old bundle and the result says so (``scale_source="estimate-failed"``).
Where the bundle has quality thresholds and :mod:`leukoedge.quality` is
installed, the capture at the training scale is checked first; a failed check
marks the result ``retake`` (no label, the prediction still given). A stretched
frame is not checked: its scale is unknown, so its numbers are not comparable
with thresholds fitted at the training scale.

Thread safety: LiteRT interpreters are not re-entrant, so setting the input,
invoking and reading the outputs happen under one lock; decoding and
post-processing run outside it, in the caller's thread. No per-call state is
kept on the instance.

What can fail: :class:`BundleError` (the model does not match its bundle),
:class:`RuntimeUnavailableError` (no LiteRT, or ``edgetpu="on"`` without an
Edge TPU), :class:`InvalidImageError` (bad input image), :class:`ScaleError`
(a given um/px that cannot be right for the capture), :class:`UsageError`
(um/px not a positive number).
"""
from __future__ import annotations

import importlib
import io
import math
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image

from .. import __version__
from ..bundle import Bundle, load_bundle
from ..decode import MAX_SIDE, PendingImage, as_stream, open_pending, reduce_towards
from ..errors import BundleError, InvalidImageError, ScaleError, UsageError
from ..preprocess import apply_colour, decode_rgb, decode_size, load_image, prepare, resize, to_rgb
from ..stats.calibration import temperature_scale_probs
from . import adapters, heatmap as heatmaps, postprocess, tiling
from .backend import DelegateChoice, LiteRT, find_litert, select_delegate
from .tiling import TilePrediction

#: Red cells measured smaller than this (pixels across, on the reduced decode) are re-measured
#: on the full capture: below it the diameter's rounding error alone is several %.
MIN_RBC_PX = 12


@dataclass(frozen=True)
class Prediction:
    """The result of one classification: the field, and the tiles it was read from.

    Attributes:
        label: the most probable class of the field (``to_dict`` gives None when
            the field abstained or must be retaken; it is always ``predicted``).
        probabilities: class name -> probability (after calibration temperature);
            for a tiled capture the aggregate of the tiles (see ``aggregation``).
        confidence: probability of ``label``.
        abstained: True when the image is "not like the training images".
        ood_score: the bundle's abstention score (for ``max_softmax`` the top
            probability: low = unusual; for ``mahalanobis`` / ``knn`` a distance
            in feature space: high = unusual; see ``postprocess``) or None.
            Always computed on the model's output BEFORE temperature scaling.
            For a tiled capture the median over the classified tiles.
        ood_score_name: the name of that score (None without abstention).
        latency_ms: wall time of the whole call.
        timings: for a bundle with a training scale ``decode_ms``, ``scale_ms``
            (estimating the capture's um/px), ``tiles_ms`` (rescale, quality check,
            white-cell mask, cutting and colouring the tiles), ``invoke_ms`` (all tiles),
            ``aggregate_ms`` (per-tile post-processing, aggregation, heatmap), and for
            the latency benchmark's stages ``preprocess_ms`` (decode + scale + tiles) and
            ``postprocess_ms`` (= aggregate). A bundle without one keeps the three keys it
            always had: ``preprocess_ms``, ``invoke_ms``, ``postprocess_ms``.
        heatmap: float32 HxW in [0, 1] covering the whole capture, or None. A stretched
            capture gives it at the model input size; a tiled one at the rescaled
            capture's size (stitched from the tiles). Either way it is drawn over the
            capture by resizing it to the capture (``heatmap.overlay`` does).
        class_index: index of ``label`` in the bundle's labels.
        um_per_px: micrometres per capture pixel used (None when the bundle records
            no training scale, or when estimating it failed).
        scale_source: ``"given"``, ``"estimated"``, ``"bundle-unknown"`` (the bundle
            records no training scale: today's whole-frame stretch) or
            ``"estimate-failed"`` (no red cells measured: whole-frame stretch).
        scale_message: why that scale, for the user (None when given).
        tiles: one :class:`~leukoedge.runtime.tiling.TilePrediction` per tile, boxes
            in the capture's pixels; a stretched capture is one tile = the whole frame.
        aggregation: how the tiles became the field result, in words.
        quality: the capture-quality report (``QualityReport.to_dict()``, with
            ``no_white_cell`` added when no tile holds one), or None when not checked:
            the bundle has no thresholds, :mod:`leukoedge.quality` is not installed, or
            the frame was stretched (its scale unknown, so not comparable with the thresholds).
        retake: the capture failed a quality check: ``label`` is withheld in ``to_dict``,
            ``predicted`` is still given.
        capture_size: (height, width) of the capture as given, in its pixels.
        tiling: the tile plan (:meth:`TilePlan.to_dict`): grid, rescaled size, fit.
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
    um_per_px: float | None = None
    scale_source: str = "bundle-unknown"
    scale_message: str | None = None
    tiles: tuple[TilePrediction, ...] = ()
    aggregation: str = "one tile: the whole frame stretched to the model input"
    quality: dict | None = None
    retake: bool = False
    capture_size: tuple[int, int] | None = None
    tiling: dict | None = None

    def to_dict(self, include_heatmap: bool = False) -> dict:
        """JSON-ready dict (the heatmap, large, only on request).

        ``label`` is None when the model abstained or the capture must be retaken;
        its top class is always ``predicted``.
        """
        out = {
            "label": None if self.abstained or self.retake else self.label,
            "predicted": self.label,
            "probabilities": dict(self.probabilities),
            "confidence": self.confidence,
            "abstained": self.abstained,
            "ood_score": self.ood_score,
            "ood_score_name": self.ood_score_name,
            "latency_ms": self.latency_ms,
            "timings": dict(self.timings),
            "has_heatmap": self.heatmap is not None,
            "um_per_px": self.um_per_px,
            "scale_source": self.scale_source,
            "scale_message": self.scale_message,
            "retake": self.retake,
            "quality": self.quality,
            "aggregation": self.aggregation,
            "capture_size": list(self.capture_size) if self.capture_size is not None else None,
            "tiling": self.tiling,
            "tiles": [t.to_dict() for t in self.tiles],
        }
        if include_heatmap and self.heatmap is not None:
            out["heatmap"] = np.round(self.heatmap, 4).tolist()
        return out


@dataclass(frozen=True)
class Capture:
    """Decoded pixels of a capture, and the size it was taken at.

    A file is decoded at no more resolution than this model needs at the capture's
    scale, so ``rgb`` may be smaller than the capture; ``um_per_px`` given to
    :meth:`Classifier.classify` and the tiles' boxes always refer to ``full_size``.
    ``data`` (the encoded file) lets the classifier decode again at more resolution
    when an estimated scale needs it.
    """

    rgb: np.ndarray
    full_size: tuple[int, int]
    data: bytes | None = field(default=None, repr=False)

    @property
    def reduction(self) -> float:
        """Capture pixels per ``rgb`` pixel (the long side's ratio: decoding keeps the aspect ratio)."""
        h, w = self.rgb.shape[:2]
        return max(self.full_size) / max(h, w)


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
        tile_overlap: least overlap of neighbouring tiles, as a fraction of a tile, for
            bundles that record their training scale (see :mod:`.tiling`).
    """

    def __init__(
        self,
        bundle: Bundle | str | Path,
        num_threads: int | None = None,
        edgetpu: str = "auto",
        *,
        delegate_loader: Callable[[str], Any] | None = None,
        litert: LiteRT | None = None,
        tile_overlap: float = tiling.DEFAULT_OVERLAP,
    ) -> None:
        tiling.tile_starts(2, 1, tile_overlap)  # a bad overlap fails here, not per image
        self._tile_overlap = float(tile_overlap)
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
        self._score_name = (self.bundle.abstention or {}).get("score") or None
        # Scale estimation and the quality gate live in their own modules (numpy + Pillow);
        # a bundle with a "quality" section is checked only where the module is installed.
        self._scale_module = _optional_module("scale") if self.scaled else None
        self._quality_module = _optional_module("quality") if self.bundle.meta.get("quality") else None
        self._quality_thresholds = (
            self._quality_module.QualityThresholds.from_dict(self.bundle.meta["quality"])
            if self._quality_module is not None else None
        )
        # "No white cell in view" (no tile holds one) asks for a retake, unless the bundle's
        # quality thresholds turned that check off: fitted on training fields that often show
        # no detectable white cell (min_white_cell_fraction 0), it would refuse training-like fields.
        self._white_cell_check = (self._quality_thresholds is None
                                  or self._quality_thresholds.min_white_cell_fraction > 0)

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

    # -- decoding -----------------------------------------------------------
    @property
    def scaled(self) -> bool:
        """The bundle records its training scale: captures are rescaled and tiled."""
        return self.bundle.spec.input_um_per_px is not None

    def decode(self, source, *, um_per_px: float | None = None) -> np.ndarray:
        """uint8 RGB of a file or bytes at the least resolution this model needs.

        Without a bundle scale that is 2x the model input, and :meth:`classify` of the
        returned array gives exactly what :meth:`classify` of ``source`` gives, so a
        caller that also wants the pixels (the app's thumbnail and heatmap) decodes
        once. With a bundle scale the array may be reduced: pass
        :meth:`decode_capture`'s :class:`Capture` to :meth:`classify` instead, which
        remembers the capture's size (``um_per_px`` and the boxes refer to it).
        """
        if not self.scaled:
            return decode_rgb(source, self.bundle.spec)
        return self.decode_capture(source, um_per_px=um_per_px).rgb

    def decode_plan(self, source, *, um_per_px: float | None = None) -> PendingImage:
        """The checked header and memory estimate of decoding ``source`` for this model, nothing decoded.

        A context manager (:class:`leukoedge.decode.PendingImage`); pass it to
        :meth:`decode_capture` (or call its ``decode()`` for a Pillow image). With a
        bundle scale the size decoded depends on the capture's um/px (given, or
        :data:`~leukoedge.runtime.tiling.ESTIMATE_LONG_SIDE` to estimate it), so the
        header is read first.
        """
        spec = self.bundle.spec
        if not self.scaled:
            return open_pending(source, min_size=decode_size(spec))
        data = _source_bytes(source)
        with open_pending(data, max_pixels=MAX_SIDE * MAX_SIDE) as probe:  # header only: its size, no pixels
            size = (probe.header.height, probe.header.width)
        if um_per_px is None:
            target = tiling.estimate_target(size)
        else:
            target = tiling.decode_target(size, _check_um(um_per_px), spec.input_um_per_px)
        return open_pending(data, min_size=target)

    def decode_capture(self, source, *, um_per_px: float | None = None) -> Capture:
        """A :class:`Capture` of a file, bytes, stream or :meth:`decode_plan`'s pending image."""
        if isinstance(source, PendingImage):
            img = source.decode()
            return Capture(to_rgb(img), (source.upright_size[1], source.upright_size[0]))
        data = _source_bytes(source) if self.scaled else source
        with self.decode_plan(data, um_per_px=um_per_px) as pending:
            img = pending.decode()
            size = (pending.upright_size[1], pending.upright_size[0])
        return Capture(to_rgb(img), size, data if self.scaled else None)

    def _capture(self, source, um_per_px: float | None) -> Capture:
        """Any accepted source as a :class:`Capture` (arrays and PIL images are taken as the whole capture)."""
        if isinstance(source, Capture):
            return source
        if isinstance(source, PendingImage):
            return self.decode_capture(source)
        if isinstance(source, np.ndarray):
            rgb = _rgb_array(source)
            return Capture(rgb, rgb.shape[:2])
        if isinstance(source, Image.Image):
            rgb = to_rgb(source)
            return Capture(rgb, rgb.shape[:2])
        return self.decode_capture(source, um_per_px=um_per_px)

    def to_pixels(self, source) -> np.ndarray:
        """Any accepted source -> model-sized uint8 RGB through the ONE preprocessing path (whole frame stretched)."""
        spec = self.bundle.spec
        if isinstance(source, Capture):
            return prepare(source.rgb, spec)
        if isinstance(source, np.ndarray):
            if source.dtype != np.uint8:
                raise InvalidImageError(f"expected a uint8 image array, got {source.dtype}")
            return prepare(source, spec)
        if isinstance(source, Image.Image):
            return prepare(to_rgb(source), spec)
        return load_image(source, spec)

    # -- inference ----------------------------------------------------------
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

    def classify(self, source, *, um_per_px: float | None = None, heatmap: bool = True) -> Prediction:
        """Classify bytes, a path, a file object, a PIL image, a uint8 array, a :class:`Capture` or a
        :meth:`decode_plan` pending image.

        Args:
            source: the capture. ``um_per_px`` and the tiles' boxes refer to its pixels
                (for a :class:`Capture`, to its ``full_size``).
            um_per_px: micrometres per capture pixel (the microscope's calibration).
                None: estimated from the red cells when the bundle records its scale.
            heatmap: compute the class activation map (when the bundle has one).

        Without a bundle scale this is the whole-frame stretch it always was
        (``scale_source="bundle-unknown"``, ``um_per_px`` not used). With one, the
        capture is rescaled to the training scale and tiled (module :mod:`.tiling`);
        when the scale must be estimated and cannot be, the whole frame is
        stretched instead (``scale_source="estimate-failed"``) and the message says so.

        Raises:
            InvalidImageError: a bad image. ScaleError: a given um/px that makes no
            sense for this capture (too many tiles or too small a field). UsageError:
            ``um_per_px`` not a positive number.
        """
        t0 = time.perf_counter()
        um = None if um_per_px is None else _check_um(um_per_px)
        if not self.scaled:
            note = None if um is None else (
                "this model's bundle does not record the scale it was trained at, so the capture's "
                f"{um:g} um/px was not used: the whole frame was stretched to the model input")
            return self._stretched(source, heatmap, t0, "bundle-unknown", note)
        capture = self._capture(source, um)
        t1 = time.perf_counter()
        message, source_kind = None, "given"
        if um is None:
            try:
                capture, um, message = self._estimate(capture)
            except ScaleError as err:
                return self._stretched(capture, heatmap, t0, "estimate-failed", _failed_estimate(err.message),
                                       decode_ms=(t1 - t0) * 1000.0, scale_ms=(time.perf_counter() - t1) * 1000.0)
            source_kind = "estimated"
        t2 = time.perf_counter()
        spec = self.bundle.spec
        try:
            plan = tiling.plan_tiles(capture.full_size, um, spec.input_um_per_px, spec.size, self._tile_overlap)
        except ScaleError as err:
            if source_kind == "given":
                raise
            return self._stretched(capture, heatmap, t0, "estimate-failed",
                                   _failed_estimate(f"the estimated {um:.3g} um/px does not fit this capture ({err.message})"),
                                   decode_ms=(t1 - t0) * 1000.0, scale_ms=(t2 - t1) * 1000.0)
        t3 = time.perf_counter()
        capture = self._enough_pixels(capture, um)
        t4 = time.perf_counter()
        return self._tiled(capture, plan, heatmap, t0, source_kind, message,
                           decode_ms=(t1 - t0 + t4 - t3) * 1000.0, scale_ms=(t2 - t1) * 1000.0)

    # -- the two paths --------------------------------------------------------
    def _stretched(self, source, heatmap: bool, t0: float, scale_source: str, message: str | None,
                   *, decode_ms: float | None = None, scale_ms: float = 0.0) -> Prediction:
        """Today's path: the whole frame stretched to the model input, as one tile.

        No quality check: its thresholds were fitted at the training scale, and a frame
        whose scale is unknown cannot be brought to it (a wide frame stretched to the
        input looks sharper than it is), so its numbers would not be comparable.
        """
        spec = self.bundle.spec
        ta = time.perf_counter()
        rgb, size = self._whole_frame(source)
        tb = time.perf_counter()
        decode_ms = (tb - ta) * 1000.0 if decode_ms is None else decode_ms
        pixels = apply_colour(resize(rgb, spec), spec)
        tc = time.perf_counter()
        raw = self.run(pixels)
        td = time.perf_counter()
        probs = temperature_scale_probs(raw.probabilities, self._temperature, self._log_prob_floor)
        idx, label, confidence = postprocess.top1(probs, self.bundle.labels)
        # Thresholds are chosen on the model's own output (convert / leukoedge.train.ood), so
        # the score sees the probabilities before temperature scaling.
        score, abstained = self.abstain(raw)
        heat = None
        if heatmap and self._heat_output and raw.features is not None:
            cam = heatmaps.class_activation_map(raw.features, self._cam_weights, idx)
            heat = heatmaps.normalise_map(cam, spec.size)
        probabilities = {name: float(p) for name, p in zip(self.bundle.labels, probs)}
        tile = TilePrediction(box=(0, 0, int(size[1]), int(size[0])), row=0, col=0, probabilities=probabilities,
                              label=label, confidence=confidence, abstained=abstained, ood_score=score,
                              has_white_cell=None, white_cell_pixels=None, used=True)
        te = time.perf_counter()
        plan = tiling.stretched_plan(size, spec.size)
        return Prediction(
            label=label, probabilities=probabilities, confidence=confidence, abstained=abstained, ood_score=score,
            latency_ms=(te - t0) * 1000.0,
            timings=_timings(decode_ms, scale_ms, (tc - tb) * 1000.0, raw.invoke_ms, (te - td) * 1000.0,
                             legacy=scale_source == "bundle-unknown"),
            heatmap=heat, class_index=idx, ood_score_name=self._score_name,
            um_per_px=None, scale_source=scale_source, scale_message=message, tiles=(tile,),
            aggregation="one tile: the whole frame stretched to the model input",
            quality=None, retake=False, capture_size=tuple(size), tiling=plan.to_dict(),
        )

    def _whole_frame(self, source) -> tuple[np.ndarray, tuple[int, int]]:
        """(RGB, capture (h, w)) decoded exactly as :func:`~leukoedge.preprocess.load_image` decodes it."""
        if isinstance(source, PendingImage):
            source = self.decode_capture(source)
        if isinstance(source, Capture):
            return source.rgb, source.full_size
        if isinstance(source, np.ndarray):
            rgb = _rgb_array(source)
            return rgb, rgb.shape[:2]
        if isinstance(source, Image.Image):
            rgb = to_rgb(source)
            return rgb, rgb.shape[:2]
        with open_pending(source, min_size=decode_size(self.bundle.spec)) as pending:
            rgb = to_rgb(pending.decode())
            return rgb, (pending.upright_size[1], pending.upright_size[0])

    def _tiled(self, capture: Capture, plan: tiling.TilePlan, heatmap: bool, t0: float, scale_source: str,
               message: str | None, *, decode_ms: float, scale_ms: float) -> Prediction:
        """The capture at the training scale, cut into tiles; the tiles holding a white cell classified."""
        spec = self.bundle.spec
        ta = time.perf_counter()
        canvas, scaled = tiling.rescale(capture.rgb, plan)
        cells = tiling.white_cells(canvas, plan)
        report = self._assess(scaled, cells)
        counts = tiling.cell_counts(cells)
        positions = plan.positions()
        chosen = [i for i, n in enumerate(counts.in_own) if n >= counts.min_pixels]
        no_cell = not chosen
        if no_cell:  # nothing to read: still say what the model sees, over every tile
            chosen = list(range(len(positions)))
        th, tw = spec.size
        pixels = {i: apply_colour(canvas[y:y + th, x:x + tw], spec) for i in chosen for (_, _, y, x) in [positions[i]]}
        tb = time.perf_counter()
        invoke_ms, raws = 0.0, {}
        for i in chosen:
            raws[i] = self.run(pixels[i])
            invoke_ms += raws[i].invoke_ms
        tc = time.perf_counter()
        probs, results = {}, {}
        for i in chosen:
            probs[i] = temperature_scale_probs(raws[i].probabilities, self._temperature, self._log_prob_floor)
            results[i] = self.abstain(raws[i])
        agg = tiling.aggregate([probs[i] for i in chosen], [results[i][1] for i in chosen],
                               [results[i][0] for i in chosen], chosen)
        idx, label, confidence = postprocess.top1(agg.probabilities, self.bundle.labels)
        used = set(agg.used)
        tiles = tuple(self._tile_prediction(plan, counts, i, r, c, y, x, probs.get(i), results.get(i), i in used)
                      for i, (r, c, y, x) in enumerate(positions))
        heat = None
        if heatmap and self._heat_output and all(raws[i].features is not None for i in chosen):
            cams = {i: heatmaps.class_activation_map(raws[i].features, self._cam_weights, idx) for i in used}
            heat = tiling.stitch_heatmap(cams, plan)
        quality = report.to_dict() if report is not None else None
        retake = report is not None and not report.ok
        aggregation = agg.description
        if no_cell:
            aggregation = f"no tile holds a detected white cell: probabilities = the mean over all {len(chosen)} tiles"
            if self._white_cell_check:
                quality, retake = _with_no_white_cell(quality), True
                aggregation += " (retake)"
        td = time.perf_counter()
        return Prediction(
            label=label, probabilities={n: float(p) for n, p in zip(self.bundle.labels, agg.probabilities)},
            confidence=confidence, abstained=agg.abstained, ood_score=agg.ood_score,
            latency_ms=(td - t0) * 1000.0,
            timings=_timings(decode_ms, scale_ms, (tb - ta) * 1000.0, invoke_ms, (td - tc) * 1000.0),
            heatmap=heat, class_index=idx, ood_score_name=self._score_name,
            um_per_px=plan.capture_um_per_px, scale_source=scale_source, scale_message=message, tiles=tiles,
            aggregation=aggregation, quality=quality, retake=retake, capture_size=plan.capture_size,
            tiling=plan.to_dict(),
        )

    def _tile_prediction(self, plan, counts, i, r, c, y, x, probs, result, used) -> TilePrediction:
        labels = self.bundle.labels
        if probs is None:
            named, label, confidence, abstained, score = None, None, None, None, None
        else:
            _, label, confidence = postprocess.top1(probs, labels)
            named = {n: float(p) for n, p in zip(labels, probs)}
            score, abstained = result
        return TilePrediction(box=plan.box(y, x), row=r, col=c, probabilities=named, label=label,
                              confidence=confidence, abstained=abstained, ood_score=score,
                              has_white_cell=counts.in_tile[i] > 0, white_cell_pixels=counts.in_own[i], used=used)

    # -- scale and quality ------------------------------------------------------
    def _estimate(self, capture: Capture) -> tuple[Capture, float, str]:
        """(capture, um per capture pixel, message) from the red cells; ScaleError when they cannot be measured.

        The estimate runs on the capture decoded with a long side of ~1000 px (a
        camera array is box-reduced to that); when that fails, or the red cells
        measure under :data:`MIN_RBC_PX`, it is tried once more on the full capture.
        """
        scale = self._scale_module
        if scale is None:
            raise ScaleError("this installation has no scale estimator (leukoedge.scale)")
        target = tiling.estimate_target(capture.full_size)
        rgb = capture.rgb
        if min(rgb.shape[:2]) >= 2 * target[0]:
            rgb = np.asarray(reduce_towards(Image.fromarray(rgb), target))
        reduction = max(capture.full_size) / max(rgb.shape[:2])
        try:
            est = scale.estimate_scale(rgb)
            retry = est.rbc_diameter_px < MIN_RBC_PX and reduction > 1.0
        except ScaleError:
            if reduction <= 1.0:
                raise
            retry, est = True, None
        if retry:
            capture = self._full_resolution(capture)
            try:
                est = scale.estimate_scale(capture.rgb)
                reduction = capture.reduction
            except ScaleError:
                if est is None:
                    raise
        um = est.um_per_px / reduction
        message = (f"pixel size estimated from {est.n_cells} red cells ({est.rbc_diameter_px * reduction:.0f} px "
                   f"across, taken as {est.rbc_um:g} um): {um:.3g} um/px; calibrate the microscope for a fixed scale")
        return capture, um, message

    def _full_resolution(self, capture: Capture) -> Capture:
        """The capture decoded in full, when it was decoded reduced and its file is at hand."""
        if capture.data is None or capture.reduction <= 1.0:
            return capture
        with open_pending(capture.data) as pending:
            return Capture(to_rgb(pending.decode()), capture.full_size, capture.data)

    def _enough_pixels(self, capture: Capture, um: float) -> Capture:
        """Decode again when the capture was decoded too small for its rescale (an estimated scale).

        Only when it would have to be enlarged (:data:`~.tiling.MIN_OVERSAMPLE`); then at
        :data:`~.tiling.TILE_OVERSAMPLE` as a given scale would have been.
        """
        in_um = self.bundle.spec.input_um_per_px
        least = tiling.decode_target(capture.full_size, um, in_um, tiling.MIN_OVERSAMPLE)[0]
        if capture.data is None or min(capture.rgb.shape[:2]) >= min(least, min(capture.full_size)):
            return capture
        need = tiling.decode_target(capture.full_size, um, in_um)[0]
        with open_pending(capture.data, min_size=(need, need)) as pending:
            return Capture(to_rgb(pending.decode()), capture.full_size, capture.data)

    def _assess(self, rgb: np.ndarray, cells: tiling.CellMask):
        """The quality report of the capture at the training scale (None when the bundle has no thresholds).

        The tiles' white-cell mask is shared with the gate (computing it again at full
        size would cost ~0.4 s on a 12 MP frame).
        """
        if self._quality_thresholds is None:
            return None
        return self._quality_module.assess(rgb, self._quality_thresholds, white_cell_mask=cells.full())

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
            "scale": self._scale_info(),
        }

    def _scale_info(self) -> dict:
        """The training scale and how captures are brought to it (JSON-safe)."""
        spec = self.bundle.spec
        return {
            "um_per_px": spec.um_per_px,
            "field_um": list(spec.field_um) if spec.field_um is not None else None,
            "input_um_per_px": list(spec.input_um_per_px) if spec.input_um_per_px is not None else None,
            "tiled": self.scaled,
            "tile_overlap": self._tile_overlap if self.scaled else None,
            "can_estimate": self._scale_module is not None,
            "quality_gate": self._quality_thresholds is not None,
        }


def _abstention_info(abstention: dict | None) -> dict | None:
    """The abstention rule without the bulky scorer details (JSON-safe for the app's /info)."""
    if not abstention:
        return abstention
    info = {k: v for k, v in abstention.items() if k != "scorer"}
    if abstention.get("scorer"):
        info["scorer"] = {k: abstention["scorer"].get(k) for k in ("method", "input")}
    return info


def _optional_module(name: str):
    """``leukoedge.<name>``, or None where this installation does not have it (anything else raises)."""
    try:
        return importlib.import_module(f"leukoedge.{name}")
    except ModuleNotFoundError as err:
        if err.name == f"leukoedge.{name}":
            return None
        raise


def _check_um(value) -> float:
    """A capture's um/px as a positive finite float, or UsageError saying what was given."""
    try:
        um = float(value)
    except (TypeError, ValueError):
        raise UsageError(f"um_per_px must be a number of micrometres per pixel, got {value!r}") from None
    if not (0 < um < 1e4) or not math.isfinite(um):
        raise UsageError(f"um_per_px must be a positive number of micrometres per pixel, got {value!r}")
    return um


def _source_bytes(source) -> bytes:
    """The encoded file of any accepted file source, read once (it is opened twice: header, then decode)."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return source
    stream = as_stream(source)
    if isinstance(stream, io.BytesIO):
        return stream.getvalue()
    try:
        return stream.read()
    except OSError as err:
        raise InvalidImageError(f"cannot read the uploaded image ({err})") from None


def _rgb_array(arr: np.ndarray) -> np.ndarray:
    """uint8 HxWx3 from a uint8 RGB, RGBA or grayscale array, as :func:`~leukoedge.preprocess.prepare` takes them."""
    arr = np.asarray(arr)
    if arr.dtype != np.uint8:
        raise InvalidImageError(f"expected a uint8 image array, got {arr.dtype}")
    if arr.ndim == 2:
        return np.repeat(arr[:, :, None], 3, axis=2)
    if arr.ndim == 3 and arr.shape[2] == 4:
        return to_rgb(Image.fromarray(arr, mode="RGBA"))
    if arr.ndim != 3 or arr.shape[2] != 3 or min(arr.shape[:2]) < 1:
        raise InvalidImageError(f"expected a uint8 HxWx3 array, got {arr.dtype} {arr.shape}")
    return arr


def _timings(decode_ms: float, scale_ms: float, tiles_ms: float, invoke_ms: float, aggregate_ms: float,
             *, legacy: bool = False) -> dict:
    """The stages' wall times; a bundle without a scale keeps the three it always reported."""
    if legacy:
        return {"preprocess_ms": decode_ms + tiles_ms, "invoke_ms": invoke_ms, "postprocess_ms": aggregate_ms}
    return {"decode_ms": decode_ms, "scale_ms": scale_ms, "tiles_ms": tiles_ms, "invoke_ms": invoke_ms,
            "aggregate_ms": aggregate_ms, "preprocess_ms": decode_ms + scale_ms + tiles_ms,
            "postprocess_ms": aggregate_ms}


def _failed_estimate(reason: str) -> str:
    return (f"the pixel size could not be estimated ({reason}); the whole frame was stretched to the model "
            "input instead, which is right only at the training magnification, and the capture quality "
            "check (fitted at that magnification) was skipped: calibrate the microscope "
            "(the Scale page, or --um-per-px) for results at the training scale")


def _with_no_white_cell(quality: dict | None) -> dict:
    """The quality report with ``no_white_cell`` added (a minimal report where no quality check ran)."""
    out = dict(quality) if quality else {"ok": True, "reasons": [], "message": None}
    reasons = list(out.get("reasons") or [])
    if "no_white_cell" not in reasons:
        reasons.append("no_white_cell")
    previous = out.get("message") if not out.get("ok", True) else None
    out.update(ok=False, reasons=reasons,
               message=f"{previous}; no white cell in view" if previous else "retake: no white cell in view")
    return out
