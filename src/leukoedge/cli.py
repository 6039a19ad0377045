"""The one command: ``leukoedge data|train|eval|convert|predict|serve|bench|demo``.

Each subcommand lives in its own module with a ``register(subparsers)``
function; the module imports heavy dependencies (TensorFlow, Flask) only inside
its handler, so ``leukoedge --help`` is instant and the device install, which
has no TensorFlow, can still run ``serve`` and ``bench``.

This ``main()`` is one of the two places (with the app's error handler) where
typed :class:`~leukoedge.errors.LeukoEdgeError` exceptions become user
messages and exit codes.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import Sequence

from . import RESEARCH_NOTICE, __version__
from .errors import LeukoEdgeError
from .quiet import filter_native_stderr, quiet_environment

#: (subcommand, module providing ``register``), in the order shown by --help.
COMMAND_MODULES = (
    ("data", "leukoedge.data.cli"),
    ("train", "leukoedge.train.cli"),
    ("eval", "leukoedge.train.eval_cli"),
    ("convert", "leukoedge.convert.cli"),
    ("predict", "leukoedge.predict"),
    ("serve", "leukoedge.edge_app.cli"),
    ("bench", "leukoedge.bench.cli"),
    ("demo", "leukoedge.demo"),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="leukoedge",
        description="Leukemia cell classification from training to a Raspberry Pi. " + RESEARCH_NOTICE,
    )
    parser.add_argument("--version", action="version", version=f"leukoedge {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for _name, module_name in COMMAND_MODULES:
        module = importlib.import_module(module_name)
        module.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-v", "--verbose") for a in argv):
        return _main(argv)  # everything, native start-up lines included
    # Before any subcommand imports TensorFlow: keep native start-up chatter off the user's screen.
    quiet_environment()
    with filter_native_stderr():
        return _main(argv)


def _main(argv: list[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args) or 0)
    except LeukoEdgeError as err:
        print(f"error: {err.user_message()}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
