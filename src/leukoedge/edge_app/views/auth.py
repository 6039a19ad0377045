"""Log in once with the access token (form or ``?token=``); log out."""
from __future__ import annotations

from urllib.parse import urlsplit

from flask import Blueprint, redirect, render_template, request, url_for

from ..security import AuthRequiredError, check_token, log_in, log_out

bp = Blueprint("auth", __name__)


def _safe_next(target: str | None) -> str:
    """Only same-site relative paths: no open redirect to another host.

    Browsers drop tabs and newlines from URLs and read a backslash as a slash,
    so ``/%09/evil.example`` (a tab) becomes ``//evil.example`` once followed (issue 13):
    any whitespace, control character or backslash refuses the target, and what
    is left must parse as a path with no scheme and no host.
    """
    if not target or len(target) > 2000 or not target.startswith("/"):
        return url_for("ui.live")
    if any(c.isspace() or ord(c) < 32 or ord(c) == 127 or c == "\\" for c in target):
        return url_for("ui.live")
    parts = urlsplit(target)
    if parts.scheme or parts.netloc or target.startswith("//") or not parts.path.startswith("/"):
        return url_for("ui.live")
    return target


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
