"""The Scale page and API: how many micrometres one camera pixel covers, and how that was found.

    curl -H "Authorization: Bearer $T" http://pi:8080/api/scale
    curl -H "Authorization: Bearer $T" -H "Content-Type: application/json" -d '{"um_per_px": 0.08}' \
         http://pi:8080/api/scale
    curl -H "Authorization: Bearer $T" -F method=micrometer -F division_um=10 -F image=@ruler.jpg \
         http://pi:8080/api/scale
    curl -H "Authorization: Bearer $T" -H "Content-Type: application/json" -d '{"method": "field"}' \
         http://pi:8080/api/scale                       # a still from the camera, measured by its red cells
    curl -H "Authorization: Bearer $T" -X DELETE http://pi:8080/api/scale

Requests are read by :func:`leukoedge.edge_app.calibrate.calibrate`; the
calibration is saved only when the measurement succeeded (every failure is a
4xx and leaves the previous calibration in place). Access rules are the app's
own (``security.py``): token, CSRF (form field, or ``X-CSRF-Token`` for
cookie-authenticated API calls), Origin and Host checks apply as everywhere.
"""
from __future__ import annotations

from flask import Blueprint, jsonify, redirect, render_template, request, url_for

from ..calibrate import calibrate, default_rbc_um
from ..calibration import (MAX_DIVISION_UM, MAX_UM_PER_PX, METHODS, MIN_DIVISION_UM, MIN_UM_PER_PX,
                           UNCALIBRATED_LINE, format_um)
from .common import body_fields, state

bp = Blueprint("scale", __name__)


def scale_status() -> dict:
    """What the station knows about its scale: health, the header, ``GET /api/scale``."""
    st = state()
    current = st.calibration.current
    model_um = st.service.model_um_per_px
    if current is not None:
        applied = f"every capture is classified at {format_um(current.um_per_px)} um/px"
    else:
        applied = "each capture's scale is estimated from its red cells"
    if model_um is None:
        applied = "this model does not record its training scale: each frame is stretched whole to its input"
    return {
        "calibrated": current is not None,
        "um_per_px": None if current is None else current.um_per_px,
        "method": None if current is None else current.method,
        "description": UNCALIBRATED_LINE if current is None else current.describe(),
        "calibration": None if current is None else current.to_dict(),
        "load_error": st.calibration.load_error,
        "applied": applied,
        "model_um_per_px": model_um,
    }


def _upload():
    upload = request.files.get("image")
    if upload is None or not (upload.filename or upload.content_length):
        return None
    return upload.stream


def _calibrate_and_save():
    st = state()
    return st.calibration.save(calibrate(st.service, body_fields('{"um_per_px": 0.08}'), _upload()))


@bp.get("/scale")
def page():
    st = state()
    return render_template("scale.html", scale=scale_status(), current=st.calibration.current, methods=METHODS,
                           camera=st.service.camera is not None, default_rbc_um=default_rbc_um(),
                           limits={"min_um": MIN_UM_PER_PX, "max_um": MAX_UM_PER_PX,
                                   "min_div": MIN_DIVISION_UM, "max_div": MAX_DIVISION_UM},
                           saved=request.args.get("saved") == "1", forgotten=request.args.get("forgotten") == "1")


@bp.post("/scale")
def calibrate_form():
    _calibrate_and_save()
    return redirect(url_for("scale.page", saved=1), code=303)


@bp.post("/scale/forget")
def forget_form():
    state().calibration.clear()
    return redirect(url_for("scale.page", forgotten=1), code=303)


@bp.get("/api/scale")
def get_scale():
    return jsonify(scale_status())


@bp.post("/api/scale")
def post_scale():
    _calibrate_and_save()
    return jsonify(scale_status()), 201


@bp.delete("/api/scale")
def delete_scale():
    forgotten = state().calibration.clear()
    return jsonify({**scale_status(), "forgotten": forgotten})
