"""Locked exposure and white balance: what is locked, kept in the data folder, re-applied at start.

Why: automatic exposure and white balance re-decide for every field of view, so
one smear photographed twice gets two colourings, and a model that reads the
stain reads the camera's mood instead. The user sets the lamp, lets the
automatics settle once, and locks them; from then on every capture has the
same exposure, gain and colour gains (see each backend for how).

    lock = CameraLock(camera, data_dir)   # once per app
    lock.restore()                        # at start: re-apply a saved lock (logged)
    lock.lock(); lock.unlock(); lock.state()

The lock lives in ``DATA_DIR/camera_lock.json`` (written atomically), so a
restart, a power cut or a new app version keeps the colours the user chose;
unlocking deletes the file. A saved lock that cannot be re-applied (another
camera, the camera refusing) never stops the app: it runs on automatic
exposure and says why in :meth:`CameraLock.state` (health, live page).

What can fail, as :class:`~leukoedge.errors.CameraError`: no camera;
:class:`~.base.CameraSettingsUnsupportedError` for a camera that cannot lock
(the replay camera, a USB camera without the controls); the device refusing;
the data folder not writable (the camera is then put back on automatic, so a
lock is always both in force and saved, or neither).
"""
from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path

from ...errors import CameraError
from ...files import fsync_dir, write_json
from . import opencv_backend, picamera2_backend
from .base import CameraSettingsUnsupportedError, LockableCamera

log = logging.getLogger(__name__)

LOCK_FILE = "camera_lock.json"
FILE_FORMAT = "leukoedge-camera-lock"
FILE_VERSION = 1
#: How each backend's settings read for a person (the backends define their own dicts).
_DESCRIBE = {"picamera2": picamera2_backend.describe_settings, "opencv": opencv_backend.describe_settings}


def describe(backend: str, settings: dict) -> str:
    """A one-line description of locked ``settings`` for the live page and health."""
    try:
        return _DESCRIBE[backend](settings)
    except (KeyError, TypeError, ValueError):
        return json.dumps(settings, sort_keys=True)


def unsupported_reason(camera) -> str | None:
    """Why ``camera`` cannot lock (None when it can try): no camera, or a backend without the controls."""
    if camera is None:
        return "no camera is attached; the app is in upload mode"
    reason = getattr(camera, "lock_unsupported", None)
    if reason:
        return str(reason)
    if not isinstance(camera, LockableCamera):
        return f"the {getattr(camera, 'name', 'current')} camera cannot lock its exposure and white balance"
    return None


class CameraLock:
    """The app's one lock state: the camera, the saved file and what health shows (thread-safe)."""

    def __init__(self, camera, data_dir: str | Path) -> None:
        self._camera = camera
        self.backend = getattr(camera, "name", "none") if camera is not None else "none"
        self.path = Path(data_dir) / LOCK_FILE
        self._mutex = threading.Lock()
        self._locked: dict | None = None   # {"backend", "settings", "locked_at"} while a lock is in force
        self._problem: str | None = None   # why a saved lock is not in force

    def restore(self) -> None:
        """Re-apply the saved lock at start-up; any failure leaves automatic exposure and is reported."""
        with self._mutex:
            saved = self._read_saved()
            if saved is None:
                return
            where = self.path
            summary = describe(saved["backend"], saved["settings"])
            reason = unsupported_reason(self._camera)
            if reason is None and saved["backend"] != self.backend:
                reason = f"it was made on the {saved['backend']} camera and this one is {self.backend}"
            if reason is None:
                try:
                    self._camera.apply_settings(saved["settings"])
                except CameraError as err:
                    reason = err.message
            if reason is not None:
                self._problem = (f"the exposure and white balance locked on {saved['locked_at']} ({summary}) "
                                 f"are not in force: {reason}. Lock again, or unlock, which forgets them.")
                log.warning("camera lock from %s not re-applied: %s", where, reason)
                return
            self._locked = saved
            log.info("camera: re-applied the locked exposure and white balance from %s (%s, locked %s)",
                     where, summary, saved["locked_at"])

    def lock(self) -> dict:
        """Fix the camera at what its automatics chose now, save it, return :meth:`state`."""
        with self._mutex:
            reason = unsupported_reason(self._camera)
            if self._camera is None:
                raise CameraError(reason, hint="restart with --camera picamera2 or opencv")
            if reason is not None:
                raise CameraSettingsUnsupportedError(
                    reason, hint="lock it on the microscope's camera (--camera picamera2 or opencv)")
            settings = self._camera.lock_exposure()
            record = {"backend": self.backend, "settings": settings,
                      "locked_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
            try:
                write_json(self.path, {"format": FILE_FORMAT, "version": FILE_VERSION, **record,
                                       "summary": describe(self.backend, settings)})
            except OSError as err:
                self._try_unlock_device()
                raise CameraError(f"the camera lock could not be saved in {self.path.parent} ({err.strerror or err}); "
                                  "the camera was put back on automatic exposure",
                                  hint="is the data folder writable and the disk not full?") from None
            self._locked, self._problem = record, None
            log.info("camera: exposure and white balance locked (%s)", describe(self.backend, settings))
            return self._state()

    def unlock(self) -> dict:
        """Automatic exposure and white balance again; the saved lock is deleted. Idempotent."""
        with self._mutex:
            if unsupported_reason(self._camera) is None:
                self._camera.unlock()  # CameraError: the device refused, nothing forgotten
            was_saved = self.path.exists()
            self.path.unlink(missing_ok=True)
            if was_saved:
                fsync_dir(self.path.parent)
            if self._locked is not None or was_saved:
                log.info("camera: exposure and white balance unlocked (automatic again)")
            self._locked, self._problem = None, None
            return self._state()

    def state(self) -> dict:
        """JSON-ready: supported, locked, saved (a lock file exists, in force or not), backend, settings,
        summary, locked_at, message (why the camera cannot lock, or why a saved lock is not in force)."""
        with self._mutex:
            return self._state()

    def _state(self) -> dict:
        reason = unsupported_reason(self._camera)
        locked = self._locked
        return {
            "supported": reason is None,
            "locked": locked is not None,
            "saved": self.path.exists(),
            "backend": self.backend,
            "settings": dict(locked["settings"]) if locked else None,
            "summary": describe(locked["backend"], locked["settings"]) if locked else None,
            "locked_at": locked["locked_at"] if locked else None,
            "message": self._problem or reason,
        }

    def _read_saved(self) -> dict | None:
        """The saved lock, or None (no file; an unreadable one is reported and left for lock/unlock to replace)."""
        try:
            raw = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as err:
            return self._unreadable(f"{type(err).__name__}: {err}")
        if (not isinstance(raw, dict) or raw.get("format") != FILE_FORMAT or raw.get("version") != FILE_VERSION
                or not isinstance(raw.get("backend"), str) or not isinstance(raw.get("settings"), dict)):
            return self._unreadable(f"not a leukoedge camera lock of version {FILE_VERSION}")
        return {"backend": raw["backend"], "settings": raw["settings"], "locked_at": str(raw.get("locked_at", "?"))}

    def _unreadable(self, why: str) -> None:
        """Report a saved lock that cannot be used; returns None for :meth:`_read_saved`."""
        self._problem = f"the saved camera lock {self.path.name} could not be read ({why}); lock again or unlock"
        log.warning("camera lock file %s ignored: %s", self.path, why)

    def _try_unlock_device(self) -> None:
        try:
            self._camera.unlock()
        except CameraError as err:
            log.error("camera: could not switch automatic exposure back on after a failed save: %s", err.message)
