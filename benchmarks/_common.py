"""Shared plumbing for the benchmark scripts (not a public module).

Every script writes ``benchmarks/results/<name>.md`` and ``<name>.json``, both
carrying the machine they were measured on, and never hand-typed numbers. The
scripts run unchanged on the workstation and on a Raspberry Pi: anything that
needs TensorFlow (converting run directories into bundles) is optional and
only done when asked for.
"""
from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results"

# Make ``import leukoedge`` work from a plain checkout too (src layout).
if str(REPO / "src") not in sys.path:
    sys.path.insert(0, str(REPO / "src"))

from leukoedge.bench.machine import machine_info  # noqa: E402
from leukoedge.bench.report import header, to_json, write_atomic  # noqa: E402
from leukoedge.errors import LeukoEdgeError  # noqa: E402


def command_line() -> str:
    return "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0], REPO), *sys.argv[1:]])


def write_results(name: str, data: dict, markdown_body: str, title: str, out_dir: Path = RESULTS) -> tuple[Path, Path]:
    """Write ``<name>.json`` (with machine + command) and ``<name>.md`` atomically."""
    data = {"name": name, "command": command_line(), "machine": data.get("machine") or machine_info(), **data}
    md = header(title, data["machine"], data["command"]) + "\n" + markdown_body.rstrip() + "\n"
    json_path = write_atomic(out_dir / f"{name}.json", to_json(data))
    md_path = write_atomic(out_dir / f"{name}.md", md)
    print(f"wrote {md_path} and {json_path}", file=sys.stderr)
    return md_path, json_path


#: Runs ONE leukoedge subcommand (its module's ``register`` + handler) with the
#: CLI's error handling, so a script works even where another subcommand's
#: dependencies are missing (e.g. ``serve`` on a device without TensorFlow).
_ONE_COMMAND = """
import argparse, importlib, sys
from leukoedge.errors import LeukoEdgeError
module = importlib.import_module(sys.argv[1])
parser = argparse.ArgumentParser(prog="leukoedge")
module.register(parser.add_subparsers(dest="command", required=True))
args = parser.parse_args(sys.argv[2:])
try:
    sys.exit(int(args.func(args) or 0))
except LeukoEdgeError as err:
    print(f"error: {err.user_message()}", file=sys.stderr)
    sys.exit(err.exit_code)
"""
_MODULES = {"convert": "leukoedge.convert.cli", "serve": "leukoedge.edge_app.cli", "bench": "leukoedge.bench.cli"}


def leukoedge_cmd(subcommand: str, python: str | None = None) -> list[str]:
    """argv prefix for ``leukoedge SUBCOMMAND`` run by this (or the given) Python."""
    return [python or sys.executable, "-c", _ONE_COMMAND, _MODULES[subcommand], subcommand]


def show(cmd: list) -> None:
    """Echo a command to stderr, ``leukoedge SUBCOMMAND ...`` for :func:`leukoedge_cmd` ones."""
    shown = ["leukoedge", *cmd[4:]] if len(cmd) > 3 and cmd[1] == "-c" and cmd[2] == _ONE_COMMAND else cmd
    print("+ " + " ".join(shlex.quote(str(c)) for c in shown), file=sys.stderr, flush=True)


def run(cmd: list[str], check: bool = True, **kw) -> subprocess.CompletedProcess:
    show(cmd)
    proc = subprocess.run([str(c) for c in cmd], **kw)
    if check and proc.returncode != 0:
        raise SystemExit(f"command failed with exit code {proc.returncode}: {cmd[0]} ...")
    return proc


def find_bundles(folder: Path) -> list[Path]:
    """Bundle directories (holding bundle.json) and .tar/.zip archives under ``folder``, sorted."""
    if not folder.is_dir():
        raise SystemExit(f"{folder}: not a folder of bundles")
    found = {p.parent for p in folder.rglob("bundle.json")}
    found |= {p for p in folder.rglob("*") if p.suffix in (".tar", ".zip") and p.is_file()}
    return sorted(found)


def read_bundle_meta(path: Path) -> dict:
    """bundle.json plus parity.json / model_card.json of a bundle directory ({} when absent)."""
    out: dict = {}
    for key, name in (("meta", "bundle.json"), ("parity", "parity.json"), ("card", "model_card.json")):
        f = path / name
        try:
            out[key] = json.loads(f.read_text()) if f.is_file() else {}
        except (OSError, ValueError):
            out[key] = {}
    return out


def quantization_of(meta: dict) -> str:
    """The bundle's quantisation mode as recorded by convert (``int8``, ``float16``, ...)."""
    value = meta.get("quantize")
    if isinstance(value, str):
        return value
    dtype = (meta.get("input") or {}).get("dtype")
    return {"int8": "int8", "uint8": "uint8"}.get(dtype, "float")


def main_guard(fn) -> None:
    """Run ``fn()`` and turn leukoedge errors into a message and exit code."""
    try:
        sys.exit(fn() or 0)
    except LeukoEdgeError as err:
        print(f"error: {err.user_message()}", file=sys.stderr)
        sys.exit(err.exit_code)
