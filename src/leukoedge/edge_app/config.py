"""The app's configuration: one frozen dataclass built once from the CLI.

Bad combinations raise :class:`~leukoedge.errors.UsageError` here, before any
socket is opened; nothing is silently rewritten. The one rule that matters
most: the app binds the loopback interface unless told otherwise, and any other
address needs an access token or an explicit, loudly logged opt-out.
"""
from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import UsageError

LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1", "[::1]"})
#: Shortest token accepted: a guessable token is no protection on a lab network.
MIN_TOKEN_LENGTH = 16
_TOKEN_CHARS = re.compile(r"^[A-Za-z0-9._~+/=-]+$")


def is_loopback(host: str) -> bool:
    """True for names/addresses that only this machine can reach."""
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class AppConfig:
    """Everything ``leukoedge serve`` needs, validated once.

    Attributes:
        bundle: path to the model bundle (directory, .tar or .zip).
        data_dir: where results live (``results.sqlite3`` + ``images/``).
        camera: camera spec: ``auto``, ``none``, ``picamera2``, ``opencv[:INDEX]``
            or ``replay:DIR``.
        host: interface to bind; loopback by default.
        port: TCP port.
        token: access token required on every request (header
            ``Authorization: Bearer T``, or a session cookie after logging in).
        insecure_no_token: explicit opt-out of the token on a non-loopback host.
        force_invalid_bundle: load a bundle whose parity gate failed (testing only).
        max_upload_bytes: largest request body (413 above it).
        max_files_per_upload: most images in one form upload.
        threads: WSGI worker threads (MJPEG viewers each hold one).
        max_streams: most simultaneous MJPEG viewers (503 above it).
        preview_fps: MJPEG frame rate.
        num_threads: interpreter threads (None: the runtime's default).
        edgetpu: ``auto``, ``on`` or ``off`` (passed to the runtime).
        secret_key: session-signing key; None: generated once and kept in data_dir.
    """

    bundle: Path
    data_dir: Path
    camera: str = "auto"
    host: str = "127.0.0.1"
    port: int = 8080
    token: str | None = None
    insecure_no_token: bool = False
    force_invalid_bundle: bool = False
    max_upload_bytes: int = 32 * 1024 * 1024
    max_files_per_upload: int = 16
    threads: int = 8
    max_streams: int = 4
    preview_fps: float = 8.0
    num_threads: int | None = None
    edgetpu: str = "auto"
    secret_key: bytes | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "bundle", Path(self.bundle))
        object.__setattr__(self, "data_dir", Path(self.data_dir))
        if not (0 < self.port < 65536):
            raise UsageError(f"port {self.port} is outside 1..65535")
        if self.token is not None:
            if len(self.token) < MIN_TOKEN_LENGTH or not _TOKEN_CHARS.match(self.token):
                raise UsageError(
                    f"the access token must be at least {MIN_TOKEN_LENGTH} characters of "
                    "letters, digits and ._~+/=-",
                    hint="generate one with: python3 -c 'import secrets; print(secrets.token_urlsafe(24))'",
                )
            if self.insecure_no_token:
                raise UsageError("--token and --insecure-no-token contradict each other; pick one")
        if not is_loopback(self.host) and self.token is None and not self.insecure_no_token:
            raise UsageError(
                f"listening on {self.host} exposes the app to the network; an access token is required",
                hint="pass --token T (clients send 'Authorization: Bearer T' or log in once), "
                "or --insecure-no-token if the network is trusted",
            )
        if self.max_upload_bytes < 1024:
            raise UsageError(f"max upload size {self.max_upload_bytes} bytes is too small to hold an image")
        if self.max_files_per_upload < 1:
            raise UsageError("max files per upload must be at least 1")
        if self.threads < 2:
            raise UsageError("the server needs at least 2 threads (one may be held by the live preview)")
        if not (1 <= self.max_streams < self.threads):
            raise UsageError(
                f"max_streams ({self.max_streams}) must be between 1 and threads-1 ({self.threads - 1}) "
                "so live previews never starve classification requests"
            )
        if not (0.5 <= self.preview_fps <= 30):
            raise UsageError(f"preview fps {self.preview_fps} is outside 0.5..30")
        if self.edgetpu not in ("auto", "on", "off"):
            raise UsageError(f"edgetpu must be auto, on or off, not {self.edgetpu!r}")

    @property
    def requires_token(self) -> bool:
        return self.token is not None

    @property
    def loopback_only(self) -> bool:
        return is_loopback(self.host)
