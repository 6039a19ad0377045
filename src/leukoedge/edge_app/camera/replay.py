"""A fake microscope: loops over a folder of images (demos, tests, training a user).

Each :meth:`ReplayCamera.capture` returns the next image, decoded by the one
preprocessing path (:func:`leukoedge.preprocess.load_image`), so a replayed
file classifies exactly like the same file uploaded. The preview shows the
image the next capture will return.

What can fail, as :class:`~leukoedge.errors.CameraError`: the folder missing
or holding no readable images; locking exposure and white balance, which stored
images do not have (:class:`~.base.CameraSettingsUnsupportedError`).
"""
from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

from ...errors import CameraError, InvalidImageError
from ...files import IMAGE_SUFFIXES, image_files
from ...preprocess import load_image
from .base import PREVIEW_MAX_SIDE, CameraSettingsUnsupportedError, encode_jpeg


class ReplayCamera:
    """Serves the images of ``folder`` in sorted order, forever."""

    name = "replay"
    #: Why locking is refused (read by :func:`.lock.unsupported_reason` before anything is tried).
    lock_unsupported = "the replay camera shows stored images, which have no exposure or white balance to lock"

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise CameraError(f"replay folder {self.folder} does not exist")
        self.files = image_files(self.folder, recursive=False)
        if not self.files:
            raise CameraError(f"replay folder {self.folder} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
        self._lock = threading.Lock()
        self._next = 0
        self._preview: tuple[int, bytes] | None = None
        self.detail = f"{len(self.files)} images from {self.folder}"

    def __enter__(self) -> "ReplayCamera":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def next_file(self) -> Path:
        """The file the next capture will return."""
        with self._lock:
            return self.files[self._next % len(self.files)]

    def capture(self) -> np.ndarray:
        with self._lock:
            path = self.files[self._next % len(self.files)]
            self._next += 1
        return self._load(path)

    def preview_jpeg(self) -> bytes:
        with self._lock:
            index = self._next % len(self.files)
            cached = self._preview
        if cached is not None and cached[0] == index:
            return cached[1]
        jpeg = encode_jpeg(self._load(self.files[index]), max_side=PREVIEW_MAX_SIDE)
        with self._lock:
            self._preview = (index, jpeg)
        return jpeg

    def close(self) -> None:
        """Nothing to release."""

    def lock_exposure(self) -> dict:
        raise self._no_settings()

    def unlock(self) -> None:
        raise self._no_settings()

    def apply_settings(self, settings: dict) -> None:
        raise self._no_settings()

    def _no_settings(self) -> CameraSettingsUnsupportedError:
        return CameraSettingsUnsupportedError(
            self.lock_unsupported, hint="lock the settings on the microscope's camera (--camera picamera2 or opencv)")

    @staticmethod
    def _load(path: Path) -> np.ndarray:
        try:
            return load_image(path)
        except InvalidImageError as err:
            raise CameraError(f"replay image unreadable: {err.message}") from None
