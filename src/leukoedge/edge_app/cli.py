"""``leukoedge serve``: run the microscope app with waitress.

Flask, waitress and the runtime are imported inside the handler, so building
``leukoedge --help`` stays instant and works without the ``edge`` extra.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from .admission import DEFAULT_BUDGET_BYTES

DEFAULT_DATA_DIR = Path.home() / "leukoedge-data"
TOKEN_ENV = "LEUKOEDGE_TOKEN"


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "serve",
        help="run the microscope web app (live preview, capture, upload, history, JSON API)",
        description="Serve the web app for one bundle with waitress. Binds 127.0.0.1 unless --host is given; "
        "any other address needs --token (or the LEUKOEDGE_TOKEN environment variable) or --insecure-no-token. "
        "Research use only; not a diagnosis.",
    )
    p.add_argument("--bundle", required=True, type=Path, help="model bundle (directory, .tar or .zip)")
    p.add_argument("--camera", default="auto",
                   help="auto (picamera2, then opencv, else upload mode), none, picamera2, opencv[:DEVICE], "
                   "replay:DIR (default: auto)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8080, help="TCP port (default: 8080)")
    p.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR,
                   help=f"results database and images (default: {DEFAULT_DATA_DIR})")
    auth = p.add_mutually_exclusive_group()
    auth.add_argument("--token", help=f"access token required on every request (default: ${TOKEN_ENV} if set); "
                      "prefer the environment variable, which other users cannot see in ps")
    auth.add_argument("--insecure-no-token", action="store_true",
                      help="allow a non-loopback --host without a token (trusted networks only; logged loudly)")
    p.add_argument("--force-invalid-bundle", action="store_true",
                   help="serve a bundle whose parity gate failed (debugging only)")
    p.add_argument("--max-upload-mb", type=float, default=32.0, help="largest upload in MB (default: 32)")
    p.add_argument("--allowed-host", action="append", default=[], metavar="NAME",
                   help="a DNS name browsers use to reach this station, besides its IP addresses and its own "
                        "host name (repeatable; any other Host header is refused, which defeats DNS rebinding)")
    p.add_argument("--decode-memory-mb", type=float, default=DEFAULT_BUDGET_BYTES / 2**20,
                   help=f"memory shared by concurrent image decodes; larger uploads wait their turn "
                        f"(default: {DEFAULT_BUDGET_BYTES // 2**20})")
    p.add_argument("--threads", type=int, default=8, help="server worker threads (default: 8)")
    p.add_argument("--edgetpu", choices=("auto", "on", "off"), default="auto",
                   help="use a Coral Edge TPU: auto (if present), on (required), off (default: auto)")
    p.add_argument("--num-threads", type=int, default=None, help="interpreter CPU threads (default: runtime's)")
    p.set_defaults(func=run)


def config_from_args(args: argparse.Namespace):
    from .config import AppConfig

    token = args.token if args.token is not None else (os.environ.get(TOKEN_ENV) or None)
    return AppConfig(
        bundle=args.bundle,
        data_dir=args.data_dir,
        camera=args.camera,
        host=args.host,
        port=args.port,
        token=token,
        insecure_no_token=args.insecure_no_token,
        force_invalid_bundle=args.force_invalid_bundle,
        max_upload_bytes=int(args.max_upload_mb * 1024 * 1024),
        threads=args.threads,
        max_streams=max(1, min(4, args.threads - 2)),
        num_threads=args.num_threads,
        edgetpu=args.edgetpu,
        allowed_hosts=tuple(args.allowed_host),
        decode_memory_bytes=int(args.decode_memory_mb * 1024 * 1024),
    )


def run(args: argparse.Namespace) -> int:
    from .camera import parse_camera_spec
    from .server import serve

    config = config_from_args(args)
    parse_camera_spec(config.camera)  # reject a typo before loading the model
    return serve(config)
