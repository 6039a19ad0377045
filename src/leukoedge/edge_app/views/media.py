"""Image files and the live MJPEG stream.

Images are addressed by result id and a fixed kind, never by a path from the
client: the id must be 32 hex characters and the kind one of three names,
so ``../`` can never reach the filesystem.
"""
from __future__ import annotations

from flask import Blueprint, Response, send_file

from ...errors import CameraError
from ..camera.stream import BOUNDARY
from ..storage import ResultNotFoundError
from .common import state

bp = Blueprint("media", __name__)
_MIMETYPES = {".jpg": "image/jpeg", ".png": "image/png"}


@bp.get("/results/<result_id>/<any(original, thumbnail, heatmap):kind>")
def image(result_id: str, kind: str):
    store = state().store
    result = store.get(result_id)  # 404 for malformed or unknown ids
    if kind == "heatmap" and not result.has_heatmap:
        raise ResultNotFoundError("this result has no heatmap (the model has no feature-map output)")
    path = store.file_path(result.id, kind, result.original_ext)
    suffix = ".jpg" if kind != "original" else result.original_ext
    response = send_file(path, mimetype=_MIMETYPES[suffix], max_age=3600, conditional=True)
    response.headers["Cache-Control"] = "private, max-age=3600"
    return response


@bp.get("/stream.mjpg")
def stream():
    broadcaster = state().broadcaster
    if broadcaster is None:
        raise CameraError(f"no live preview: {state().camera_status.reason}")
    parts = broadcaster.mjpeg()  # claims a viewer slot now, or raises CameraError (503)
    response = Response(parts, mimetype=f"multipart/x-mixed-replace; boundary={BOUNDARY}")
    response.headers["Cache-Control"] = "no-store"
    return response
