"""Decode admission by memory (issue 13): big decodes wait their turn, small ones pass, order is kept.

Driven with threads and events only (no sleeps as assertions): what is checked
is who holds the budget at each step, not how long anything takes.
"""
from __future__ import annotations

import threading

import pytest

from leukoedge.edge_app.admission import MemoryAdmission


class Holder:
    """A thread that reserves ``nbytes``, logs its name once admitted, and holds until ``release()``."""

    def __init__(self, admission: MemoryAdmission, nbytes: int, log: list, name) -> None:
        self.entered, self._go = threading.Event(), threading.Event()

        def run():
            with admission.reserve(nbytes):
                log.append(name)
                self.entered.set()
                self._go.wait(10)

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def release(self) -> None:
        self._go.set()
        self.thread.join(5)


def _wait_queued(admission: MemoryAdmission, n: int) -> None:
    for _ in range(1000):
        with admission._cond:
            if len(admission._queue) >= n:
                return
        threading.Event().wait(0.005)
    raise AssertionError(f"{n} waiters never queued")


def test_a_decode_that_does_not_fit_waits_until_memory_is_released():
    admission, log = MemoryAdmission(100), []
    first = Holder(admission, 80, log, "first")
    assert first.entered.wait(5)
    second = Holder(admission, 80, log, "second")
    _wait_queued(admission, 1)
    assert not second.entered.is_set() and admission.in_use == 80  # 80 + 80 > 100: it waits
    first.release()
    assert second.entered.wait(5) and log == ["first", "second"]
    second.release()
    assert admission.in_use == 0


def test_small_decodes_share_the_budget():
    admission, log = MemoryAdmission(100), []
    holders = [Holder(admission, 20, log, i) for i in range(4)]
    assert all(h.entered.wait(5) for h in holders)  # 4 x 20 <= 100: all at once
    assert admission.in_use == 80
    for h in holders:
        h.release()
    assert admission.in_use == 0


def test_first_come_first_served_so_a_big_decode_is_not_starved():
    admission, log = MemoryAdmission(100), []
    a = Holder(admission, 60, log, "a")
    assert a.entered.wait(5)
    big = Holder(admission, 95, log, "big")
    _wait_queued(admission, 1)
    small = Holder(admission, 10, log, "small")  # would fit now, but arrived after "big"
    _wait_queued(admission, 2)
    assert not small.entered.is_set()
    a.release()
    assert big.entered.wait(5)
    assert log == ["a", "big"] and not small.entered.is_set()  # 95 + 10 > 100 until big is done
    big.release()
    assert small.entered.wait(5) and log == ["a", "big", "small"]
    small.release()


def test_a_decode_larger_than_the_whole_budget_runs_alone_instead_of_waiting_forever():
    admission = MemoryAdmission(100)
    with admission.reserve(10_000) as held:
        assert held == 100 and admission.in_use == 100
    assert admission.in_use == 0


def test_an_error_inside_releases_the_reservation():
    admission = MemoryAdmission(100)
    with pytest.raises(RuntimeError):
        with admission.reserve(70):
            raise RuntimeError("decode failed")
    with admission.reserve(100):
        assert admission.in_use == 100
