"""Health and metrics: what a monitoring script or a curious lab member checks."""
from __future__ import annotations

import time

from flask import Blueprint, Response, jsonify

from ... import RESEARCH_NOTICE, __version__
from .common import state

bp = Blueprint("ops", __name__)


@bp.get("/api/health")
def health():
    st = state()
    camera = st.camera_status.to_dict()
    if st.broadcaster is not None:
        camera["viewers"] = st.broadcaster.viewers
        camera["last_error"] = st.broadcaster.last_error
    return jsonify({
        "status": "ok",
        "version": __version__,
        "uptime_s": round(time.time() - st.started, 1),
        "model": st.service.model_info,
        "camera": camera,
        "storage": {"results": st.store.count()},
        "security": {"token_required": st.config.requires_token, "loopback_only": st.config.loopback_only},
        "research_notice": RESEARCH_NOTICE,
    })


@bp.get("/metrics")
def metrics():
    st = state()
    gauges = {
        "leukoedge_results_stored": ("Results in the database.", float(st.store.count())),
        "leukoedge_camera_available": ("1 when a camera is in use, 0 in upload mode.",
                                       1.0 if st.camera_status.available else 0.0),
        "leukoedge_preview_viewers": ("Open live-preview streams.",
                                      float(st.broadcaster.viewers if st.broadcaster else 0)),
        "leukoedge_uptime_seconds": ("Seconds since the app started.", time.time() - st.started),
    }
    return Response(st.metrics.render(gauges), mimetype="text/plain; version=0.0.4")
