"""The ONE place where errors become HTTP responses.

Typed :class:`~leukoedge.errors.LeukoEdgeError` exceptions carry their own
status and user message; Werkzeug's HTTP exceptions (404, 405, 413, ...) keep
their status with a plain-language message. API paths get JSON
``{"error": {...}}``; pages get the error page, which repeats the upload form
so the lab member can try again. Anything else is a bug: it is logged with its
traceback and answered with a generic 500 that leaks no internals.
"""
from __future__ import annotations

import logging

from flask import Flask, current_app, jsonify, render_template, request
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from ..errors import LeukoEdgeError
from .config import MAX_FORM_FIELD_BYTES
from .security import is_api_request

log = logging.getLogger(__name__)

_HTTP_MESSAGES = {
    400: "the request could not be understood",
    404: "there is nothing at this address",
    405: "this address does not accept that method",
}


def _describe(err: Exception) -> tuple[int, str, str, str | None]:
    """(status, type name, message, hint) for any exception."""
    if isinstance(err, LeukoEdgeError):
        return err.http_status, type(err).__name__, err.message, err.hint
    if isinstance(err, RequestEntityTooLarge):
        return (413, "UploadTooLarge", *_too_large_message())
    if isinstance(err, HTTPException):
        status = err.code or 500
        return status, type(err).__name__, _HTTP_MESSAGES.get(status, err.description or err.name), None
    log.exception("unexpected error on %s %s", request.method, request.path)
    return 500, "InternalError", "an unexpected error occurred; it has been logged", None


def _mb(nbytes: float) -> str:
    """Sizes in the unit of ``--max-upload-mb`` (MiB, written MB as the flag does)."""
    value = nbytes / 2**20
    return f"{value:.1f} MB" if value < 100 and value != int(value) else f"{value:.0f} MB"


def _too_large_message() -> tuple[str, str]:
    """What a 413 means: the whole request over the size limit, or one form part over its own limit.

    Werkzeug raises the same exception for both; only the first is about the image's size.
    """
    limit = current_app.config["MAX_CONTENT_LENGTH"]
    length = request.content_length
    if length is not None and limit is not None and length > limit:
        return (f"the upload is {_mb(length)} ({length:,} bytes), more than this station's "
                f"{_mb(limit)} limit ({limit:,} bytes)",
                "send a smaller image or fewer images at once (the limit is set by `leukoedge serve --max-upload-mb`)")
    parts = current_app.config.get("MAX_FORM_PARTS")
    return (f"a form field is larger than {MAX_FORM_FIELD_BYTES // 1024} KB, or the form has more than "
            f"{parts} parts", "send images as file fields; text fields only carry short values")


def handle_error(err: Exception):
    status, kind, message, hint = _describe(err)
    state = current_app.extensions["leukoedge"]
    state.metrics.error(kind)
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else {}
    if isinstance(err, HTTPException) and status == 405:
        headers.update({k: v for k, v in err.get_headers() if k == "Allow"})
    if is_api_request():
        body = {"error": {"type": kind, "message": message, "hint": hint, "status": status}}
        return jsonify(body), status, headers
    page = render_template("error.html", status=status, message=message, hint=hint,
                           show_upload=request.endpoint in ("ui.upload", "ui.capture"),
                           nothing_stored=request.endpoint in ("scale.calibrate_form", "scale.forget_form"))
    return page, status, headers


def init_error_handlers(app: Flask) -> None:
    app.register_error_handler(Exception, handle_error)
