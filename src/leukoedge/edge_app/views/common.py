"""Small helpers the views share: the app state, upload reading, result JSON."""
from __future__ import annotations

import re
from typing import BinaryIO

from flask import current_app, request, url_for
from werkzeug.datastructures import FileStorage

from ...errors import UsageError
from ..storage import StoredResult

_UNSAFE_NAME_CHARS = re.compile(r"[\x00-\x1f\x7f]")


def state():
    """The :class:`~leukoedge.edge_app.app.AppState` of the current app."""
    return current_app.extensions["leukoedge"]


def display_name(upload: FileStorage) -> str:
    """The client's file name, reduced to a harmless label (never used as a path)."""
    name = (upload.filename or "").replace("\\", "/").rsplit("/", 1)[-1]
    return _UNSAFE_NAME_CHARS.sub("", name)[:200] or "upload"


def read_uploads(files, field: str, *, limit: int) -> list[tuple[str, BinaryIO]]:
    """``[(name, stream)]`` from a multipart field, or UsageError saying what arrived instead.

    The streams are Werkzeug's spooled files (on disk above 500 KB); the service
    reads them only once it has a decode slot, so queued requests hold no image bytes.
    """
    uploads = [f for f in files.getlist(field) if f is not None and (f.filename or f.content_length)]
    if not uploads:
        others = sorted(k for k in files.keys() if k != field)
        got = f"; the request had file field(s) {others}" if others else "; the request had no files"
        raise UsageError(f"no image in the multipart field {field!r}{got}",
                         hint=f"send the image as multipart/form-data field {field!r}")
    if len(uploads) > limit:
        raise UsageError(f"{len(uploads)} files is more than the {limit} allowed in one upload")
    return [(display_name(f), f.stream) for f in uploads]


def result_json(result: StoredResult) -> dict:
    out = result.to_dict()
    out["urls"] = {
        "self": url_for("api.get_result", result_id=result.id),
        "page": url_for("ui.result", result_id=result.id),
        "original": url_for("media.image", result_id=result.id, kind="original"),
        "thumbnail": url_for("media.image", result_id=result.id, kind="thumbnail"),
        "heatmap": url_for("media.image", result_id=result.id, kind="heatmap") if result.has_heatmap else None,
    }
    return out


def body_fields(example: str) -> dict:
    """The request's fields: a JSON object body, or the form's fields (so ``curl -d name=...`` works too).

    ``example`` (a JSON object as text) goes into the UsageError for a JSON body that is not an
    object, so the message shows what the route expects.
    """
    if request.is_json:
        body = request.get_json(silent=True)
        if not isinstance(body, dict):
            raise UsageError(f"the request body must be a JSON object, e.g. {example}")
        return body
    return request.form.to_dict()


def int_arg(name: str, default: int, *, lo: int, hi: int) -> int:
    """A whole-number query parameter within [lo, hi], or UsageError (400)."""
    raw = request.args.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise UsageError(f"{name} must be a whole number, not {raw[:20]!r}") from None
    if not lo <= value <= hi:
        raise UsageError(f"{name} must be between {lo} and {hi}")
    return value
