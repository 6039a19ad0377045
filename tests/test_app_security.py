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


# -- issue 13: hostile requests ----------------------------------------------------------------
@pytest.mark.parametrize("target", ["/\t/evil.example", "/\n/evil.example", "/\r/evil.example", "/\\evil.example",
                                    "//evil.example", "/\\/evil.example", "https://evil.example/", " /evil",
                                    "/\x00//evil.example", "/ /evil.example"])
def test_login_never_redirects_off_site(token_app, target):
    """``/login?next=/%09/evil.example`` used to send the user to //evil.example once the token was entered."""
    client = token_app.test_client()
    page = client.get("/login", query_string={"next": target}).get_data(as_text=True)
    assert "evil.example" not in page
    r = client.post("/login", data={"csrf_token": csrf_from(page), "token": TOKEN, "next": target})
    assert r.status_code == 303
    location = r.headers["Location"]
    assert location == "/" and "evil" not in location


def test_the_reported_tab_redirect_url_stays_on_site(token_app):
    client = token_app.test_client()
    page = client.get("/login?next=/%09/evil.example").get_data(as_text=True)  # exactly as reported
    assert "evil.example" not in page and 'name="next" value="/"' in page


def test_login_keeps_a_same_site_next_page(token_app):
    client = token_app.test_client()
    token = csrf_from(client.get("/login").data)
    r = client.post("/login", data={"csrf_token": token, "token": TOKEN, "next": "/history?label=Pro&offset=50"})
    assert r.status_code == 303 and r.headers["Location"] == "/history?label=Pro&offset=50"


@pytest.fixture
def open_app(make_app):
    return make_app(host="0.0.0.0", insecure_no_token=True, allowed_hosts=("scope-3.lab.example",))


def test_dns_rebinding_is_refused_without_a_token_too(open_app):
    """--insecure-no-token used to drop the Host check: any page a lab browser visited could read and delete."""
    from leukoedge.edge_app.security import machine_names

    client = open_app.test_client()
    for host in ("attacker.example", "attacker.example:8080", "evil.192.168.1.5.nip.io"):
        r = client.get("/api/results", headers={"Host": host})
        assert r.status_code == 403 and "--allowed-host" in r.json["error"]["hint"], host
        assert client.delete(f"/api/results/{'0' * 32}", headers={"Host": host}).status_code == 403
    for host in ("192.168.1.5:8080", "[fe80::1]:8080", "localhost:8080", "scope-3.lab.example",
                 *sorted(machine_names())):
        assert client.get("/api/results", headers={"Host": host}).status_code == 200, host


def test_allowed_host_names_are_validated(tmp_path):
    with pytest.raises(UsageError, match="not a host name"):
        AppConfig(bundle=tmp_path, data_dir=tmp_path, host="0.0.0.0", token=TOKEN, allowed_hosts=("evil/x",))


def test_every_page_warns_when_running_without_a_token(open_app, token_app, client):
    pages = ("/", "/upload", "/history")
    c = open_app.test_client()
    for path in pages:
        html = c.get(path).get_data(as_text=True)
        assert 'id="no-token-warning"' in html and "anyone on this network" in html, path
    tc = token_app.test_client()
    tc.post("/login", data={"csrf_token": csrf_from(tc.get("/login").data), "token": TOKEN, "next": "/"})
    for path in pages:
        assert 'id="no-token-warning"' not in tc.get(path).get_data(as_text=True)
        assert 'id="no-token-warning"' not in client.get(path).get_data(as_text=True)  # loopback: this machine only


def test_made_up_methods_are_405_before_auth_and_do_not_grow_metrics(token_app):
    """300 requests with 100 KB method names used to add 33 MB and make /metrics 40 MB, without a token."""
    client = token_app.test_client()
    auth = {"Authorization": f"Bearer {TOKEN}"}
    before = len(client.get("/metrics", headers=auth).data)
    for i in range(50):
        r = client.open("/api/results", method="X" * 20_000 + str(i))
        assert r.status_code == 405 and r.is_json
        assert "GET" in r.headers["Allow"]
    text = client.get("/metrics", headers=auth).get_data(as_text=True)
    assert "XXXX" not in text and len(text) < before + 2000
    assert 'method="other",status="405"} 50' in text


def test_metrics_labels_stay_bounded_over_many_distinct_requests(make_app):
    app = make_app()
    client = app.test_client()
    for i in range(200):
        client.get(f"/no-such-page-{i}-{'y' * 500}")
        client.get(f"/results/{i:032x}")
    text = client.get("/metrics").get_data(as_text=True)
    assert len(text) < 10_000 and "yyyy" not in text
