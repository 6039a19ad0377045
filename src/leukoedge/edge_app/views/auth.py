"""Log in once with the access token (form or ``?token=``); log out."""
from __future__ import annotations

from flask import Blueprint, redirect, render_template, request, url_for

from ..security import AuthRequiredError, check_token, log_in, log_out

bp = Blueprint("auth", __name__)


def _safe_next(target: str | None) -> str:
    """Only same-site relative paths: no open redirect to another host."""
    if target and target.startswith("/") and not target.startswith("//") and "\\" not in target:
        return target
    return url_for("ui.live")


@bp.route("/login", methods=["GET", "POST"])
def login():
    if request.method == "GET":
        return render_template("login.html", next=_safe_next(request.args.get("next")))
    if not check_token(request.form.get("token", "")):
        raise AuthRequiredError("wrong access token", hint="ask whoever set up this station for the token")
    log_in()
    return redirect(_safe_next(request.form.get("next")), code=303)


@bp.post("/logout")
def logout():
    log_out()
    return redirect(url_for("auth.login"), code=303)
