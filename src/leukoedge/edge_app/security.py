"""Access control for a web app on a lab network: token, CSRF, Host check, headers.

- **Token** (when configured): every request except the login page and static
  files must carry ``Authorization: Bearer T``, or the signed session cookie
  set after logging in (form, or ``?token=T`` once, which is then stripped from
  the URL). Comparison is constant-time. The session holds a fingerprint of
  the token, so changing the token logs everyone out.
- **CSRF**: every state-changing form carries a per-session token checked on
  POST; API calls authenticated by the session cookie must send it as
  ``X-CSRF-Token``; any unsafe request whose ``Origin`` is not this site is
  refused (a page on another site cannot make a lab browser classify or
  delete). Bearer-token clients are not browsers and need neither.
- **Host check** (every mode, with or without a token): bound to loopback,
  a ``Host`` header that is not a loopback name is refused; listening on the
  network, only IP literals, this machine's own names and ``--allowed-host``
  names are accepted. That defeats DNS rebinding: a page on another site that
  points its own name at this station's address gets 403, not results
  (:meth:`AppConfig.host_allowed`).
- **Headers**: a strict Content-Security-Policy (no inline script or style,
  nothing from other origins: the app runs offline), nosniff, no framing,
  no referrer to other sites (the ``?token=`` URL never leaks).
"""
from __future__ import annotations

import hashlib
import hmac
import secrets
import socket
from functools import lru_cache
from pathlib import Path
from urllib.parse import urlencode, urlsplit

from flask import Flask, Response, current_app, g, redirect, request, session, url_for

from ..errors import LeukoEdgeError
from ..files import atomic_write_bytes
from .config import AppConfig

UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
OPEN_ENDPOINTS = frozenset({"auth.login", "static"})
CSP = ("default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
       "object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'")


class AuthRequiredError(LeukoEdgeError):
    """No valid access token on a request that needs one."""

    http_status = 401


class ForbiddenError(LeukoEdgeError):
    """A request refused for safety: bad CSRF token, foreign Origin, unexpected Host."""

    http_status = 403


def load_secret_key(data_dir: Path) -> bytes:
    """The session-signing key, generated once and kept (mode 0600) so restarts keep logins."""
    path = Path(data_dir) / "secret_key"
    if path.is_file() and path.stat().st_size >= 32:
        return path.read_bytes()
    key = secrets.token_bytes(32)
    atomic_write_bytes(path, key, mode=0o600)
    return key


def _fingerprint(token: str) -> str:
    return hashlib.sha256(b"leukoedge-session:" + token.encode()).hexdigest()


def csrf_token() -> str:
    """This session's CSRF token (created on first use); templates call it."""
    token = session.get("csrf")
    if not token:
        token = session["csrf"] = secrets.token_urlsafe(32)
    return token


def is_api_request() -> bool:
    return request.path.startswith("/api/") or request.path == "/metrics"


def log_in() -> None:
    session["auth"] = _fingerprint(current_app.extensions["leukoedge"].config.token or "")
    session.permanent = True


def log_out() -> None:
    session.clear()


def check_token(candidate: str) -> bool:
    token = current_app.extensions["leukoedge"].config.token
    return bool(token) and hmac.compare_digest(candidate.encode(), token.encode())


def init_security(app: Flask, config: AppConfig) -> None:
    app.before_request(_check_host)
    app.before_request(_check_auth)
    app.before_request(_check_csrf)
    app.after_request(_security_headers)
    app.jinja_env.globals["csrf_token"] = csrf_token


def _config() -> AppConfig:
    return current_app.extensions["leukoedge"].config


@lru_cache(maxsize=1)
def machine_names() -> frozenset[str]:
    """This machine's own names, as a browser on the lab network may type them."""
    names = set()
    try:
        host = socket.gethostname().strip().lower()
        names.update({host, f"{host}.local", host.split(".")[0], f"{host.split('.')[0]}.local",
                      socket.getfqdn().strip().lower()})
    except OSError:
        pass
    return frozenset(n.rstrip(".") for n in names if n)


def _check_host() -> None:
    config = _config()
    try:
        hostname = urlsplit("//" + request.host).hostname or ""
    except ValueError:  # e.g. an unbalanced "[" in the Host header
        hostname = ""
    if not config.host_allowed(hostname, machine_names()):
        where = "on localhost" if config.loopback_only else "by its IP address or its own names"
        raise ForbiddenError(f"unexpected Host header {request.host[:80]!r}: this app only answers {where}",
                             hint=None if config.loopback_only else
                             "to reach it by another DNS name, restart it with --allowed-host NAME")


def _check_auth() -> Response | None:
    config = _config()
    g.auth = "none"
    if not config.requires_token or request.endpoint in OPEN_ENDPOINTS:
        return None
    header = request.headers.get("Authorization", "")
    if header[:7].lower() == "bearer " and check_token(header[7:].strip()):
        g.auth = "bearer"
        return None
    if hmac.compare_digest(str(session.get("auth", "")), _fingerprint(config.token or "")):
        g.auth = "session"
        return None
    query_token = request.args.get("token")
    if query_token is not None and request.method == "GET" and check_token(query_token):
        log_in()
        rest = [(k, v) for k, v in request.args.items(multi=True) if k != "token"]
        return redirect(request.path + ("?" + urlencode(rest) if rest else ""))
    if is_api_request() or request.method != "GET":
        raise AuthRequiredError("an access token is required",
                                hint="send 'Authorization: Bearer <token>' or log in at /login")
    return redirect(url_for("auth.login", next=request.full_path if request.query_string else request.path))


def _check_csrf() -> None:
    if request.method not in UNSAFE_METHODS or g.get("auth") == "bearer":
        return
    origin = request.headers.get("Origin")
    if origin is not None and origin != request.host_url.rstrip("/"):
        raise ForbiddenError(f"refused a {request.method} from another site ({origin[:80]})")
    if is_api_request():
        if g.get("auth") == "session" and not _same(request.headers.get("X-CSRF-Token"), session.get("csrf")):
            raise ForbiddenError("missing or wrong X-CSRF-Token header for a cookie-authenticated API call")
        return
    if not _same(request.form.get("csrf_token"), session.get("csrf")):
        raise ForbiddenError("this form has expired or did not come from this app; reload the page and try again")


def _same(a: str | None, b: str | None) -> bool:
    return bool(a) and bool(b) and hmac.compare_digest(str(a).encode(), str(b).encode())


def _security_headers(response: Response) -> Response:
    response.headers.setdefault("Content-Security-Policy", CSP)
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["X-Frame-Options"] = "DENY"
    # same-origin, not no-referrer: with no-referrer Chromium sends "Origin: null" on form posts.
    response.headers["Referrer-Policy"] = "same-origin"
    if response.mimetype in ("text/html", "application/json"):
        response.headers.setdefault("Cache-Control", "no-store")
    return response
