"""Keep native libraries' start-up chatter off the user's terminal; ``-v`` brings it back.

Why: every TensorFlow command printed seven lines nobody asked for, e.g.
``I0000 ... port.cc:153] oneDNN custom operations are on``, ``E0000 ...
cuda_platform.cc:52] failed call to cuInit: ... UNKNOWN ERROR (303)`` on a
machine without a GPU, ``fully_quantize: 0, inference_type: 6 ...`` from the
converter and ``INFO: Created TensorFlow Lite XNNPACK delegate for CPU.`` from
LiteRT (issue 14). ``TF_CPP_MIN_LOG_LEVEL`` does not reach them: absl writes
everything logged before its own initialisation straight to file descriptor 2,
and LiteRT's C++ logging has no switch at all.

So :func:`filter_native_stderr` points file descriptor 2 at a pipe whose
reader drops the lines in :data:`NOISE` and forwards every other line,
while Python's own ``sys.stderr`` (logging, progress bars, error messages)
keeps writing to the terminal directly, unbuffered and unfiltered. Only known
chatter is dropped: an unknown native error still reaches the user.
Progress bars are switched off when stderr is not a terminal (``TQDM_DISABLE``),
so log files hold no carriage-return debris or blank lines.

Standard library only: this runs on the Raspberry Pi too (LiteRT chatter).
"""
from __future__ import annotations

import os
import re
import sys
import threading
from contextlib import contextmanager
from typing import Iterator

#: Native start-up lines that say nothing a user can act on.
NOISE = tuple(re.compile(p) for p in (
    r"^WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR\s*$",
    # absl-format INFO / WARNING lines from TensorFlow's C++ start-up and converter (I0000 00:00:17... 316 port.cc:153] ...)
    r"^[IW]\d{4} [\d:.]+\s+\d+ [\w.]+\.(cc|h):\d+\] ",
    # the one ERROR absl prints on every CPU-only machine
    r"^E\d{4} [\d:.]+\s+\d+ cuda_(platform|executor|diagnostics)\.cc:\d+\] (failed call to cuInit|.*(CUDA|driver))",
    r"^fully_quantize: \d+, inference_type: \d+, input_inference_type: \w+, output_inference_type: \w+\s*$",
    r"^INFO: Created TensorFlow Lite (XNNPACK )?delegate for CPU\.\s*$",
    r"^INFO: Initialized TensorFlow Lite runtime\.\s*$",
))


def is_noise(line: str) -> bool:
    return any(p.search(line) for p in NOISE)


def quiet_environment() -> None:
    """Environment for libraries not imported yet (call before TensorFlow's first import)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # TF's own logging after absl's initialisation
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    if not _stderr_is_terminal():
        os.environ.setdefault("TQDM_DISABLE", "1")


def _stderr_is_terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


@contextmanager
def filter_native_stderr() -> Iterator[None]:
    """Drop :data:`NOISE` lines written to file descriptor 2 by native code, for the ``with`` block.

    A no-op where descriptors cannot be redirected (no fd 2, Windows consoles).
    """
    try:
        saved = os.dup(2)
    except OSError:
        yield
        return
    read_end, write_end = os.pipe()
    original_stderr = sys.stderr
    python_stderr = None
    try:
        # Python's stderr keeps going straight to the terminal -- unless something (a test's capture)
        # has already replaced it, in which case it is left alone.
        if _writes_to_fd2(original_stderr):
            python_stderr = os.fdopen(os.dup(saved), "w", buffering=1, errors="backslashreplace",
                                      encoding=getattr(original_stderr, "encoding", None) or "utf-8")
        os.dup2(write_end, 2)
    except OSError:
        os.close(read_end)
        os.close(write_end)
        os.close(saved)
        if python_stderr is not None:
            python_stderr.close()
        yield
        return
    os.close(write_end)
    if python_stderr is not None:
        sys.stderr = python_stderr
    forwarder = threading.Thread(target=_forward, args=(read_end, saved), name="stderr-filter", daemon=True)
    forwarder.start()
    try:
        yield
    finally:
        if python_stderr is not None:
            sys.stderr = original_stderr
            try:
                python_stderr.flush()
            except (OSError, ValueError):
                pass
        os.dup2(saved, 2)  # closes the pipe's last write end: the forwarder reads EOF
        forwarder.join(timeout=5)
        if python_stderr is not None:
            python_stderr.close()
        os.close(saved)


def _writes_to_fd2(stream) -> bool:
    try:
        return stream.fileno() == 2
    except (AttributeError, ValueError, OSError):
        return False


def _forward(read_end: int, target: int) -> None:
    """Copy lines from the pipe to ``target``, dropping noise; partial lines are flushed at EOF."""
    pending = b""
    with os.fdopen(read_end, "rb", buffering=0) as pipe:
        while True:
            chunk = pipe.read(65536)
            if not chunk:
                break
            pending += chunk
            *lines, pending = pending.split(b"\n")
            out = b"".join(line + b"\n" for line in lines if not is_noise(line.decode("utf-8", "replace")))
            if out:
                _write_all(target, out)
    if pending and not is_noise(pending.decode("utf-8", "replace")):
        _write_all(target, pending)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            written = os.write(fd, view)
        except OSError:
            return
        view = view[written:]
