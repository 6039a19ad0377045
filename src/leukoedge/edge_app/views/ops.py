"""Health and metrics: what a monitoring script or a curious lab member checks."""
from __future__ import annotations

import time

from flask import Blueprint, Response, jsonify

from ... import RESEARCH_NOTICE, __version__
from .camera import lock_state
from .common import state
from .review import agreement_now
from .scale import scale_status

bp = Blueprint("ops", __name__)


@bp.get("/api/health")
def health():
    st = state()
    camera = st.camera_status.to_dict()
    live = st.service.camera_health.to_dict()
    # "available" is the camera's state now: opened at start-up AND not failing on its last use.
    camera["opened"] = camera["available"]
    camera["available"] = camera["opened"] and live["state"] != "failing"
    camera.update(live)
    camera["viewers"] = st.broadcaster.viewers if st.broadcaster is not None else 0
    camera["lock"] = lock_state()  # exposure / white balance lock (views/camera.py)
    return jsonify({
        "status": "ok" if camera["available"] or not camera["opened"] else "degraded",
        "version": __version__,
        "uptime_s": round(time.time() - st.started, 1),
        "model": st.service.model_info,
        "camera": camera,
        "storage": {"results": st.store.count()},
        # One grouped query: the overall figure only; per label at /api/agreement.
        "agreement": agreement_now().to_dict()["overall"],
        "scale": scale_status(),
        "security": {"token_required": st.config.requires_token, "loopback_only": st.config.loopback_only},
        "research_notice": RESEARCH_NOTICE,
    })


@bp.get("/metrics")
def metrics():
    st = state()
    gauges = {
        "leukoedge_results_stored": ("Results in the database.", float(st.store.count())),
        "leukoedge_camera_available": ("1 when a camera is in use and its last capture or frame worked.",
                                       1.0 if st.camera_status.available and not st.service.camera_health.failing
                                       else 0.0),
        "leukoedge_preview_viewers": ("Open live-preview streams.",
                                      float(st.broadcaster.viewers if st.broadcaster else 0)),
        "leukoedge_uptime_seconds": ("Seconds since the app started.", time.time() - st.started),
    }
    return Response(st.metrics.render(gauges), mimetype="text/plain; version=0.0.4")
