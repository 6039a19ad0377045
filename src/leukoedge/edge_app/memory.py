"""Give memory back to the operating system after large decodes (glibc only; a no-op elsewhere).

Why: glibc's malloc raises its mmap threshold each time a large block is
freed (up to 32 MB), so later image buffers come from the heap, and with one
malloc arena per worker thread the freed megabytes stay resident: measured on
the app before this module, one 64 MP upload left ~1 GB resident (issue 13).
:func:`configure_allocator` pins the threshold, so image-sized buffers are
mapped and unmapped directly, and :func:`release_free_memory` trims what the
heap still holds after a request that decoded a large image.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys

log = logging.getLogger(__name__)

#: glibc mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
#: Allocations at least this large are mapped directly, and unmapped on free.
MMAP_THRESHOLD_BYTES = 1 << 20
#: Trim the heap after a request whose decode reserved at least this much.
TRIM_AFTER_BYTES = 16 << 20

_libc = None


def _glibc():
    global _libc
    if _libc is None:
        _libc = False
        if sys.platform.startswith("linux"):
            try:
                lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
                lib.malloc_trim  # musl has no malloc_trim: stay a no-op there
                lib.mallopt
                _libc = lib
            except (OSError, AttributeError):
                _libc = False
    return _libc or None


def configure_allocator() -> bool:
    """Pin glibc's mmap threshold (process-wide; the server calls it once). True when applied."""
    lib = _glibc()
    if lib is None:
        return False
    ok = bool(lib.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(
        lib.mallopt(_M_TRIM_THRESHOLD, 4 * MMAP_THRESHOLD_BYTES))
    if not ok:
        log.debug("mallopt refused the mmap/trim thresholds")
    return ok


def release_free_memory(reserved_bytes: int) -> None:
    """Return freed heap pages to the OS after a large decode (cheap: ~1 ms)."""
    if reserved_bytes < TRIM_AFTER_BYTES:
        return
    lib = _glibc()
    if lib is not None:
        lib.malloc_trim(0)
