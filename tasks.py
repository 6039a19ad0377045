#!/usr/bin/env python3
"""Set-up and entry points that need nothing but Python 3.10+.

    python3 tasks.py demo   # create .venv, install, run the end-to-end demo
    python3 tasks.py test   # create .venv, install, run the test suite

Only the standard library is used here, so these work on a fresh machine.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
PY = BIN / "python"


def _run(cmd: list[str], **kw) -> int:
    print("+", " ".join(str(c) for c in cmd), flush=True)
    return subprocess.call([str(c) for c in cmd], cwd=ROOT, **kw)


def ensure_venv() -> None:
    """Create .venv and install leukoedge[all] once per pyproject.toml version."""
    if sys.version_info < (3, 10):
        sys.exit(f"leukoedge needs Python 3.10 or newer (this is {sys.version.split()[0]})")
    digest = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()[:16]
    stamp = VENV / f".installed-{digest}"
    if stamp.exists():
        return
    if not PY.exists():
        if _run([sys.executable, "-m", "venv", VENV]) != 0:
            sys.exit("could not create .venv (on Debian/Ubuntu: apt install python3-venv)")
    if _run([PY, "-m", "pip", "install", "--quiet", "-e", ".[all]"]) != 0:
        sys.exit("pip install failed; see the messages above")
    for old in VENV.glob(".installed-*"):
        old.unlink()
    stamp.touch()


def ensure_chromium() -> None:
    """Browser tests need Debian's chromium; install it when we are allowed to.

    Without it (no root, no apt) the browser tests skip with a reason.
    """
    if shutil.which("chromium") or shutil.which("chromium-browser"):
        return
    if os.name == "posix" and os.geteuid() == 0 and shutil.which("apt-get"):
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        _run(["apt-get", "update", "-qq"], env=env)
        _run(["apt-get", "install", "-y", "-qq", "chromium"], env=env)
    else:
        print("chromium not found and cannot be installed here: browser tests will be skipped")


def demo(args: list[str]) -> int:
    ensure_venv()
    return _run([BIN / "leukoedge", "demo", *args])


def test(args: list[str]) -> int:
    ensure_venv()
    ensure_chromium()
    return _run([PY, "-m", "pytest", *args])


def main() -> int:
    tasks = {"demo": demo, "test": test}
    if len(sys.argv) < 2 or sys.argv[1] not in tasks:
        print(__doc__)
        return 2
    return tasks[sys.argv[1]](sys.argv[2:])


if __name__ == "__main__":
    sys.exit(main())
