"""One producer thread, many MJPEG viewers (the picamera2 examples' pattern).

The producer grabs a preview JPEG from the camera at a fixed rate and hands it
to every viewer through a :class:`threading.Condition`; viewers never touch
the camera, so ten open browser tabs cost one camera read per frame, not ten.
The producer runs only while someone is watching and stops on :meth:`close`.

Viewers are counted and capped: each holds a WSGI worker thread for as long
as it watches, and the cap keeps workers free for classification requests.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Iterator

from ...errors import CameraError
from .base import Camera, CameraHealth

log = logging.getLogger(__name__)
BOUNDARY = "frame"


class FrameBroadcaster:
    """Latest preview frame + a condition that wakes every viewer when it changes."""

    def __init__(self, camera: Camera, *, fps: float, max_viewers: int, health: CameraHealth | None = None) -> None:
        self._camera = camera
        self._health = health or CameraHealth()
        self._interval = 1.0 / fps
        self._max_viewers = max_viewers
        self._cond = threading.Condition()
        self._frame: bytes | None = None
        self._seq = 0
        self._viewers = 0
        self._thread: threading.Thread | None = None
        self._stopped = False
        self.last_error: str = ""

    @property
    def viewers(self) -> int:
        with self._cond:
            return self._viewers

    def mjpeg(self) -> Iterator[bytes]:
        """A viewer: claims a slot now (CameraError when full), then yields multipart parts.

        The slot is claimed eagerly, before the first ``next()``, so the view can
        refuse with 503 instead of starting a stream it cannot serve.
        """
        with self._cond:
            if self._stopped:
                raise CameraError("the live preview is shutting down")
            if self._viewers >= self._max_viewers:
                raise CameraError(f"too many live previews are open (limit {self._max_viewers})",
                                  hint="close another browser tab showing the live page")
            self._viewers += 1
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._produce, name="mjpeg-producer", daemon=True)
                self._thread.start()
        return self._parts()

    def _parts(self) -> Iterator[bytes]:
        seen = -1
        try:
            while True:
                with self._cond:
                    self._cond.wait_for(lambda: self._stopped or (self._frame is not None and self._seq != seen),
                                        timeout=2.0)
                    if self._stopped:
                        return
                    if self._frame is None or self._seq == seen:
                        continue  # camera stalled; keep waiting (the client may leave)
                    frame, seen = self._frame, self._seq
                yield (f"--{BOUNDARY}\r\nContent-Type: image/jpeg\r\nContent-Length: {len(frame)}\r\n\r\n"
                       .encode("ascii") + frame + b"\r\n")
        finally:
            with self._cond:
                self._viewers -= 1

    def _produce(self) -> None:
        while True:
            with self._cond:
                if self._stopped or self._viewers == 0:
                    if self._thread is threading.current_thread():
                        self._thread = None  # the next viewer starts a fresh producer
                    return
            started = time.monotonic()
            try:
                jpeg = self._camera.preview_jpeg()
            except CameraError as err:
                # Keep the stream alive: a loose cable may come back. Slow down meanwhile.
                if err.message != self.last_error:
                    log.warning("live preview: %s", err.message)
                self.last_error = err.message
                self._health.failed(err.message)
                time.sleep(1.0)
                continue
            self.last_error = ""
            self._health.ok()
            with self._cond:
                self._frame = jpeg
                self._seq += 1
                self._cond.notify_all()
            time.sleep(max(0.0, self._interval - (time.monotonic() - started)))

    def close(self) -> None:
        """Stop the producer and end every viewer's stream."""
        with self._cond:
            self._stopped = True
            thread = self._thread
            self._cond.notify_all()
        if thread is not None:
            thread.join(timeout=5.0)
