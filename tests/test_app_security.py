"""Access token, CSRF on the API, Origin and Host checks, config rules, debug off."""
from __future__ import annotations

import io
import logging

import numpy as np
import pytest

from leukoedge.edge_app.config import AppConfig
from leukoedge.errors import UsageError

from app_helpers import csrf_from, png_bytes
from bundle_factory import draw_cell

pytest_plugins = ["app_fixtures"]  # shared fixtures, registered once per session

TOKEN = "s3cret-token-for-tests-0123456789"
IMAGE = png_bytes(draw_cell("Early", np.random.default_rng(0), 32))


def _classify(client, **headers):
    return client.post("/api/classify", data={"image": (io.BytesIO(IMAGE), "c.png")},
                       content_type="multipart/form-data", headers=headers)


@pytest.fixture
def token_app(make_app):
    return make_app(host="0.0.0.0", token=TOKEN)


def test_non_loopback_host_needs_a_token_or_explicit_opt_out(tmp_path):
    with pytest.raises(UsageError, match="access token is required"):
        AppConfig(bundle=tmp_path, data_dir=tmp_path, host="0.0.0.0")
    with pytest.raises(UsageError, match="at least 16"):
        AppConfig(bundle=tmp_path, data_dir=tmp_path, host="0.0.0.0", token="short")
    with pytest.raises(UsageError, match="contradict"):
        AppConfig(bundle=tmp_path, data_dir=tmp_path, host="0.0.0.0", token=TOKEN, insecure_no_token=True)
    assert AppConfig(bundle=tmp_path, data_dir=tmp_path, host="0.0.0.0", insecure_no_token=True)
    assert AppConfig(bundle=tmp_path, data_dir=tmp_path).host == "127.0.0.1"
    for host in ("localhost", "::1", "127.0.0.2"):
        assert AppConfig(bundle=tmp_path, data_dir=tmp_path, host=host).loopback_only


def test_insecure_no_token_is_logged_loudly(tmp_path, caplog):
    from leukoedge.edge_app.server import warn_about_exposure

    config = AppConfig(bundle=tmp_path, data_dir=tmp_path, host="0.0.0.0", insecure_no_token=True)
    with caplog.at_level(logging.WARNING):
        warn_about_exposure(config)
    assert any("INSECURE" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)


def test_every_route_needs_the_token(token_app):
    client = token_app.test_client()
    for path in ("/api/health", "/api/results", "/metrics", "/stream.mjpg", "/export.csv"):
        r = client.get(path)
        if path.startswith("/api") or path == "/metrics":
            assert r.status_code == 401 and r.is_json and r.headers["WWW-Authenticate"] == "Bearer", path
        else:
            assert r.status_code == 302 and "/login" in r.headers["Location"], path
    assert _classify(client).status_code == 401
    assert _classify(client, Authorization="Bearer wrong-token-wrong-token").status_code == 401
    assert client.get("/").status_code == 302
    assert token_app.extensions["leukoedge"].store.count() == 0
    assert client.get("/login").status_code == 200 and client.get("/static/style.css").status_code == 200


def test_bearer_token_works_without_csrf(token_app):
    client = token_app.test_client()
    assert _classify(client, Authorization=f"Bearer {TOKEN}").status_code == 201
    assert client.get("/api/results", headers={"Authorization": f"Bearer {TOKEN}"}).json["total"] == 1


def test_query_token_logs_in_once_and_is_stripped_from_the_url(token_app):
    client = token_app.test_client()
    r = client.get(f"/history?token={TOKEN}&label=Early")
    assert r.status_code == 302 and r.headers["Location"] == "/history?label=Early"
    assert client.get("/history?label=Early").status_code == 200  # the session cookie now works
    assert client.get("/api/health").status_code == 200


def test_login_form_and_logout(token_app):
    client = token_app.test_client()
    page = client.get("/login?next=/history")
    token = csrf_from(page.data)
    bad = client.post("/login", data={"csrf_token": token, "token": "nope", "next": "/history"})
    assert bad.status_code == 401
    r = client.post("/login", data={"csrf_token": token, "token": TOKEN, "next": "//evil.example/"})
    assert r.status_code == 303 and r.headers["Location"] == "/"  # no open redirect
    assert client.get("/history").status_code == 200
    client.post("/logout", data={"csrf_token": csrf_from(client.get("/history").data)})
    assert client.get("/history").status_code == 302


def test_cookie_authenticated_api_calls_need_the_csrf_header(token_app):
    client = token_app.test_client()
    client.get(f"/?token={TOKEN}")
    assert _classify(client).status_code == 403
    csrf = csrf_from(client.get("/upload").data)
    assert _classify(client, **{"X-CSRF-Token": csrf}).status_code == 201


def test_cross_site_posts_are_refused(client, app):
    r = _classify(client, Origin="http://evil.example")
    assert r.status_code == 403 and "another site" in r.json["error"]["message"]
    assert _classify(client, Origin="http://localhost").status_code == 201
    assert app.extensions["leukoedge"].store.count() == 1


def test_dns_rebinding_host_is_refused_on_loopback(client):
    r = client.get("/api/health", headers={"Host": "attacker.example:8080"})
    assert r.status_code == 403
    assert client.get("/api/health", headers={"Host": "127.0.0.1:8080"}).status_code == 200


def test_debug_is_off(app):
    assert not app.debug and not app.testing
    assert app.config["MAX_CONTENT_LENGTH"] == 32 * 1024 * 1024


def test_unexpected_errors_are_generic_500_without_internals(app, client, monkeypatch):
    def boom(*a, **k):
        raise ZeroDivisionError("secret internal detail")

    monkeypatch.setattr(app.extensions["leukoedge"].service, "classify_upload", boom)
    r = _classify(client)
    assert r.status_code == 500 and "secret" not in r.get_data(as_text=True)
    assert r.json["error"]["type"] == "InternalError"
    assert client.get("/api/health").status_code == 200


def test_session_key_is_generated_once_and_private(tmp_path):
    from leukoedge.edge_app.security import load_secret_key

    key = load_secret_key(tmp_path)
    assert len(key) == 32 and load_secret_key(tmp_path) == key
    assert (tmp_path / "secret_key").stat().st_mode & 0o777 == 0o600


def test_wrong_query_token_does_not_log_in(token_app):
    client = token_app.test_client()
    r = client.get("/history?token=not-the-token-at-all")
    assert r.status_code == 302 and "/login" in r.headers["Location"]
    assert client.get("/history").status_code == 302
