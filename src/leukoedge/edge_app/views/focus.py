"""``GET /api/focus``: the live preview's focus score, polled by the live page (``static/app.js``).

503 (CameraError) in upload mode or while the camera gives no frame; the page
then hides the score. See :mod:`leukoedge.edge_app.focus` for what the number means.
"""
from __future__ import annotations

from flask import Blueprint, jsonify

from ...errors import CameraError
from .common import state

bp = Blueprint("focus", __name__)


@bp.get("/api/focus")
def focus():
    meter = state().focus
    if meter is None:
        raise CameraError(f"no live focus score: {state().camera_status.reason}")
    return jsonify(meter.read())
