"""Decode admission by memory (issue 13): big decodes wait their turn, small ones pass, order is kept.

Driven with threads and events only (no sleeps as assertions): what is checked
is who holds the budget at each step, not how long anything takes.
"""
from __future__ import annotations

import threading

import pytest

from leukoedge.edge_app.admission import MemoryAdmission


def _holder(admission: MemoryAdmission, nbytes: int, entered: threading.Event, release: threading.Event,
            log: list, name: str) -> threading.Thread:
    def run():
        with admission.reserve(nbytes):
            log.append(name)
            entered.set()
            release.wait(10)
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def _wait_queued(admission: MemoryAdmission, n: int) -> None:
    for _ in range(1000):
        with admission._cond:
            if len(admission._queue) >= n:
                return
        threading.Event().wait(0.005)
    raise AssertionError(f"{n} waiters never queued")


def test_a_decode_that_does_not_fit_waits_until_memory_is_released():
    admission = MemoryAdmission(100)
    log: list = []
    big_in, big_go = threading.Event(), threading.Event()
    _holder(admission, 80, big_in, big_go, log, "first")
    assert big_in.wait(5)
    second_in, second_go = threading.Event(), threading.Event()
    t = _holder(admission, 80, second_in, second_go, log, "second")
    _wait_queued(admission, 1)
    assert not second_in.is_set() and admission.in_use == 80  # 80 + 80 > 100: it waits
    big_go.set()
    assert second_in.wait(5) and log == ["first", "second"]
    second_go.set()
    t.join(5)
    assert admission.in_use == 0


def test_small_decodes_share_the_budget():
    admission = MemoryAdmission(100)
    events = [(threading.Event(), threading.Event()) for _ in range(4)]
    log: list = []
    threads = [_holder(admission, 20, entered, go, log, i) for i, (entered, go) in enumerate(events)]
    assert all(entered.wait(5) for entered, _ in events)  # 4 x 20 <= 100: all at once
    assert admission.in_use == 80
    for _, go in events:
        go.set()
    for t in threads:
        t.join(5)
    assert admission.in_use == 0


def test_first_come_first_served_so_a_big_decode_is_not_starved():
    admission = MemoryAdmission(100)
    log: list = []
    a_in, a_go = threading.Event(), threading.Event()
    _holder(admission, 60, a_in, a_go, log, "a")
    assert a_in.wait(5)
    big_in, big_go = threading.Event(), threading.Event()
    _holder(admission, 95, big_in, big_go, log, "big")
    _wait_queued(admission, 1)
    small_in, small_go = threading.Event(), threading.Event()
    _holder(admission, 10, small_in, small_go, log, "small")  # would fit now, but arrived after "big"
    _wait_queued(admission, 2)
    assert not small_in.is_set()
    a_go.set()
    assert big_in.wait(5)
    assert log == ["a", "big"] and not small_in.is_set()  # 95 + 10 > 100 until big is done
    big_go.set()
    assert small_in.wait(5) and log == ["a", "big", "small"]
    small_go.set()


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
