"""JSON API: classify, capture, list / get / delete results.

    curl -F image=@cell.jpg http://127.0.0.1:8080/api/classify
    curl -H "Authorization: Bearer $T" -F image=@cell.jpg http://pi:8080/api/classify
    curl -F image=@field.jpg -F um_per_px=0.08 http://127.0.0.1:8080/api/classify   # this file's scale
    curl -F image=@field.jpg -F sample=$SAMPLE_ID http://127.0.0.1:8080/api/classify   # into a sample
    curl -X POST -H 'Content-Type: application/json' -d '{"sample": "'$SAMPLE_ID'"}' http://127.0.0.1:8080/api/capture

``sample`` (optional) must name an open sample (``/api/samples``): an unknown
id is 404, a closed sample 400, and neither reads the image or stores anything.

Without ``um_per_px`` an upload is classified at the station's calibration
(``/api/scale``), or at the scale estimated from its red cells when there is none.

Errors come back as ``{"error": {"type", "message", "hint", "status"}}`` from
the app's one error handler.
"""
from __future__ import annotations

from flask import Blueprint, jsonify, request

from ..calibration import checked_um_per_px
from ..storage import REVIEW_FILTERS
from .common import int_arg, read_uploads, result_json, state
from .samples import requested_sample

bp = Blueprint("api", __name__, url_prefix="/api")
MAX_PAGE = 500


@bp.post("/classify")
def classify():
    raw_scale = request.form.get("um_per_px", "").strip()
    um_per_px = checked_um_per_px(raw_scale) if raw_scale else None  # 422 before anything is read
    sample_id = requested_sample()
    (name, stream), = read_uploads(request.files, "image", limit=1)
    result = state().service.classify_upload(stream, name, um_per_px=um_per_px, sample_id=sample_id)
    return jsonify(result_json(result)), 201


@bp.post("/capture")
def capture():
    result = state().service.classify_capture(sample_id=requested_sample())
    return jsonify(result_json(result)), 201


@bp.get("/results")
def list_results():
    store = state().store
    label = request.args.get("label", "").strip()[:100] or None
    review = request.args.get("review", "").strip()[:20] or None  # one of REVIEW_FILTERS, else 400
    limit = int_arg("limit", 50, lo=1, hi=MAX_PAGE)
    offset = int_arg("offset", 0, lo=0, hi=10**9)
    total = store.count(label=label, review=review)
    items = [result_json(r) for r in store.page(label=label, review=review, limit=limit, offset=offset)]
    next_offset = offset + len(items) if offset + len(items) < total else None
    return jsonify({"items": items, "total": total, "limit": limit, "offset": offset,
                    "next_offset": next_offset, "label": label, "review": review,
                    "review_filters": sorted(REVIEW_FILTERS)})


@bp.get("/results/<result_id>")
def get_result(result_id: str):
    return jsonify(result_json(state().store.get(result_id)))


@bp.delete("/results/<result_id>")
def delete_result(result_id: str):
    state().store.delete(result_id)
    return "", 204
