"""Lock and unlock the camera's exposure and white balance: JSON API and the live page's forms.

    curl -H "Authorization: Bearer $T" -X POST http://pi:8080/api/camera/lock
    curl -H "Authorization: Bearer $T" http://pi:8080/api/camera/settings

The API answers the lock state (:meth:`CameraLock.state`); the forms (``/camera/lock``,
``/camera/unlock``, CSRF token in the form) redirect back to the live page, so
the buttons work without JavaScript. Access rules are the app's own
(``security.py``): token, CSRF (form field, or ``X-CSRF-Token`` for
cookie-authenticated API calls), Origin and Host checks apply to these POSTs as
to every other.

The app's one :class:`~leukoedge.edge_app.camera.CameraLock` is created, and a
saved lock re-applied, when this blueprint is registered (once per app, at
start-up), so registering the blueprint is all ``create_app`` does for it.
"""
from __future__ import annotations

from flask import Blueprint, current_app, jsonify, redirect, url_for

from ..camera import CameraLock

bp = Blueprint("camera", __name__)
_EXTENSION = "leukoedge.camera_lock"


@bp.record_once
def _init_lock(setup) -> None:
    """At registration: one lock per app, the saved one re-applied (logged), a template global for the page."""
    app = setup.app
    st = app.extensions["leukoedge"]
    lock = CameraLock(st.service.camera, st.config.data_dir)
    lock.restore()
    app.extensions[_EXTENSION] = lock
    app.jinja_env.globals["camera_lock_state"] = lock_state


def camera_lock() -> CameraLock:
    return current_app.extensions[_EXTENSION]


def lock_state() -> dict:
    """The lock state of the current app (health, the live page)."""
    return camera_lock().state()


@bp.get("/api/camera/settings")
def settings():
    return jsonify(lock_state())


@bp.post("/api/camera/lock")
def lock():
    return jsonify(camera_lock().lock())


@bp.post("/api/camera/unlock")
def unlock():
    return jsonify(camera_lock().unlock())


@bp.post("/camera/lock")
def lock_form():
    camera_lock().lock()
    return redirect(url_for("ui.live"), code=303)


@bp.post("/camera/unlock")
def unlock_form():
    camera_lock().unlock()
    return redirect(url_for("ui.live"), code=303)

