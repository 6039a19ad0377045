"""``leukoedge bench latency|app``: measure this machine, print or save the report.

Handlers import the runtime only when they run, so ``leukoedge --help`` stays
instant. Output: Markdown on stdout by default, ``--json`` for the JSON report;
``--out FILE`` also writes the report atomically (``.json`` -> JSON, else
Markdown; the ``benchmarks/`` scripts write both).
"""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from ..errors import UsageError


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "bench", help="measure latency of bundles or of the running app",
        description="Benchmarks on this machine (no TensorFlow needed). Research use only.")
    sub = parser.add_subparsers(dest="bench_command", metavar="BENCH")
    sub.required = True

    lat = sub.add_parser("latency", help="per-image latency of one or more bundles (interleaved)")
    lat.add_argument("bundles", nargs="+", metavar="BUNDLE", help="bundle folders or archives; ratios are to the first")
    lat.add_argument("--runs", type=int, default=50, help="measured runs per bundle and thread count (default 50)")
    lat.add_argument("--warmup", type=int, default=5, help="unmeasured runs first (default 5)")
    lat.add_argument("--threads", default="1", help="interpreter thread counts, e.g. 1,2,4 (default 1)")
    lat.add_argument("--images", metavar="DIR", help="images to classify (default: synthetic smears or seeded noise)")
    lat.add_argument("--edgetpu", choices=("auto", "off", "on"), default="auto",
                     help="use a Coral Edge TPU when the bundle has a compiled model (default auto)")
    lat.add_argument("--no-heatmap", action="store_true", help="skip the class activation map (the app draws it)")
    lat.add_argument("--allow-invalid", action="store_true",
                     help="also measure bundles whose parity gate failed (marked in the report)")
    _output_args(lat)
    lat.set_defaults(func=_latency)

    app = sub.add_parser("app", help="HTTP latency/throughput of the running app (loopback only)")
    app.add_argument("url", help="the app's URL on this machine, e.g. http://127.0.0.1:8000")
    app.add_argument("--clients", default="1,4", help="concurrent client counts (default 1,4)")
    app.add_argument("--requests", type=int, default=40, help="measured requests per client count (default 40)")
    app.add_argument("--warmup", type=int, default=2, help="unmeasured requests per client count (default 2)")
    app.add_argument("--image", metavar="FILE", help="image to upload (default: a synthetic or seeded noise JPEG)")
    app.add_argument("--token", help="access token when the app listens with one")
    app.add_argument("--time-limit", type=float, default=300.0, help="stop after this many seconds (default 300)")
    app.add_argument("--timeout", type=float, default=30.0, help="per-request timeout in seconds (default 30)")
    _output_args(app)
    app.set_defaults(func=_app)


def _output_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the JSON report instead of Markdown")
    parser.add_argument("--out", metavar="FILE", help="also write the report (.json -> JSON, otherwise Markdown)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def _command_line(args: argparse.Namespace) -> str:
    """The equivalent ``leukoedge bench ...`` command, rebuilt from the parsed options
    (so the report names what was measured however the handler was invoked)."""
    if args.bench_command == "latency":
        parts = ["latency", *args.bundles, "--runs", str(args.runs), "--warmup", str(args.warmup),
                 "--threads", args.threads, "--edgetpu", args.edgetpu]
        parts += ["--images", args.images] if args.images else []
        parts += ["--no-heatmap"] if args.no_heatmap else []
        parts += ["--allow-invalid"] if args.allow_invalid else []
    else:
        parts = ["app", args.url, "--clients", args.clients, "--requests", str(args.requests),
                 "--warmup", str(args.warmup)]
        parts += ["--image", args.image] if args.image else []
        parts += ["--token", "***"] if args.token else []
    return "leukoedge bench " + " ".join(shlex.quote(str(p)) for p in parts)


def _emit(report: dict, args: argparse.Namespace, markdown) -> None:
    from ..files import atomic_write_text
    from .report import to_json

    command = _command_line(args)
    text_json = to_json({"command": command, **report})
    text_md = markdown(report, command)
    if args.out:
        out = Path(args.out)
        atomic_write_text(out, text_json if out.suffix.lower() == ".json" else text_md)
    sys.stdout.write(text_json if args.json else text_md)


def _latency(args: argparse.Namespace) -> int:
    from .images import bench_images
    from .latency import LatencyConfig, parse_int_list, run_latency
    from .report import latency_markdown

    config = LatencyConfig(runs=args.runs, warmup=args.warmup, threads=parse_int_list(args.threads, "--threads"),
                           edgetpu=args.edgetpu, allow_invalid=args.allow_invalid,
                           heatmap=not args.no_heatmap, progress=not args.quiet)
    images = bench_images(args.images)
    report = run_latency(args.bundles, config, images)
    _emit(report, args, latency_markdown)
    return 0


def _app(args: argparse.Namespace) -> int:
    from .app import AppBenchConfig, run_app_bench
    from .images import bench_images
    from .latency import parse_int_list
    from .report import app_markdown

    config = AppBenchConfig(url=args.url, clients=parse_int_list(args.clients, "--clients"),
                            requests=args.requests, warmup=args.warmup, timeout_s=args.timeout,
                            time_limit_s=args.time_limit, token=args.token, progress=not args.quiet)
    if args.image:
        path = Path(args.image)
        if not path.is_file():
            raise UsageError(f"--image {path}: no such file")
        image, description = path.read_bytes(), str(path)
    else:
        generated = bench_images(None, n=1)
        image, description = generated.images[0], generated.description
    report = run_app_bench(config, image, description)
    _emit(report, args, app_markdown)
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m leukoedge.bench latency|app ...``: the bench command alone.

    For minimal installs (e.g. a second venv with only tflite-runtime, used by
    ``benchmarks/runtimes.py``) where the other subcommands' dependencies are
    absent. Errors become messages here exactly as in ``leukoedge.cli.main``.
    """
    from .. import RESEARCH_NOTICE
    from ..errors import LeukoEdgeError

    parser = argparse.ArgumentParser(prog="python -m leukoedge.bench", description=RESEARCH_NOTICE)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    register(subparsers)
    args = parser.parse_args(["bench", *(sys.argv[1:] if argv is None else argv)])
    try:
        return int(args.func(args) or 0)
    except LeukoEdgeError as err:
        print(f"error: {err.user_message()}", file=sys.stderr)
        return err.exit_code
