"""Serving the app with waitress (a production WSGI server, never Flask's dev server).

:func:`serve` is what ``leukoedge serve`` runs: build the app once, bind,
log where it listens (and loudly when it is exposed without a token), serve
until SIGTERM/SIGINT, then release the camera and database.
:class:`BackgroundServer` runs the same server in a thread on a free port,
for the browser tests and the demo.
"""
from __future__ import annotations

import logging
import signal
import threading

from flask import Flask
from waitress.server import create_server

from .config import AppConfig

log = logging.getLogger(__name__)
#: Request bodies are capped by waitress too, before Flask sees them (headroom for multipart framing).
_BODY_SLACK = 64 * 1024


class _Shutdown(BaseException):
    """Raised from the SIGTERM handler to leave waitress's loop cleanly."""


def make_server(app: Flask, config: AppConfig, *, port: int | None = None):
    return create_server(
        app,
        host=config.host,
        port=config.port if port is None else port,
        threads=config.threads,
        max_request_body_size=config.max_upload_bytes + _BODY_SLACK,
        clear_untrusted_proxy_headers=True,
        channel_timeout=60,
        ident="leukoedge",
        expose_tracebacks=False,
    )


def warn_about_exposure(config: AppConfig) -> None:
    if config.loopback_only:
        return
    if config.insecure_no_token:
        banner = "!" * 72
        log.warning("%s", banner)
        log.warning("INSECURE: listening on %s:%d WITHOUT an access token (--insecure-no-token).",
                    config.host, config.port)
        log.warning("Anyone who can reach this address can classify, read and delete results.")
        log.warning("%s", banner)
    else:
        log.info("listening on %s:%d; every request needs the access token", config.host, config.port)


def serve(config: AppConfig) -> int:
    """Run until SIGTERM or Ctrl-C; returns 0 on a clean shutdown."""
    from .app import create_app
    from .memory import configure_allocator

    configure_allocator()  # before the first large decode: image buffers go back to the OS when freed
    app = create_app(config)
    state = app.extensions["leukoedge"]
    server = make_server(app, config)
    warn_about_exposure(config)
    info = state.service.model_info
    log.info("model %s %s on %s (%s); camera: %s%s", info["model"], info["version"], info["runtime"],
             info["delegate"], state.camera_status.backend,
             f" (upload mode: {state.camera_status.reason})" if not state.camera_status.available else "")
    log.info("open http://%s:%s/", "[::1]" if config.host == "::1" else config.host, server.effective_port)

    def _stop(signum, frame):
        raise _Shutdown()

    previous = signal.signal(signal.SIGTERM, _stop)
    try:
        server.run()
    except (_Shutdown, KeyboardInterrupt):
        log.info("shutting down")
    finally:
        signal.signal(signal.SIGTERM, previous)
        state.close()
        server.close()
    return 0


class BackgroundServer:
    """The real waitress server in a daemon thread on 127.0.0.1 and a free port."""

    def __init__(self, app: Flask, config: AppConfig) -> None:
        self.app = app
        self.server = make_server(app, config, port=0)
        self.port = int(self.server.effective_port)
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._run, name="waitress", daemon=True)

    def _run(self) -> None:
        try:
            self.server.run()
        except OSError:  # the socket map is torn down under the loop by stop()
            pass

    def __enter__(self) -> "BackgroundServer":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        """End live streams first (they hold worker threads), then the server."""
        state = self.app.extensions["leukoedge"]
        if state.broadcaster is not None:
            state.broadcaster.close()
        self.server.task_dispatcher.shutdown(cancel_pending=True, timeout=5)
        while self.server._map:
            for channel in list(self.server._map.values()):
                if channel is self.server:
                    channel.close()  # the listening socket has no close handler of its own
                else:
                    channel.handle_close()
        self._thread.join(timeout=5)
