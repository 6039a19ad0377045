"""History of results: browse, filter by label, delete, export as CSV or JSON."""
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


@bp.get("/history")
def history():
    store = state().store
    label = _label_arg()
    page = int_arg("page", 1, lo=1, hi=1_000_000)
    total = store.count(label=label)
    results = store.page(label=label, limit=PAGE_SIZE, offset=(page - 1) * PAGE_SIZE)
    labels = sorted(set(state().service.model_info["labels"]) | set(store.labels()))
    return render_template("history.html", results=results, label=label, labels=labels, page=page,
                           pages=max(1, -(-total // PAGE_SIZE)), total=total)


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
    for row in csv_rows(store.iter_all(label=_label_arg()), classes):
        writer.writerow(row)
    return Response(out.getvalue(), mimetype="text/csv",
                    headers={"Content-Disposition": "attachment; filename=leukoedge-results.csv"})


@bp.get("/export.json")
def export_json():
    store = state().store
    body = {"research_notice": RESEARCH_NOTICE,
            "results": [result_json(r) for r in store.iter_all(label=_label_arg())]}
    return Response(json.dumps(body, indent=1), mimetype="application/json",
                    headers={"Content-Disposition": "attachment; filename=leukoedge-results.json"})
