"""Classify-and-store: the one pipeline behind the capture button, the upload form and the API.

Order matters for "bad input stores nothing": the image is decoded and
validated first (any :class:`~leukoedge.errors.InvalidImageError` leaves no
trace), then classified, then its files and row are written by the store.
The classifier and camera are shared, process-wide objects passed in once.

At most :data:`MAX_CONCURRENT` images are decoded and classified at a time: a
64 MP upload decodes to ~190 MB of RGB, and a 2 GB Pi must not try four at once.
Further requests wait their turn (the WSGI server queues them anyway).
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import numpy as np

from ..errors import CameraError
from ..preprocess import load_image
from . import imaging
from .metrics import Metrics
from .storage import ResultStore, StoredResult

MAX_CONCURRENT = 2


@dataclass
class ClassifyService:
    """Glue between the classifier, the camera, the store and the metrics."""

    classifier: object
    store: ResultStore
    metrics: Metrics
    camera: object | None = None
    _slots: threading.BoundedSemaphore = field(default_factory=lambda: threading.BoundedSemaphore(MAX_CONCURRENT),
                                               repr=False)

    @property
    def model_info(self) -> dict:
        return self.classifier.info()

    def classify_upload(self, data: bytes, filename: str) -> StoredResult:
        """Validate, classify and store one uploaded file (bytes)."""
        with self._slots:
            rgb = load_image(bytes(data))  # raises InvalidImageError / ImageTooLargeError; nothing stored yet
            original, ext = imaging.stored_original(data, rgb)
            return self._classify(rgb, original, ext, source="upload", filename=filename)

    def classify_capture(self) -> StoredResult:
        """Grab a full-resolution still from the camera and classify it."""
        if self.camera is None:
            raise CameraError("no camera is attached; the app is in upload mode",
                              hint="upload an image instead, or restart with --camera")
        with self._slots:
            rgb = self.camera.capture()
            original, ext = imaging.stored_original(None, rgb)
            stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
            return self._classify(rgb, original, ext, source="camera", filename=f"capture-{stamp}{ext}")

    def _classify(self, rgb: np.ndarray, original: bytes, ext: str, *, source: str, filename: str) -> StoredResult:
        pred = self.classifier.classify(rgb)
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
                "latency_ms": pred.latency_ms,
                "timings": pred.timings,
                "model_name": info["model"],
                "model_version": str(info["version"]),
                "width": int(rgb.shape[1]),
                "height": int(rgb.shape[0]),
                "original_ext": ext,
            },
            files,
        )
        self.metrics.classified(pred.label, pred.abstained, source, pred.latency_ms)
        return result
