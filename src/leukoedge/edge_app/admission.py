"""Admit image decodes by the memory they will need, first come first served.

Why: a Raspberry Pi has 2-4 GB. One 64 MP PNG decodes to a 256 MB buffer
before it is reduced; eight worker threads decoding such uploads at once
would need 2 GB. Counting requests (a semaphore) cannot tell a 12 MP JPEG
decoded at 1/8 size (~1 MB) from that PNG, so each decode reserves its
estimated bytes (:attr:`leukoedge.decode.ImageHeader.estimated_bytes`) from
one budget and waits, in arrival order, until they fit. A single decode larger
than the whole budget is admitted alone (the pixel budget in
:mod:`leukoedge.decode` already refused what cannot be decoded at all), so
nothing waits forever and the peak stays at about one budget.
"""
from __future__ import annotations

import threading
from collections import deque
from contextlib import contextmanager
from typing import Iterator

#: Default decode budget: one maximum-size (64 MP) decode, or many small ones, at a time.
DEFAULT_BUDGET_BYTES = 384 * 1024 * 1024


class MemoryAdmission:
    """A FIFO, byte-weighted semaphore."""

    def __init__(self, budget_bytes: int = DEFAULT_BUDGET_BYTES) -> None:
        if budget_bytes <= 0:
            raise ValueError("the decode memory budget must be positive")
        self.budget = int(budget_bytes)
        self._cond = threading.Condition()
        self._in_use = 0
        self._queue: deque[object] = deque()

    @property
    def in_use(self) -> int:
        with self._cond:
            return self._in_use

    @contextmanager
    def reserve(self, nbytes: int) -> Iterator[int]:
        """Hold ``nbytes`` (clamped to the budget) for the duration of the ``with`` block."""
        want = max(0, min(int(nbytes), self.budget))
        ticket = object()
        with self._cond:
            self._queue.append(ticket)
            try:
                self._cond.wait_for(lambda: self._queue[0] is ticket and self._in_use + want <= self.budget)
            finally:
                self._queue.remove(ticket)
                self._cond.notify_all()  # the next in line may fit now
            self._in_use += want
        try:
            yield want
        finally:
            with self._cond:
                self._in_use -= want
                self._cond.notify_all()
