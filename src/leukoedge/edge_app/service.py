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
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import BinaryIO

import numpy as np

from ..errors import CameraError, LeukoEdgeError
from ..preprocess import to_rgb
from . import imaging
from .admission import MemoryAdmission
from .camera import CameraHealth
from .memory import release_free_memory
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
    admission: MemoryAdmission = field(default_factory=MemoryAdmission)
    camera_health: CameraHealth = field(default_factory=CameraHealth)
    _slots: threading.BoundedSemaphore = field(default_factory=lambda: threading.BoundedSemaphore(MAX_CONCURRENT),
                                               repr=False)

    @property
    def model_info(self) -> dict:
        """What the app shows about the model: the classifier's info without server paths."""
        info = dict(self.classifier.info())
        bundle = info.pop("bundle", None)
        if bundle is not None:
            info["bundle_name"] = str(bundle).replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]
        return info

    def classify_upload(self, upload: bytes | BinaryIO, filename: str) -> StoredResult:
        """Validate, classify and store one uploaded file (bytes or a binary stream)."""
        with self._slots:
            data = upload if isinstance(upload, (bytes, bytearray)) else upload.read()
            reserved = 0
            try:
                # Header checked, nothing decoded yet: InvalidImageError / ImageTooLargeError store nothing.
                with self.classifier.decode_plan(data) as pending:
                    with self.admission.reserve(pending.header.estimated_bytes) as reserved:
                        start = time.perf_counter()
                        rgb = to_rgb(pending.decode())
                        decode_ms = (time.perf_counter() - start) * 1000.0
                    original, ext = imaging.stored_original(data, pending.header.format, rgb)
                    del data
                    return self._classify(rgb, original, ext, source="upload", filename=filename,
                                          size=pending.upright_size, decode_ms=decode_ms)
            finally:
                release_free_memory(reserved)

    def classify_capture(self) -> StoredResult:
        """Grab a full-resolution still from the camera and classify it."""
        if self.camera is None:
            raise CameraError("no camera is attached; the app is in upload mode",
                              hint="upload an image instead, or restart with --camera")
        with self._slots:
            try:
                rgb = self.camera.capture()
            except LeukoEdgeError as err:
                self.camera_health.failed(err.message)
                raise
            self.camera_health.ok()
            original, ext = imaging.stored_original(None, None, rgb)
            stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
            try:
                return self._classify(rgb, original, ext, source="camera", filename=f"capture-{stamp}{ext}",
                                      size=(int(rgb.shape[1]), int(rgb.shape[0])))
            finally:
                del rgb
                release_free_memory(len(original) * 8)

    def _classify(self, rgb: np.ndarray, original: bytes, ext: str, *, source: str, filename: str,
                  size: tuple[int, int], decode_ms: float = 0.0) -> StoredResult:
        """Classify the decoded pixels; ``size`` is the full image's (width, height), ``decode_ms`` its decode."""
        pred = self.classifier.classify(rgb)
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
                "timings": {"decode_ms": decode_ms, **pred.timings},
                "model_name": info["model"],
                "model_version": str(info["version"]),
                "width": int(size[0]),
                "height": int(size[1]),
                "original_ext": ext,
            },
            files,
        )
        self.metrics.classified(pred.label, pred.abstained, source, latency_ms)
        return result
