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
from pathlib import Path
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
    for name, module_name in COMMAND_MODULES:
        module = importlib.import_module(module_name)
        actions = module.register(subparsers)
        if name == "data":
            _register_data_reviewed(actions)
    return parser


def _register_data_reviewed(actions) -> None:
    """``leukoedge data reviewed DATA_DIR --out DIR_OR_ZIP``: a device's reviewed captures as a dataset.

    It lives here, not in ``leukoedge.data.cli``: it reads the device's result
    store (``edge_app.storage``), and the data layer may never import the layers
    above it (data -> train -> convert -> runtime -> edge_app). Neither Flask nor
    TensorFlow is needed: the handler imports only the store and the exporter.
    """
    p = actions.add_parser("reviewed", help="export a device's reviewed captures as a class-folder dataset",
                           description="Write the original image of every reviewed result of a device's data "
                                       "folder (copied off the device, or the device's own) into one folder per "
                                       "reviewer label, with reviewed.json (capture time, sample, model and "
                                       "prediction, reviewer label and note, um/px). 'unusable' reviews are "
                                       "left out. Train on it with `leukoedge train --data ORIGINAL --data OUT`.")
    p.add_argument("data_dir", type=Path, metavar="DATA_DIR", help="the app's --data-dir (holds results.sqlite3)")
    p.add_argument("--out", type=Path, required=True, metavar="DIR_OR_ZIP",
                   help="a new folder, or a file ending in .zip")
    p.set_defaults(func=_data_reviewed)


def _data_reviewed(args: argparse.Namespace) -> int:
    from .errors import DatasetError
    from .edge_app.reviewed_export import export
    from .edge_app.storage import ResultStore

    if not (args.data_dir / "results.sqlite3").is_file():
        raise DatasetError(f"{args.data_dir}: no results.sqlite3 here",
                           hint="point at the app's --data-dir (copy it off the device first)")
    store = ResultStore(args.data_dir)
    try:
        manifest = export(store, args.out)
    finally:
        store.close()
    counts = manifest["counts"]
    left = ", ".join(f"{n} {why.replace('_', ' ')}" for why, n in counts["left_out"].items() if n) or "none"
    print("images per reviewer label: " + ", ".join(f"{k} {v}" for k, v in counts["by_label"].items()))
    print(f"wrote {counts['images']} image(s) and reviewed.json to {args.out} (left out: {left})")
    return 0


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
