"""Classify-and-store: the one pipeline behind the capture button, the upload form and the API.

Order matters for "bad input stores nothing": the image is decoded and
validated first (any :class:`~leukoedge.errors.InvalidImageError` leaves no
trace), then classified, then its files and row are written by the store.
The classifier and camera are shared, process-wide objects passed in once.

Memory, the scarce thing on a Pi, is bounded three ways:

- at most :data:`MAX_CONCURRENT` images are read, decoded and classified at a
  time (an upload's bytes are read from Werkzeug's spooled temp file only
  inside a slot, so waiting requests hold no image in memory);
- each decode first reserves its estimated bytes from one
  :class:`~leukoedge.edge_app.admission.MemoryAdmission` budget, so two 64 MP
  PNGs are decoded one after the other while small JPEGs pass freely;
- images are decoded at the least resolution the model needs (JPEG DCT
  scaling, box reduction: :meth:`Classifier.decode`), and freed heap pages go
  back to the OS after a large decode (:mod:`.memory`).

Scale (issue 15): every classification is given the um/px of the capture's
FULL-resolution pixels, from the request (the API's ``um_per_px`` field) or the
station's calibration (:mod:`.calibration`), or None so the runtime estimates
it from the capture's red cells. An upload is decoded at no more resolution
than that scale needs (:meth:`Classifier.decode_plan`) and handed to the
runtime as a :class:`~leukoedge.runtime.classifier.Capture` that remembers the
full size, so the um/px and the tile boxes stored always refer to the full
image whatever size it was decoded at.

Samples (issue 16): a classification may belong to a sample (``sample_id``).
The sample is checked (exists, still open) before anything is read or
classified, so a capture for a deleted or closed sample costs no camera
still and stores nothing; the store checks it again when it writes.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import BinaryIO, Callable, TypeVar

import numpy as np

from ..decode import open_pending
from ..errors import CameraError, LeukoEdgeError
from ..preprocess import to_rgb
from ..runtime.classifier import Capture
from . import imaging
from .admission import MemoryAdmission
from .calibration import CalibrationStore, format_um
from .camera import CameraHealth
from .memory import release_free_memory
from .metrics import Metrics
from .storage import ResultStore, StoredResult

MAX_CONCURRENT = 2
#: Least (height, width) an image is decoded at for a calibration measurement: a 12 MP frame
#: decodes at 1/2 (2028x1520), where micrometer lines and red cells stay well resolved.
MEASURE_MIN_SIZE = (1024, 1024)
T = TypeVar("T")


def whole_factor(full: int, decoded: int) -> float:
    """Full-resolution pixels per decoded pixel along one side.

    Decoders reduce by whole factors (JPEG DCT 1/2-1/8, box reduction) and round
    the size up, so 4057 px at 1/2 decodes to 2029: the factor is 2, not 1.9995.
    """
    if decoded <= 0:
        return 1.0
    nearest = max(1, round(full / decoded))
    if decoded in (full // nearest, -(-full // nearest)):
        return float(nearest)
    return full / decoded


@dataclass
class ClassifyService:
    """Glue between the classifier, the camera, the store and the metrics."""

    classifier: object
    store: ResultStore
    metrics: Metrics
    camera: object | None = None
    admission: MemoryAdmission = field(default_factory=MemoryAdmission)
    camera_health: CameraHealth = field(default_factory=CameraHealth)
    calibration: CalibrationStore | None = None
    _slots: threading.BoundedSemaphore = field(default_factory=lambda: threading.BoundedSemaphore(MAX_CONCURRENT),
                                               repr=False)

    def scale_for(self, um_per_px: float | None = None) -> tuple[float | None, str | None]:
        """(um/px of full-resolution pixels to classify at, where it came from); (None, None): estimate it."""
        if um_per_px is not None:
            return float(um_per_px), "the request's um_per_px"
        current = self.calibration.current if self.calibration is not None else None
        if current is not None:
            return current.um_per_px, f"the station's calibration ({current.how})"
        return None, None

    @property
    def model_um_per_px(self) -> float | None:
        """The bundle's training scale (um/px of its training images), None when it has none."""
        spec = getattr(getattr(self.classifier, "bundle", None), "spec", None)
        return getattr(spec, "um_per_px", None)

    @property
    def model_info(self) -> dict:
        """What the app shows about the model: the classifier's info without server paths."""
        info = dict(self.classifier.info())
        bundle = info.pop("bundle", None)
        if bundle is not None:
            info["bundle_name"] = str(bundle).replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]
        return info

    def classify_upload(self, upload: bytes | BinaryIO, filename: str, *, um_per_px: float | None = None,
                        sample_id: str | None = None) -> StoredResult:
        """Validate, classify and store one uploaded file (bytes or a binary stream).

        ``um_per_px`` (of the file's full-resolution pixels) overrides the station's calibration;
        ``sample_id`` files the result under an open sample.
        """
        if sample_id is not None:
            self.store.open_sample(sample_id)
        scale = self.scale_for(um_per_px)
        with self._slots:
            data = upload if isinstance(upload, (bytes, bytearray)) else upload.read()
            reserved = 0
            try:
                # Header checked, nothing decoded yet: InvalidImageError / ImageTooLargeError store nothing.
                with self.classifier.decode_plan(data, um_per_px=scale[0]) as pending:
                    with self.admission.reserve(pending.header.estimated_bytes) as reserved:
                        start = time.perf_counter()
                        rgb = to_rgb(pending.decode())
                        decode_ms = (time.perf_counter() - start) * 1000.0
                    original, ext = imaging.stored_original(data, pending.header.format, rgb)
                    width, height = pending.upright_size
                    # The file goes with the pixels: an estimated scale may need it decoded at more resolution.
                    capture = Capture(rgb, (int(height), int(width)), bytes(data))
                    del data
                    return self._classify(capture, original, ext, source="upload", filename=filename,
                                          decode_ms=decode_ms, scale=scale, sample_id=sample_id)
            finally:
                release_free_memory(reserved)

    def classify_capture(self, *, sample_id: str | None = None) -> StoredResult:
        """Grab a full-resolution still from the camera and classify it (at the station's calibration)."""
        if sample_id is not None:
            self.store.open_sample(sample_id)
        with self._slots:
            rgb = self._capture()
            original, ext = imaging.stored_original(None, None, rgb)
            stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
            try:
                return self._classify(Capture(rgb, (int(rgb.shape[0]), int(rgb.shape[1]))), original, ext,
                                      source="camera", filename=f"capture-{stamp}{ext}", scale=self.scale_for(),
                                      sample_id=sample_id)
            finally:
                del rgb
                release_free_memory(len(original) * 8)

    def _capture(self) -> np.ndarray:
        """A full-resolution still, with the camera's health recorded; CameraError in upload mode."""
        if self.camera is None:
            raise CameraError("no camera is attached; the app is in upload mode",
                              hint="upload an image instead, or restart with --camera")
        try:
            rgb = self.camera.capture()
        except LeukoEdgeError as err:
            self.camera_health.failed(err.message)
            raise
        self.camera_health.ok()
        return rgb

    # -- measuring (calibration) -------------------------------------------------
    def measure_upload(self, upload: bytes | BinaryIO, measure: Callable[[np.ndarray], T]) -> tuple[T, float, dict]:
        """``measure(rgb)`` of an uploaded image decoded at >= :data:`MEASURE_MIN_SIZE`, in a slot.

        Returns (measurement, full-resolution pixels per measured pixel, facts about the image).
        Nothing is stored; bad files raise the decoder's typed errors.
        """
        with self._slots:
            data = upload if isinstance(upload, (bytes, bytearray)) else upload.read()
            reserved = 0
            try:
                with open_pending(data, min_size=MEASURE_MIN_SIZE) as pending:
                    with self.admission.reserve(pending.header.estimated_bytes) as reserved:
                        rgb = to_rgb(pending.decode())
                    del data
                    full_w, full_h = pending.upright_size
                    factor = whole_factor(full_w, int(rgb.shape[1]))
                    info = {"source": "upload", "width": int(full_w), "height": int(full_h),
                            "measured_width": int(rgb.shape[1]), "measured_height": int(rgb.shape[0])}
                    return measure(rgb), factor, info
            finally:
                release_free_memory(reserved)

    def measure_capture(self, measure: Callable[[np.ndarray], T]) -> tuple[T, float, dict]:
        """``measure(rgb)`` of a full-resolution camera still (factor 1); CameraError without a camera."""
        with self._slots:
            rgb = self._capture()
            try:
                info = {"source": "camera", "width": int(rgb.shape[1]), "height": int(rgb.shape[0]),
                        "measured_width": int(rgb.shape[1]), "measured_height": int(rgb.shape[0])}
                return measure(rgb), 1.0, info
            finally:
                del rgb
                release_free_memory(64 * 1024 * 1024)

    # -- classify and store ------------------------------------------------------
    def _classify(self, capture: Capture, original: bytes, ext: str, *, source: str, filename: str,
                  decode_ms: float = 0.0, scale: tuple[float | None, str | None] = (None, None),
                  sample_id: str | None = None) -> StoredResult:
        """Classify a decoded capture and store it; ``scale`` = (um/px of full-resolution pixels or None, how)."""
        rgb = capture.rgb
        height, width = capture.full_size
        um_full, how = scale
        pred = self.classifier.classify(capture, um_per_px=um_full)
        retake = bool(pred.retake)
        latency_ms = decode_ms + pred.latency_ms
        files = {"original": original, "thumbnail": imaging.thumbnail(rgb)}
        if pred.heatmap is not None:
            files["heatmap"] = imaging.heatmap_overlay(rgb, pred.heatmap)
        info = self.classifier.info()
        result = self.store.add(
            {
                "source": source,
                "filename": filename,
                "label": pred.label,
                "confidence": pred.confidence,
                "abstained": pred.abstained,
                "ood_score": pred.ood_score,
                "probabilities": pred.probabilities,
                "latency_ms": latency_ms,
                # The upload's decode happened here; the runtime's decode_ms is any decode it added.
                "timings": {**pred.timings, "decode_ms": decode_ms + pred.timings.get("decode_ms", 0.0)},
                "model_name": info["model"],
                "model_version": str(info["version"]),
                # which bundle made this result: the report and the exports cite it, whatever is loaded later
                "bundle_sha256": info["bundle_sha256"],
                "width": int(width),
                "height": int(height),
                "original_ext": ext,
                "retake": retake,
                "quality": pred.quality,
                "um_per_px": pred.um_per_px,
                "scale_source": pred.scale_source,
                "scale_message": _scale_message(pred, um_full, how),
                "tiles": [t.to_dict() for t in pred.tiles],
                "aggregation": pred.aggregation,
                "sample_id": sample_id,
            },
            files,
        )
        self.metrics.classified("retake" if retake else pred.label, pred.abstained, source, latency_ms)
        return result


def _scale_message(pred, um_full: float | None, how: str | None) -> str | None:
    """How the scale was obtained, in a sentence: the runtime's reason, or where a given um/px came from."""
    message = pred.scale_message
    if um_full is None or how is None:
        return message
    if pred.scale_source == "given":
        return f"from {how}" + (f"; {message}" if message else "")
    return (f"{message}; " if message else "") + f"{format_um(um_full)} um/px came from {how}"
