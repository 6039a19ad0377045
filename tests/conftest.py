"""Shared pytest set-up: markers that skip cleanly when a resource is absent.

- ``shared``: needs ../shared/datasets (the team's real images), never committed.
- ``browser``: needs Debian's chromium (``python3 tasks.py test`` installs it when it can).
- ``pi`` / ``edgetpu``: hardware-only; always skipped off the device.

Seeds: every test that trains a model takes its seed from :func:`training_seed`
(the ``base_seed`` fixture), which adds ``LEUKOEDGE_TEST_SEED`` (default 0) to the
test's own offset, so ``LEUKOEDGE_TEST_SEED=3 pytest`` reruns every training
with other weights, orders, augmentations and synthetic images. A test that
asserts what a trained model learned must hold for any seed and any x86-64 CPU
(oneDNN on or off); see DEVELOPERS.md, "Tests".
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATASETS = Path(os.environ.get("LEUKOEDGE_SHARED", REPO.parent / "shared")) / "datasets"
TALEQANI = SHARED_DATASETS / "taleqani-all"
OOD = SHARED_DATASETS / "ood"

# Tests run on 2 cores beside other work; keep TensorFlow from oversubscribing them.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("MPLBACKEND", "Agg")


def training_seed(offset: int = 0) -> int:
    """``offset`` + ``LEUKOEDGE_TEST_SEED`` (default 0): the seed of a training test."""
    raw = os.environ.get("LEUKOEDGE_TEST_SEED", "0")
    try:
        return int(raw) + offset
    except ValueError:
        raise pytest.UsageError(f"LEUKOEDGE_TEST_SEED must be an integer, got {raw!r}") from None


@pytest.fixture(scope="session")
def base_seed() -> int:
    """The session's base training seed (``LEUKOEDGE_TEST_SEED``, default 0)."""
    return training_seed()


def pytest_report_header(config):
    return f"LEUKOEDGE_TEST_SEED={training_seed()} TF_ENABLE_ONEDNN_OPTS={os.environ.get('TF_ENABLE_ONEDNN_OPTS', '(default)')}"


def chromium_path() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def pytest_collection_modifyitems(config, items):
    skip_shared = pytest.mark.skip(reason=f"{SHARED_DATASETS} is absent (team-only real images)")
    skip_browser = pytest.mark.skip(reason="Debian chromium is not installed")
    skip_pi = pytest.mark.skip(reason="needs a Raspberry Pi camera")
    skip_tpu = pytest.mark.skip(reason="needs a Coral Edge TPU")
    has_shared = TALEQANI.is_dir()
    has_browser = chromium_path() is not None
    for item in items:
        if "shared" in item.keywords and not has_shared:
            item.add_marker(skip_shared)
        if "browser" in item.keywords and not has_browser:
            item.add_marker(skip_browser)
        if "pi" in item.keywords:
            item.add_marker(skip_pi)
        if "edgetpu" in item.keywords:
            item.add_marker(skip_tpu)


@pytest.fixture(scope="session")
def taleqani_dir() -> Path:
    if not TALEQANI.is_dir():
        pytest.skip(f"{TALEQANI} is absent")
    return TALEQANI


@pytest.fixture(scope="session")
def ood_dir() -> Path:
    if not OOD.is_dir():
        pytest.skip(f"{OOD} is absent")
    return OOD
