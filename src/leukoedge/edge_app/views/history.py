"""History of results: browse, filter by label and review state, delete, export as CSV or JSON.

The review filter (``review=reviewed|unreviewed|disagreed``, see
:data:`~leukoedge.edge_app.storage.REVIEW_FILTERS`) applies to the page and to
both exports; the JSON export also lists the samples, so a sample id in a
result can be read as the name the lab gave it.
"""
from __future__ import annotations

import csv
import io
import json

from flask import Blueprint, Response, redirect, render_template, request, url_for

from ... import RESEARCH_NOTICE
from ..storage import csv_rows
from .common import int_arg, result_json, state

bp = Blueprint("history", __name__)
PAGE_SIZE = 24


def _label_arg() -> str | None:
    label = request.args.get("label", "").strip()
    return label[:100] or None


def _review_arg() -> str | None:
    """One of REVIEW_FILTERS or None; anything else is a 400 from the store."""
    return request.args.get("review", "").strip()[:20] or None


@bp.get("/history")
def history():
    store = state().store
    label, review = _label_arg(), _review_arg()
    page = int_arg("page", 1, lo=1, hi=1_000_000)
    total = store.count(label=label, review=review)
    results = store.page(label=label, review=review, limit=PAGE_SIZE, offset=(page - 1) * PAGE_SIZE)
    labels = sorted(set(state().service.model_info["labels"]) | set(store.labels()))
    return render_template("history.html", results=results, label=label, review=review, labels=labels,
                           page=page, pages=max(1, -(-total // PAGE_SIZE)), total=total)


@bp.post("/results/<result_id>/delete")
def delete(result_id: str):
    state().store.delete(result_id)
    return redirect(url_for("history.history", label=request.form.get("label") or None), code=303)


@bp.get("/export.csv")
def export_csv():
    store = state().store
    classes = list(state().service.model_info["labels"])
    out = io.StringIO()
    writer = csv.writer(out)
    for row in csv_rows(store.iter_all(label=_label_arg(), review=_review_arg()), classes):
        writer.writerow(row)
    return Response(out.getvalue(), mimetype="text/csv",
                    headers={"Content-Disposition": "attachment; filename=leukoedge-results.csv"})


@bp.get("/export.json")
def export_json():
    store = state().store
    body = {"research_notice": RESEARCH_NOTICE,
            "samples": [s.to_dict() for s in store.samples(limit=1_000_000)],
            "results": [result_json(r) for r in store.iter_all(label=_label_arg(), review=_review_arg())]}
    return Response(json.dumps(body, indent=1), mimetype="application/json",
                    headers={"Content-Disposition": "attachment; filename=leukoedge-results.json"})
