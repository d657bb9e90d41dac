"""Passive ejection with backoff and trial re-admission, on a fake clock (no sleeps)."""

from __future__ import annotations

from common.registry import InstanceRecord
from webapi.proxy.health import HealthBook


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _records(*ids: str) -> list[InstanceRecord]:
    return [InstanceRecord("svc", i, kind="http", address="127.0.0.1:1") for i in ids]


def _ids(records: list[InstanceRecord]) -> list[str]:
    return [r.instance_id for r in records]


def test_connect_error_ejects_at_once_with_doubling_backoff() -> None:
    clock = Clock()
    book = HealthBook(clock=clock)
    records = _records("a", "b")
    book.failed("a", fatal=True)
    assert _ids(book.usable(records)) == ["b"]
    clock.now += 1.01  # first ejection: 1 s
    assert _ids(book.usable(records)) == ["a", "b"]  # the trial
    book.started("a")
    assert _ids(book.usable(records)) == ["b"]  # only one trial at a time
    book.failed("a", fatal=True)  # the trial failed: ejected for 2 s now
    clock.now += 1.5
    assert _ids(book.usable(records)) == ["b"]
    clock.now += 0.6
    book.started("a")
    book.succeeded("a")  # the trial passed: re-admitted, backoff reset
    assert _ids(book.usable(records)) == ["a", "b"]
    book.failed("a", fatal=True)
    clock.now += 1.01
    assert "a" in _ids(book.usable(records))


def test_5xx_streak_ejects_but_isolated_errors_do_not() -> None:
    clock = Clock()
    book = HealthBook(clock=clock, failures_to_eject=3)
    records = _records("a")
    book.failed("a", fatal=False)
    book.failed("a", fatal=False)
    book.succeeded("a")  # the streak is broken
    book.failed("a", fatal=False)
    book.failed("a", fatal=False)
    assert _ids(book.usable(records)) == ["a"]
    book.failed("a", fatal=False)
    assert book.usable(records) == []


def test_a_lost_trial_does_not_leave_the_instance_stuck() -> None:
    clock = Clock()
    book = HealthBook(clock=clock, trial_timeout=5)
    records = _records("a")
    book.failed("a", fatal=True)
    clock.now += 1.01
    book.started("a")  # the trial request is cancelled and never reports
    assert book.usable(records) == []
    clock.now += 5.1
    assert _ids(book.usable(records)) == ["a"]


def test_active_checks_mark_down_and_readmit() -> None:
    clock = Clock()
    book = HealthBook(clock=clock)
    records = _records("a", "b")
    book.active_result("a", False, fall=2, rise=2)
    assert _ids(book.usable(records)) == ["a", "b"]
    book.active_result("a", False, fall=2, rise=2)
    assert _ids(book.usable(records)) == ["b"]
    book.failed("b", fatal=True)  # passively ejected too
    book.active_result("b", True, fall=2, rise=2)
    book.active_result("b", True, fall=2, rise=2)  # healthy again: re-admitted at once
    book.active_result("a", True, fall=2, rise=2)
    book.active_result("a", True, fall=2, rise=2)
    assert _ids(book.usable(records)) == ["a", "b"]


def test_forget_drops_departed_instances() -> None:
    book = HealthBook()
    book.failed("gone", fatal=True)
    book.forget(["other"])
    assert not book.is_ejected("gone")
