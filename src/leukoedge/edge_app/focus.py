"""A focus score of the live preview, so the user can focus by a number (issue 15).

The capture quality gate refuses out-of-focus captures ("retake: out of
focus"); this lets the user get focus right before capturing. The live page
polls ``GET /api/focus`` (:mod:`.views.focus`) a couple of times a second;
the score is :func:`leukoedge.quality.focus_score` of a preview frame,
decoded at reduced size (JPEG DCT scaling to ~320 px, so a frame costs a few
milliseconds), and computed at most once per :attr:`FocusMeter.min_interval`
whoever asks: ten open tabs cost what one does.

The number rises as the field sharpens and peaks at best focus; its absolute
value depends on the field (a dense smear scores higher than a sparse one), so
the page also shows the best score of the last minute: focus until the score
is at that peak. It is not compared with the model's quality threshold, which
applies to the capture at the training scale, not to the preview.
"""
from __future__ import annotations

import io
import threading
import time
from collections import deque

import numpy as np
from PIL import Image

from ..errors import CameraError, InvalidImageError, LeukoEdgeError

#: Side the preview frame is decoded at (at least) before scoring.
FOCUS_SIDE = 320
#: Seconds a computed score is reused.
MIN_INTERVAL_S = 0.25
#: Seconds of history behind "best recently".
HISTORY_S = 60.0


def _focus_score_fn():
    try:
        from ..quality import focus_score
    except ImportError:  # pragma: no cover - quality.py ships with this version
        return None
    return focus_score


def frame_rgb(jpeg: bytes, side: int = FOCUS_SIDE) -> np.ndarray:
    """A preview JPEG decoded at reduced size (DCT scaling) to uint8 RGB."""
    try:
        with Image.open(io.BytesIO(jpeg)) as img:
            img.draft("RGB", (side, side))
            return np.asarray(img.convert("RGB"), dtype=np.uint8)
    except (OSError, ValueError) as err:
        raise InvalidImageError(f"the preview frame could not be decoded ({err})") from None


class FocusMeter:
    """Latest focus score of a camera's preview, rate-limited, with the best of the last minute."""

    def __init__(self, camera, *, min_interval: float = MIN_INTERVAL_S, history_s: float = HISTORY_S,
                 score_fn=None, clock=time.monotonic) -> None:
        self._camera = camera
        self._score = score_fn if score_fn is not None else _focus_score_fn()
        self._min_interval = min_interval
        self._history_s = history_s
        self._clock = clock
        self._lock = threading.Lock()
        self._last: dict | None = None
        self._last_at = -1e18
        self._history: deque[tuple[float, float]] = deque()
        self.computed = 0  # how many scores were actually computed (tests, and the cost)

    @property
    def available(self) -> bool:
        return self._camera is not None and self._score is not None

    def read(self) -> dict:
        """``{"focus", "best_recent", "age_s", "frame"}``; CameraError without a camera or a frame."""
        if self._camera is None:
            raise CameraError("no camera is attached: no live focus score")
        if self._score is None:
            raise CameraError("this version has no focus score", hint="update leukoedge")
        with self._lock:
            now = self._clock()
            if self._last is None or now - self._last_at >= self._min_interval:
                self._last = self._compute(now)
                self._last_at = now
            return {**self._last, "age_s": round(now - self._last_at, 3)}

    def _compute(self, now: float) -> dict:
        try:
            jpeg = self._camera.preview_jpeg()
        except LeukoEdgeError as err:
            raise CameraError(f"no preview frame for the focus score: {err.message}") from None
        rgb = frame_rgb(jpeg)
        score = float(self._score(rgb))
        self.computed += 1
        self._history.append((now, score))
        while self._history and now - self._history[0][0] > self._history_s:
            self._history.popleft()
        return {"focus": round(score, 4), "best_recent": round(max(s for _, s in self._history), 4),
                "frame": [int(rgb.shape[1]), int(rgb.shape[0])]}
