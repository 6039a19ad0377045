#!/usr/bin/env python3
"""The app under load: ``leukoedge serve`` on loopback, 1 and 4 concurrent clients.

    python benchmarks/app_load.py --bundle BUNDLE        # a real bundle
    python benchmarks/app_load.py                        # a tiny bundle made on the fly (needs TF)

Starts ``leukoedge serve --bundle B --host 127.0.0.1 --port P --camera none
--data-dir TMP`` as a child process on a free loopback port with a throw-away
data folder (every classified upload is stored by the app, so the benchmark
must not fill the lab's history), waits for ``/api/health``, runs
``bench app`` with 1 and 4 clients, and stops the server it started.

Writes ``benchmarks/results/app_load.{md,json}``.
"""
from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from _common import REPO, RESULTS, leukoedge_cmd, main_guard, show, write_results
from leukoedge.bench.app import AppBenchConfig, run_app_bench
from leukoedge.bench.images import bench_images
from leukoedge.bench.latency import parse_int_list
from leukoedge.bench.report import app_body

STARTUP_TIMEOUT_S = 90


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_bundle(work: Path) -> Path:
    """The test suite's tiny bundle (real TF conversion of a tiny model)."""
    sys.path.insert(0, str(REPO / "tests"))
    from bundle_factory import make_tiny_bundle  # noqa: E402 - the tests' factory, needs TensorFlow

    return make_tiny_bundle(work)


def wait_healthy(base: str, proc: subprocess.Popen, log_path: Path) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-15:])
            raise SystemExit(f"leukoedge serve exited with code {proc.returncode} before it was ready:\n{tail}")
        try:
            with urllib.request.urlopen(base + "/api/health", timeout=2) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.3)
    raise SystemExit(f"leukoedge serve was not healthy after {STARTUP_TIMEOUT_S} s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, help="bundle to serve (default: a tiny bundle, needs TensorFlow)")
    parser.add_argument("--clients", default="1,4")
    parser.add_argument("--requests", type=int, default=60, help="measured requests per client count")
    parser.add_argument("--image", type=Path, help="image to upload (default: synthetic smear / seeded noise)")
    parser.add_argument("--time-limit", type=float, default=300.0)
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="leukoedge-app-load-") as tmp:
        work = Path(tmp)
        bundle = args.bundle or tiny_bundle(work / "bundle")
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        cmd = [*leukoedge_cmd("serve"), "--bundle", str(bundle), "--host", "127.0.0.1", "--port", str(port),
               "--camera", "none", "--data-dir", str(work / "data")]
        show(cmd)
        # A token from the user's environment would lock our own loopback server.
        env = {k: v for k, v in os.environ.items() if k != "LEUKOEDGE_TOKEN"}
        log_path = work / "server.log"
        with open(log_path, "w") as log:  # a file, not a pipe: a full pipe would stall the server
            server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            wait_healthy(base, server, log_path)
            if args.image:
                image, description = args.image.read_bytes(), str(args.image)
            else:
                generated = bench_images(None, n=1)
                image, description = generated.images[0], generated.description
            config = AppBenchConfig(url=base, clients=parse_int_list(args.clients, "--clients"),
                                    requests=args.requests, time_limit_s=args.time_limit)
            report = run_app_bench(config, image, description)
        finally:
            server.terminate()
            try:
                server.wait(timeout=15)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
        report["bundle"] = str(args.bundle) if args.bundle else "tiny test bundle (tests/bundle_factory.py)"
        report["server"] = "leukoedge serve --camera none --host 127.0.0.1 (free port, throw-away data folder)"
    body = (f"Bundle: {report['bundle']}. Server: `leukoedge serve` (production WSGI server) started by this "
            f"script on a free loopback port with a throw-away data folder.\n\n")
    write_results("app_load", report, body + app_body(report), "App under load", args.out_dir)
    return 0


if __name__ == "__main__":
    main_guard(main)
