"""Packaging promises: the device install and the light imports stay TensorFlow-free."""
from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest

from leukoedge import cli

REPO = Path(__file__).resolve().parents[1]


def _run_fresh(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return out.stdout.strip()


@pytest.mark.parametrize(
    "module",
    ["leukoedge", "leukoedge.data", "leukoedge.preprocess", "leukoedge.cli", "leukoedge.runtime", "leukoedge.edge_app"],
)
def test_light_modules_never_import_tensorflow(module):
    code = f"import sys, {module}; print(any(m == 'tensorflow' or m.startswith('tensorflow.') or m == 'keras' for m in sys.modules))"
    assert _run_fresh(code) == "False"


def test_cli_parser_builds_without_tensorflow():
    code = "import sys; from leukoedge.cli import build_parser; build_parser(); print('tensorflow' in sys.modules)"
    assert _run_fresh(code) == "False"


def _requirement_names(dist_name: str, extras: frozenset[str] = frozenset()) -> set[str]:
    names = set()
    for req in metadata.requires(dist_name) or []:
        name = re.split(r"[ ;<>=!~\[(]", req, maxsplit=1)[0].lower().replace("_", "-")
        marker = req.split(";", 1)[1] if ";" in req else ""
        extra = re.search(r"extra\s*==\s*['\"]([^'\"]+)['\"]", marker)
        if extra and extra.group(1) not in extras:
            continue
        names.add(name)
    return names


def _closure(roots: set[str]) -> set[str]:
    seen, todo = set(), list(roots)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            todo.extend(_requirement_names(name) - seen)
        except metadata.PackageNotFoundError:
            pass  # optional platform-specific dependency not installed here
    return seen


def test_edge_extra_does_not_pull_tensorflow():
    """Walk the installed dependency closure of leukoedge[edge]: no TensorFlow, no Keras."""
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    project = pyproject["project"]
    roots = {re.split(r"[ ;<>=!~\[]", r, maxsplit=1)[0].lower() for r in project["dependencies"]}
    roots |= {re.split(r"[ ;<>=!~\[]", r, maxsplit=1)[0].lower() for r in project["optional-dependencies"]["edge"]}
    closure = _closure(roots)
    assert "ai-edge-litert" in closure
    assert not {"tensorflow", "tensorflow-cpu", "keras", "tf-keras", "pycoral"} & closure, sorted(closure)


def test_every_listed_subcommand_has_a_working_help():
    parser = cli.build_parser()
    names = [name for name, _ in cli.COMMAND_MODULES]
    for name in names:
        with pytest.raises(SystemExit) as exit_info:
            parser.parse_args([name, "--help"])
        assert exit_info.value.code == 0


def test_cli_turns_typed_errors_into_messages(capsys, tmp_path):
    code = cli.main(["data", "check", str(tmp_path / "missing")])
    assert code != 0
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
