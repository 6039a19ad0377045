"""The microscope-side web app: Flask UI + JSON API, camera, result storage.

Importing this package is cheap and never imports Flask or TensorFlow: the CLI
imports ``leukoedge.edge_app.cli`` to build ``leukoedge --help`` even on a
workstation without the ``edge`` extra. The app factory and its config are
loaded on first attribute access.

    from leukoedge.edge_app import AppConfig, create_app
    app = create_app(AppConfig(bundle=Path("bundle")))
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from .app import create_app
    from .config import AppConfig

__all__ = ["AppConfig", "create_app"]


def __getattr__(name: str) -> Any:
    if name == "create_app":
        from .app import create_app

        return create_app
    if name == "AppConfig":
        from .config import AppConfig

        return AppConfig
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
