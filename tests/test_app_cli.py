"""``leukoedge serve``: argument checks, and the real command serving until SIGTERM."""
from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from leukoedge import cli
from leukoedge.edge_app.cli import config_from_args

pytest_plugins = ["app_fixtures"]  # shared fixtures, registered once per session


REPO = Path(__file__).resolve().parents[1]
#: The real ``cli.main`` with only this subcommand registered, so these tests do not
#: depend on the other subcommands' modules.
ONLY_SERVE = (("serve", "leukoedge.edge_app.cli"),)
MAIN_ONLY_SERVE = (
    "import sys; from leukoedge import cli; "
    f"cli.COMMAND_MODULES = {ONLY_SERVE!r}; sys.exit(cli.main(sys.argv[1:]))"
)


@pytest.fixture(autouse=True)
def _only_serve(monkeypatch):
    monkeypatch.setattr(cli, "COMMAND_MODULES", ONLY_SERVE)


def _args(*extra: str):
    return cli.build_parser().parse_args(["serve", "--bundle", "b", *extra])


def test_defaults_bind_loopback_with_auto_camera(monkeypatch):
    monkeypatch.delenv("LEUKOEDGE_TOKEN", raising=False)
    config = config_from_args(_args())
    assert (config.host, config.port, config.camera, config.token) == ("127.0.0.1", 8080, "auto", None)


def test_token_from_environment(monkeypatch):
    monkeypatch.setenv("LEUKOEDGE_TOKEN", "x" * 20)
    assert config_from_args(_args("--host", "0.0.0.0")).token == "x" * 20


def test_upload_memory_and_host_flags_reach_the_config(monkeypatch):
    monkeypatch.delenv("LEUKOEDGE_TOKEN", raising=False)
    config = config_from_args(_args("--max-upload-mb", "3", "--decode-memory-mb", "64", "--host", "0.0.0.0",
                                    "--token", "t" * 20, "--allowed-host", "Scope-3.lab.example.",
                                    "--allowed-host", "10.0.0.7"))
    assert config.max_upload_bytes == 3 * 1024 * 1024 and config.decode_memory_bytes == 64 * 1024 * 1024
    assert config.allowed_hosts == ("scope-3.lab.example", "10.0.0.7")


@pytest.mark.parametrize("extra, message", [
    (["--host", "0.0.0.0"], "access token is required"),
    (["--host", "0.0.0.0", "--insecure-no-token", "--allowed-host", "a b"], "not a host name"),
    (["--decode-memory-mb", "4"], "too small"),
    (["--camera", "webcam"], "unknown camera"),
    (["--port", "0"], "outside 1..65535"),
])
def test_bad_combinations_exit_2_before_loading_anything(extra, message, capsys, monkeypatch):
    monkeypatch.delenv("LEUKOEDGE_TOKEN", raising=False)
    assert cli.main(["serve", "--bundle", "/nonexistent", *extra]) == 2
    assert message in capsys.readouterr().err


def test_token_and_insecure_flag_are_mutually_exclusive(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["serve", "--bundle", "b", "--token", "x" * 20, "--insecure-no-token"])
    assert info.value.code == 2


def test_missing_bundle_is_a_clear_error(tmp_path, capsys):
    code = cli.main(["serve", "--bundle", str(tmp_path / "nope"), "--camera", "none",
                     "--data-dir", str(tmp_path / "d")])
    err = capsys.readouterr().err
    assert code != 0 and err.startswith("error: ") and "Traceback" not in err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get_json(url: str):
    with urllib.request.urlopen(url, timeout=10) as resp:
        return json.load(resp)


def test_serve_runs_waitress_until_sigterm(tmp_path, tiny_bundle, replay_dir):
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-c", MAIN_ONLY_SERVE, "serve", "--bundle", str(tiny_bundle), "--camera",
         f"replay:{replay_dir}", "--port", str(port), "--data-dir", str(tmp_path / "data"), "--threads", "4"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        health = None
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                health = _get_json(f"{base}/api/health")
                break
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.3)
        assert health is not None, proc.stdout.read() if proc.poll() is not None else "server did not start"
        assert health["camera"]["backend"] == "replay" and health["model"]["runtime"]
        req = urllib.request.Request(f"{base}/api/capture", data=b"", method="POST")
        with urllib.request.urlopen(req, timeout=30) as resp:
            assert resp.status == 201 and json.load(resp)["source"] == "camera"
        with urllib.request.urlopen(f"{base}/", timeout=10) as resp:
            assert resp.headers["Server"] == "leukoedge"  # waitress, not the Flask dev server
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    assert f"open http://127.0.0.1:{port}/" in out and "shutting down" in out


def test_deploy_files_are_sound():
    """The installer parses, and the unit runs ``leukoedge serve`` unprivileged with restarts."""
    deploy = REPO / "deploy"
    subprocess.run(["bash", "-n", str(deploy / "setup-pi.sh")], check=True)
    unit = (deploy / "leukoedge.service").read_text()
    assert "User=leukoedge" in unit and "User=root" not in unit
    assert "Restart=on-failure" in unit and "leukoedge serve" in unit
    script = (deploy / "setup-pi.sh").read_text()
    for needle in ("python3-picamera2", "--system-site-packages", "[edge]", "libedgetpu1-std"):
        assert needle in script


def test_invalid_bundle_is_refused_unless_forced(tmp_path, tiny_bundle):
    import dataclasses
    import shutil

    from leukoedge.bundle import write_manifest
    from leukoedge.edge_app import AppConfig, create_app
    from leukoedge.errors import BundleError

    bad = tmp_path / "bad-bundle"
    shutil.copytree(tiny_bundle, bad)
    meta = json.loads((bad / "bundle.json").read_text())
    meta.update(valid=False, invalid_reason="parity gate failed (test)")
    (bad / "bundle.json").write_text(json.dumps(meta))
    write_manifest(bad)
    config = AppConfig(bundle=bad, data_dir=tmp_path / "data", camera="none")
    with pytest.raises(BundleError, match="marked invalid"):
        create_app(config)
    app = create_app(dataclasses.replace(config, force_invalid_bundle=True))
    try:
        client = app.test_client()
        assert client.get("/api/health").json["model"]["valid"] is False
        assert "failed its validation" in client.get("/").get_data(as_text=True)
    finally:
        app.extensions["leukoedge"].close()
