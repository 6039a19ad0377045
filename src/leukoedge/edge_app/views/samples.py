"""Samples: a slide or case the user names, whose fields are captured and reviewed together.

    curl -X POST -H 'Content-Type: application/json' -d '{"name": "slide 12"}' http://127.0.0.1:8080/api/samples
    curl -F image=@field.jpg -F sample=$ID http://127.0.0.1:8080/api/classify
    curl http://127.0.0.1:8080/api/samples/$ID

JSON API (``/api/samples...``) and the pages' forms (``/samples...``, CSRF token
in the form, redirect afterwards) share the store's rules: a name is 1-100
characters on one line, ids are made by the store, a closed sample takes no
more fields, deleting a sample deletes its results.

The "current sample" of the live and upload pages is remembered in the signed
session cookie, i.e. per browser, not per station: two people at two computers
(one at the microscope, one uploading another slide's files) never file each
other's fields, and a restart keeps it (the session key is kept in DATA_DIR).
The pages' capture and upload forms carry it as a hidden ``sample`` field, so a
field goes to the sample the page SHOWED when the button was pressed, even if
another tab switched meanwhile. API clients name the sample in each request
(``sample``); they have no current sample, so a script never files into
whatever a browser last chose.
"""
from __future__ import annotations

import time

from flask import Blueprint, jsonify, redirect, render_template, request, session, url_for

from ...errors import UsageError
from ..samples import short_sha, summary_of
from ..storage import Sample, SampleNotFoundError, check_sample_id
from .common import body_fields, state

bp = Blueprint("samples", __name__)
_SESSION_KEY = "sample"
#: Samples offered in the selector and listed on /samples (newest first); older ones stay reachable by id.
LIST_LIMIT = 200


# -- the current sample (pages) ------------------------------------------------------
def current_sample() -> Sample | None:
    """This browser's current sample, if it still exists and is open (otherwise forgotten)."""
    sample_id = session.get(_SESSION_KEY)
    if not sample_id:
        return None
    try:
        sample = state().store.get_sample(sample_id)
    except SampleNotFoundError:
        sample = None
    if sample is None or sample.closed:
        session.pop(_SESSION_KEY, None)
        return None
    return sample


def sample_selector() -> dict:
    """What the live and upload pages' selector shows (a template global)."""
    return {"current": current_sample(), "open": [s for s in state().store.samples(limit=LIST_LIMIT) if not s.closed]}


def requested_sample() -> str | None:
    """The ``sample`` field of a form or a JSON body: a checked id, or None for "no sample"."""
    raw = request.form.get("sample")
    if raw is None and request.is_json:
        body = request.get_json(silent=True)
        raw = body.get("sample") if isinstance(body, dict) else None
    if raw is None:
        return None
    if not isinstance(raw, str):
        raise UsageError("sample must be a sample id (text)", hint="create one with POST /api/samples")
    raw = raw.strip()
    return check_sample_id(raw) if raw else None


@bp.record_once
def _init(setup) -> None:
    """Template global ``sample_selector`` and filter ``short_sha`` (a bundle checksum's first digits)."""
    setup.app.jinja_env.globals["sample_selector"] = sample_selector
    setup.app.jinja_env.filters["short_sha"] = short_sha


def _labels() -> list[str]:
    return list(state().service.model_info["labels"])


# -- API -------------------------------------------------------------------------------
@bp.post("/api/samples")
def api_create():
    body = body_fields('{"name": "slide 12"}')
    sample = state().store.create_sample(body.get("name"), body.get("note") or "")
    return jsonify({**sample.to_dict(), "url": url_for("samples.api_get", sample_id=sample.id)}), 201


@bp.get("/api/samples")
def api_list():
    return jsonify({"items": [s.to_dict() for s in state().store.samples(limit=LIST_LIMIT)], "limit": LIST_LIMIT})


@bp.get("/api/samples/<sample_id>")
def api_get(sample_id: str):
    return jsonify(summary_of(state().store, sample_id, _labels()).to_dict())


@bp.post("/api/samples/<sample_id>/close")
def api_close(sample_id: str):
    return jsonify(state().store.close_sample(sample_id).to_dict())


@bp.delete("/api/samples/<sample_id>")
def api_delete(sample_id: str):
    return jsonify({"id": sample_id, "deleted_results": state().store.delete_sample(sample_id)})


# -- pages and forms ----------------------------------------------------------------------
def _back(default: str = "samples.list_page"):
    """Back to the page the form came from: one of a fixed set of endpoints, never a client URL."""
    target = request.form.get("back", "")
    endpoint = {"live": "ui.live", "upload": "ui.upload_form"}.get(target, default)
    return redirect(url_for(endpoint), code=303)


@bp.get("/samples")
def list_page():
    return render_template("samples.html", samples=state().store.samples(limit=LIST_LIMIT),
                           current=current_sample(), limit=LIST_LIMIT)


@bp.post("/samples")
def create_form():
    sample = state().store.create_sample(request.form.get("name"), request.form.get("note") or "")
    session[_SESSION_KEY] = sample.id
    return _back()


@bp.post("/samples/current")
def switch_form():
    """Make a sample current ("" = none); a closed or unknown sample is refused."""
    sample_id = requested_sample()
    if sample_id is None:
        session.pop(_SESSION_KEY, None)
    else:
        session[_SESSION_KEY] = state().store.open_sample(sample_id).id
    return _back()


@bp.post("/samples/<sample_id>/close")
def close_form(sample_id: str):
    state().store.close_sample(sample_id)
    if session.get(_SESSION_KEY) == sample_id:
        session.pop(_SESSION_KEY, None)
    if request.form.get("back"):
        return _back()
    return redirect(url_for("samples.page", sample_id=sample_id), code=303)


@bp.post("/samples/<sample_id>/delete")
def delete_form(sample_id: str):
    """Delete the sample and its results: the form must carry the ticked ``confirm`` box.

    The box (besides the page's JavaScript confirm) makes the confirmation hold
    without JavaScript too; it deletes every field of a slide, not one result.
    """
    check_sample_id(sample_id)
    if request.form.get("confirm") != "yes":
        raise UsageError("tick the box to confirm that the sample and all its results are to be deleted",
                         hint="nothing was deleted")
    state().store.delete_sample(sample_id)
    if session.get(_SESSION_KEY) == sample_id:
        session.pop(_SESSION_KEY, None)
    return redirect(url_for("samples.list_page"), code=303)


def _page_context(sample_id: str) -> dict:
    store = state().store
    summary = summary_of(store, sample_id, _labels())
    results = list(store.sample_results(summary.sample.id))
    return {"summary": summary, "results": results, "info": state().service.model_info,
            "current": current_sample()}


@bp.get("/samples/<sample_id>")
def page(sample_id: str):
    return render_template("sample.html", **_page_context(sample_id))


@bp.get("/samples/<sample_id>/report")
def report(sample_id: str):
    """The printable report: every field, the notice on every printed page, and which bundle made each field.

    The checksum printed is the one stored with each result, not the bundle
    loaded now (a station may have had another since): one checksum in the
    header and the footer when every field shares it; when the fields come from
    several bundles, a warning, a list of them, and each field's own checksum.

    No PDF: no small pure-Python HTML-to-PDF library is installed on the station,
    and the browser's "Print / Save as PDF" of this page (print CSS) gives one.
    """
    context = _page_context(sample_id)
    context["generated"] = time.time()
    return render_template("report.html", **context)
