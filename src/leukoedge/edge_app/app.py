"""The app factory: one process-wide classifier, camera and store behind Flask.

    app = create_app(AppConfig(bundle=..., data_dir=...))

The interpreter and camera are created here, once per process (habit 8), and
shared by every request through ``app.extensions["leukoedge"]`` (an
:class:`AppState`); tests pass an already-built classifier and camera so a
session of tests loads one model. Views live in one blueprint per concern
(``views/``); errors become responses in one handler (``handlers.py``).

The station's scale calibration (:mod:`.calibration`, ``DATA_DIR/scale.json``)
is read here at every start and re-applied to every classification; every
page's header shows it (``scale_line``). A damaged calibration file is logged
and the station runs uncalibrated (scale estimated per capture).

What can fail at start-up: :class:`~leukoedge.errors.BundleError` (damaged or
invalid bundle), :class:`~leukoedge.errors.RuntimeUnavailableError` (no
LiteRT), :class:`~leukoedge.edge_app.storage.StorageError` (data folder not
writable). A camera problem never fails start-up: the app runs in upload mode.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from datetime import timedelta

from flask import Flask, request
from werkzeug.exceptions import MethodNotAllowed

from .. import RESEARCH_NOTICE, __version__
from .admission import MemoryAdmission
from .calibration import UNCALIBRATED_LINE, CalibrationStore
from .camera import Camera, CameraHealth, CameraStatus, FrameBroadcaster, open_camera
from .config import MAX_FORM_FIELD_BYTES, AppConfig
from .focus import FocusMeter
from .handlers import init_error_handlers
from .metrics import KNOWN_METHODS, Metrics
from .security import init_security, load_secret_key
from .service import ClassifyService
from .storage import ResultStore
from .views import api, auth, export_reviewed, focus, history, media, ops, review, samples, scale, ui
from .views import camera as camera_views  # not `camera`: create_app has a parameter of that name

log = logging.getLogger(__name__)

#: Multipart parts beyond the files themselves (csrf token, submit button, ...).
_EXTRA_FORM_PARTS = 8


@dataclass
class AppState:
    """Everything the views share; one per app."""

    config: AppConfig
    service: ClassifyService
    camera_status: CameraStatus
    metrics: Metrics
    broadcaster: FrameBroadcaster | None
    focus: FocusMeter | None = None
    started: float = field(default_factory=time.time)

    @property
    def store(self) -> ResultStore:
        return self.service.store

    @property
    def calibration(self) -> CalibrationStore:
        return self.service.calibration

    def close(self) -> None:
        """Stop the preview, release the camera, close database connections."""
        if self.broadcaster is not None:
            self.broadcaster.close()
        if self.service.camera is not None:
            self.service.camera.close()
        self.service.store.close()


def _load_classifier(config: AppConfig):
    from ..runtime import Classifier, load_bundle

    bundle = load_bundle(config.bundle, allow_invalid=config.force_invalid_bundle)
    if not bundle.valid:
        log.warning("serving an INVALID bundle (%s) because --force-invalid-bundle was given", bundle.invalid_reason)
    return Classifier(bundle, num_threads=config.num_threads, edgetpu=config.edgetpu)


def create_app(config: AppConfig, *, classifier=None, camera: Camera | None = None,
               camera_status: CameraStatus | None = None) -> Flask:
    """Build the app; ``classifier``/``camera`` are created from ``config`` when not given."""
    if classifier is None:
        classifier = _load_classifier(config)
    store = ResultStore(config.data_dir)  # before the camera: a storage failure leaves no device open
    store.recover()
    calibration = CalibrationStore(config.data_dir)
    calibration.load()  # the saved scale is re-applied (and logged) at every start
    if camera is None and camera_status is None:
        camera, camera_status = open_camera(config.camera)
    elif camera_status is None:
        camera_status = CameraStatus(requested=config.camera, backend=camera.name, detail=getattr(camera, "detail", ""))
    metrics = Metrics()
    camera_health = CameraHealth()
    broadcaster = (FrameBroadcaster(camera, fps=config.preview_fps, max_viewers=config.max_streams,
                                    health=camera_health)
                   if camera is not None else None)
    service = ClassifyService(classifier, store, metrics, camera,
                              admission=MemoryAdmission(config.decode_memory_bytes), camera_health=camera_health,
                              calibration=calibration)
    state = AppState(config=config, service=service,
                     camera_status=camera_status, metrics=metrics, broadcaster=broadcaster,
                     focus=FocusMeter(camera) if camera is not None else None)

    app = Flask(__name__)
    app.config.update(
        SECRET_KEY=config.secret_key or load_secret_key(config.data_dir),
        MAX_CONTENT_LENGTH=config.max_upload_bytes,
        MAX_FORM_MEMORY_SIZE=MAX_FORM_FIELD_BYTES,
        MAX_FORM_PARTS=config.max_files_per_upload + _EXTRA_FORM_PARTS,
        SESSION_COOKIE_NAME="leukoedge_session",
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Lax",
        PERMANENT_SESSION_LIFETIME=timedelta(days=7),
    )
    app.json.sort_keys = False  # keep result fields in their documented order
    app.extensions["leukoedge"] = state
    _init_request_metrics(app, metrics)  # first: unknown methods are refused before anything else runs
    init_security(app, config)
    init_error_handlers(app)

    for blueprint in (ui.bp, history.bp, media.bp, api.bp, ops.bp, auth.bp, scale.bp, focus.bp, camera_views.bp,
                      samples.bp, review.bp, export_reviewed.bp):
        app.register_blueprint(blueprint)

    @app.context_processor
    def _page_globals() -> dict:
        info = state.service.model_info
        return {
            "research_notice": RESEARCH_NOTICE,
            "model_name": info["model"],
            "model_version": info["version"],
            "model_valid": info.get("valid", True),
            "model_invalid_reason": info.get("invalid_reason"),
            "app_version": __version__,
            "camera_status": state.camera_status,
            "token_required": config.requires_token,
            "exposed_without_token": config.insecure_no_token,
            "loopback_only": config.loopback_only,
            "scale_line": _scale_line(state),
        }

    return app


def _scale_line(state: AppState) -> str:
    """The header's scale: the calibration and how it was made, or that each capture is estimated."""
    current = state.calibration.current
    line = UNCALIBRATED_LINE if current is None else current.describe()
    if state.service.model_um_per_px is None:
        line += " · this model has no training scale (frames stretched)"
    return line


def _init_request_metrics(app: Flask, metrics: Metrics) -> None:
    @app.before_request
    def _known_method():
        # Before auth: a made-up method gets 405 from every address, whatever the token mode.
        if request.method not in KNOWN_METHODS:
            raise MethodNotAllowed(valid_methods=sorted(KNOWN_METHODS))

    @app.after_request
    def _count(response):
        metrics.request(request.endpoint or "unmatched", request.method, response.status_code)
        return response
