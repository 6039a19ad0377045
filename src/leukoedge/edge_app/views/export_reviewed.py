"""``GET /export/reviewed.zip``: the reviewed captures as a training set (:mod:`..reviewed_export`).

The review, samples, sample and history pages link here (``_reviewed_export.html``).
Auth, host and origin checks are the app's own (``before_request``), as for
the history exports. The export is planned before the response starts, so
"nothing reviewed yet" is a clear 404 from the app's error handler rather than
a broken download; then the zip is streamed piece by piece, so its size never
sits in memory (a Pi has little of it) and the download starts at once.
"""
from __future__ import annotations

import time

from flask import Blueprint, Response, stream_with_context

from ..reviewed_export import iter_zip, plan_export
from ..storage import REVIEW_UNUSABLE
from .common import state

bp = Blueprint("export_reviewed", __name__)


def exportable_count() -> int:
    """Reviewed results the zip would hold (``unusable`` reviews are left out), from one grouped query.

    The template global ``reviewed_export_count``: the pages show the link only
    when there is something to download, instead of a link to a 404.
    """
    return sum(n for _, label, _, _, n in state().store.review_pairs() if label != REVIEW_UNUSABLE)


@bp.record_once
def _init(setup) -> None:
    setup.app.jinja_env.globals["reviewed_export_count"] = exportable_count


@bp.get("/export/reviewed.zip")
def reviewed_zip():
    plan = plan_export(state().store)
    name = f"leukoedge-reviewed-{time.strftime('%Y%m%d', time.localtime(plan.exported_at))}.zip"
    return Response(stream_with_context(iter_zip(plan)), mimetype="application/zip",
                    headers={"Content-Disposition": f"attachment; filename={name}",
                             "Cache-Control": "no-store"})
