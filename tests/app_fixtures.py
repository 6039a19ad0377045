"""Shared fixtures for the edge-app tests (imported by each test module; no conftest).

One REAL bundle per test session (tiny CNN, real int8 conversion and parity
gate), one real LiteRT classifier shared by every app, and a replay folder of
synthetic smear images. Each test gets a fresh data directory.

    pytest_plugins = ["app_fixtures"]   # in each test module: fixtures registered once per session

Plain helpers (image bytes, CSRF token scraping) live in ``app_helpers``, so
this module is only ever imported as a plugin (and gets assertion rewriting).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bundle_factory import CLASSES, draw_cell, shared_tiny_bundle

__all__ = ["tiny_bundle", "classifier", "replay_dir", "make_app", "app", "client"]

REPLAY_SIZE = 64


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory) -> Path:
    return shared_tiny_bundle(tmp_path_factory)  # trained once per session, shared with other test files


@pytest.fixture(scope="session")
def classifier(tiny_bundle):
    from leukoedge.runtime import Classifier, load_bundle

    return Classifier(load_bundle(tiny_bundle), num_threads=1, edgetpu="off")


@pytest.fixture(scope="session")
def replay_dir(tmp_path_factory) -> Path:
    """Two synthetic images per class, 64 px PNGs, sorted names = class order."""
    folder = tmp_path_factory.mktemp("replay")
    rng = np.random.default_rng(7)
    for i in range(2):
        for label in CLASSES:
            Image.fromarray(draw_cell(label, rng, REPLAY_SIZE)).save(folder / f"{i}-{label}.png")
    return folder


@pytest.fixture
def make_app(tmp_path, classifier, tiny_bundle):
    """Factory: ``make_app(camera="replay:DIR"|"none"|Camera, **config)`` -> Flask app."""
    from leukoedge.edge_app import AppConfig, create_app
    from leukoedge.edge_app.camera import open_camera

    apps = []

    def factory(camera="none", **overrides):
        overrides.setdefault("data_dir", tmp_path / "data")
        config = AppConfig(bundle=tiny_bundle, camera=camera if isinstance(camera, str) else "test",
                           secret_key=b"x" * 32, **overrides)
        if isinstance(camera, str):
            cam, status = open_camera(camera)
            app = create_app(config, classifier=classifier, camera=cam, camera_status=status)
        else:
            app = create_app(config, classifier=classifier, camera=camera)
        apps.append(app)
        return app

    yield factory
    for app in apps:
        app.extensions["leukoedge"].close()


@pytest.fixture
def app(make_app, replay_dir):
    return make_app(camera=f"replay:{replay_dir}")


@pytest.fixture
def client(app):
    return app.test_client()
