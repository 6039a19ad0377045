"""Review: a person sets each result's true label (or "unusable"); the device reports its agreement.

    curl -X POST -H 'Content-Type: application/json' -d '{"label": "Pro", "note": "lobed"}' \\
         http://127.0.0.1:8080/api/results/$ID/review
    curl http://127.0.0.1:8080/api/agreement

A review label must be one of the loaded bundle's classes or ``unusable``;
anything else, an unknown or deleted result, or a note over 500 characters is
a 4xx and stores nothing. A new review replaces the previous one (with its
time): the reviewer's latest word is the one that counts.

The review page lists the results that most need a person first
(:meth:`ResultStore.review_queue`): abstentions, retakes, then confidence below
:data:`LOW_CONFIDENCE`, then the rest.
"""
from __future__ import annotations

from flask import Blueprint, jsonify, redirect, render_template, request, url_for

from ...errors import UsageError
from ..agreement import agreement, format_agreement
from ..storage import REVIEW_UNUSABLE, check_result_id, iso_time
from .common import body_fields, int_arg, result_json, state

bp = Blueprint("review", __name__)
#: Top-class probability under which an unreviewed result is queued before the confident ones. At 0.6 the
#: other classes together hold at least 40 %: a close call a person should see early. It only orders the
#: queue (nothing is hidden or refused by it), so its exact value matters little; the abstention
#: threshold, fitted per bundle, is what decides whether a label is given at all.
LOW_CONFIDENCE = 0.6
PAGE_SIZE = 50


@bp.record_once
def _init(setup) -> None:
    """Template filter ``utc`` (a stored time as "2026-12-01 10:20:30 UTC") and ``format_agreement``."""
    setup.app.jinja_env.filters["utc"] = lambda stamp: (iso_time(stamp) or "").replace("T", " ").replace("Z", " UTC")
    setup.app.jinja_env.globals["format_agreement"] = format_agreement


def review_labels() -> list[str]:
    """What a reviewer may answer: the bundle's classes, then ``unusable``."""
    return [*state().service.model_info["labels"], REVIEW_UNUSABLE]


def _review(result_id: str, label: object, note: object):
    """Check the label against the bundle and store the review; UsageError (400) for any other label."""
    check_result_id(result_id)
    allowed = review_labels()
    if not isinstance(label, str) or label.strip() not in allowed:
        shown = label[:40] if isinstance(label, str) else label
        raise UsageError(f"{shown!r} is not a label of this model; use one of {allowed}",
                         hint="'unusable' marks a capture no class fits")
    return state().store.review(result_id, label.strip(), note if note is not None else "")


def agreement_now(sample_id: str | None = None):
    return agreement(state().store.review_pairs(sample_id=sample_id), state().service.model_info["labels"])


@bp.post("/api/results/<result_id>/review")
def api_review(result_id: str):
    body = body_fields('{"label": "Pro"}')
    return jsonify(result_json(_review(result_id, body.get("label"), body.get("note")))), 200


@bp.post("/results/<result_id>/review")
def review_form(result_id: str):
    result = _review(result_id, request.form.get("label"), request.form.get("note"))
    if request.form.get("back") == "review":
        return redirect(url_for("review.queue"), code=303)
    return redirect(url_for("ui.result", result_id=result.id), code=303)


@bp.get("/api/agreement")
def api_agreement():
    return jsonify(agreement_now().to_dict())


@bp.get("/review")
def queue():
    store = state().store
    page = int_arg("page", 1, lo=1, hi=1_000_000)
    waiting = store.count(review="unreviewed")
    results = store.review_queue(low_confidence=LOW_CONFIDENCE, limit=PAGE_SIZE, offset=(page - 1) * PAGE_SIZE)
    return render_template("review.html", results=results, waiting=waiting, page=page,
                           pages=max(1, -(-waiting // PAGE_SIZE)), agreement=agreement_now(),
                           reviewed=store.count(review="reviewed"), low_confidence=LOW_CONFIDENCE)
