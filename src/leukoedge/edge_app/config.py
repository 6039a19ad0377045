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
from .admission import DEFAULT_BUDGET_BYTES

LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1", "[::1]"})
#: Shortest token accepted: a guessable token is no protection on a lab network.
MIN_TOKEN_LENGTH = 16
_TOKEN_CHARS = re.compile(r"^[A-Za-z0-9._~+/=-]+$")
#: Largest TEXT field of a form (csrf token, login token, next page). Werkzeug 3.1's multipart
#: decoder also checks its own look-ahead buffer against this limit while it streams FILE parts
#: (in 64 KiB reads), so it must stay well above that buffer: at 64 KiB, every upload over
#: ~130 KB was refused with 413 (issue 13). File sizes are limited by ``max_upload_bytes``.
MAX_FORM_FIELD_BYTES = 512 * 1024
#: Host names always accepted besides loopback names and IP literals (mDNS name added at run time).
_HOST_NAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9-]{0,62})(\.[A-Za-z0-9]([A-Za-z0-9-]{0,62}))*\.?$")


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True


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
        allowed_hosts: extra names a browser may use in the ``Host`` header when the
            app listens beyond loopback (``--allowed-host``; this machine's own names and
            IP addresses are always accepted). Defeats DNS rebinding in every mode.
        decode_memory_bytes: memory budget shared by concurrent image decodes
            (``--decode-memory-mb``; see :mod:`leukoedge.edge_app.admission`).
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
    allowed_hosts: tuple[str, ...] = ()
    decode_memory_bytes: int = DEFAULT_BUDGET_BYTES

    def __post_init__(self) -> None:
        object.__setattr__(self, "bundle", Path(self.bundle))
        object.__setattr__(self, "data_dir", Path(self.data_dir))
        hosts = tuple(str(h).strip().lower().rstrip(".") for h in self.allowed_hosts)
        for name in hosts:
            if not _HOST_NAME.match(name) and not _is_ip(name):
                raise UsageError(f"--allowed-host {name[:80]!r} is not a host name or IP address")
        object.__setattr__(self, "allowed_hosts", hosts)
        if self.decode_memory_bytes < 16 * 1024 * 1024:
            raise UsageError(f"the decode memory budget ({self.decode_memory_bytes / 2**20:.0f} MB) is too small; "
                             "give at least 16 MB")
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

    def host_allowed(self, hostname: str, machine_names: frozenset[str] = frozenset()) -> bool:
        """May a request carry ``Host: hostname``? (the DNS-rebinding defence, in every mode)

        Loopback-only: loopback names only. Listening on the network: also any IP
        literal (a rebinding attack needs a DNS name), this machine's own names
        (``machine_names``: hostname, ``hostname.local``, FQDN), the ``--host``
        value and ``--allowed-host`` names. A page on another site never gets an
        answer by pointing its own name at this station.
        """
        name = hostname.strip().lower().rstrip(".")
        if not name:
            return False
        if is_loopback(name):
            return True
        if self.loopback_only:
            return False
        return (_is_ip(name) or name in machine_names or name == self.host.lower()
                or name in self.allowed_hosts)
