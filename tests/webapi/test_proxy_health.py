"""Passive ejection with backoff and trial re-admission, on a fake clock (no sleeps)."""

from __future__ import annotations

import logging

import pytest

from common.instance_record import InstanceRecord
from webapi.proxy.health import HealthBook


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _records(
    *ids: str, service: str = "svc", health_path: str | None = None
) -> list[InstanceRecord]:
    return [InstanceRecord(service, i, kind="http", address="127.0.0.1:1",
                           health_path=health_path) for i in ids]  # fmt: skip


def _ids(records: list[InstanceRecord]) -> list[str]:
    return [r.instance_id for r in records]


def test_connect_error_ejects_at_once_with_doubling_backoff() -> None:
    clock = Clock()
    book = HealthBook(clock=clock)
    records = _records("a", "b")
    book.failed("svc", "a", fatal=True)
    assert _ids(book.usable("svc", records)) == ["b"]
    clock.now += 1.01  # first ejection: 1 s
    assert _ids(book.usable("svc", records)) == ["a", "b"]  # the trial
    book.started("svc", "a")
    assert _ids(book.usable("svc", records)) == ["b"]  # only one trial at a time
    book.failed("svc", "a", fatal=True)  # the trial failed: ejected for 2 s now
    clock.now += 1.5
    assert _ids(book.usable("svc", records)) == ["b"]
    clock.now += 0.6
    book.started("svc", "a")
    book.succeeded("svc", "a")  # the trial passed: re-admitted, backoff reset
    assert _ids(book.usable("svc", records)) == ["a", "b"]
    book.failed("svc", "a", fatal=True)
    clock.now += 1.01
    assert "a" in _ids(book.usable("svc", records))


def test_one_incident_is_one_ejection_not_one_per_request_in_flight(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The probe's restart: ten requests in flight at "a" all fail within milliseconds.
    caplog.set_level(logging.WARNING, logger="switchboard.health")
    clock = Clock()
    book = HealthBook(clock=clock)
    records = _records("a", "b")
    for _ in range(10):
        book.started("svc", "a")
    clock.now += 0.5
    for _ in range(10):
        book.failed("svc", "a", fatal=True, elapsed=0.5)
        clock.now += 0.0003
    assert _ids(book.usable("svc", records)) == ["b"]
    ejected = [r for r in caplog.records if r.getMessage() == "upstream ejected"]
    assert [r.fields["seconds"] for r in ejected] == [1.0]  # type: ignore[attr-defined]
    clock.now += 1.01  # one ejection of 1 s, not 30 s
    assert _ids(book.usable("svc", records)) == ["a", "b"]
    book.started("svc", "a")
    book.failed("svc", "a", fatal=True, elapsed=0.01)  # the trial failed: now it doubles
    clock.now += 1.5
    assert _ids(book.usable("svc", records)) == ["b"]
    clock.now += 0.6
    assert _ids(book.usable("svc", records)) == ["a", "b"]


def test_a_late_failure_from_before_the_ejection_is_not_the_trial_failing() -> None:
    clock = Clock()
    book = HealthBook(clock=clock, failures_to_eject=3)
    records = _records("a")
    for _ in range(3):
        book.started("svc", "a")
    for _ in range(3):  # a streak of 5xx ejects it ...
        book.failed("svc", "a", fatal=False, elapsed=0.1)
    assert book.usable("svc", records) == []
    clock.now += 1.01
    book.started("svc", "a")  # ... the trial is out when a request sent before the
    book.failed("svc", "a", fatal=True, elapsed=5.0)  # ejection times out: not judged
    assert book.usable("svc", records) == []  # (the trial is still out)
    clock.now += 0.3
    book.failed("svc", "a", fatal=False, elapsed=0.3)  # the trial fails: 2 s, not 4 s
    clock.now += 1.9
    assert book.usable("svc", records) == []
    clock.now += 0.11
    assert _ids(book.usable("svc", records)) == ["a"]
    book.started("svc", "a")
    book.succeeded("svc", "a")  # the next trial passed
    book.failed("svc", "a", fatal=True, elapsed=0.01)  # a new incident: the base 1 s again
    clock.now += 1.01
    assert _ids(book.usable("svc", records)) == ["a"]


def test_failures_reported_during_an_ejection_do_not_lengthen_it() -> None:
    # Without the request's duration a failure is still recognised while ejected.
    clock = Clock()
    book = HealthBook(clock=clock)
    records = _records("a")
    book.failed("svc", "a", fatal=True)
    for _ in range(5):
        clock.now += 0.1
        book.failed("svc", "a", fatal=True)
        book.failed("svc", "a", fatal=False)
    clock.now += 0.51
    assert _ids(book.usable("svc", records)) == ["a"]


def test_5xx_streak_ejects_but_isolated_errors_do_not() -> None:
    clock = Clock()
    book = HealthBook(clock=clock, failures_to_eject=3)
    records = _records("a")
    book.failed("svc", "a", fatal=False)
    book.failed("svc", "a", fatal=False)
    book.succeeded("svc", "a")  # the streak is broken
    book.failed("svc", "a", fatal=False)
    book.failed("svc", "a", fatal=False)
    assert _ids(book.usable("svc", records)) == ["a"]
    book.failed("svc", "a", fatal=False)
    assert book.usable("svc", records) == []


def test_a_lost_trial_does_not_leave_the_instance_stuck() -> None:
    clock = Clock()
    book = HealthBook(clock=clock, trial_timeout=5)
    records = _records("a")
    book.failed("svc", "a", fatal=True)
    clock.now += 1.01
    book.started("svc", "a")  # the trial request is cancelled and never reports
    assert book.usable("svc", records) == []
    clock.now += 5.1
    assert _ids(book.usable("svc", records)) == ["a"]


def test_active_checks_mark_down_and_readmit() -> None:
    clock = Clock()
    book = HealthBook(clock=clock)
    records = _records("a", "b")
    a, b = _records("a", "b", health_path="/health")
    book.active_result(a, False, fall=2, rise=2)
    assert _ids(book.usable("svc", records)) == ["a", "b"]
    book.active_result(a, False, fall=2, rise=2)
    assert _ids(book.usable("svc", records)) == ["b"]
    book.failed("svc", "b", fatal=True)  # passively ejected too
    book.active_result(b, True, fall=2, rise=2)
    book.active_result(b, True, fall=2, rise=2)  # healthy again: re-admitted at once
    book.active_result(a, True, fall=2, rise=2)
    book.active_result(a, True, fall=2, rise=2)
    assert _ids(book.usable("svc", records)) == ["a", "b"]


def test_forget_drops_departed_instances() -> None:
    book = HealthBook()
    book.failed("svc", "gone", fatal=True)
    book.forget(_records("other"))
    assert not book.is_ejected("svc", "gone")


def test_forget_departed_drops_the_instances_of_one_service_that_left() -> None:
    book = HealthBook()
    for instance_id in ("a", "b", "c"):
        book.failed("svc", instance_id, fatal=True)
    book.failed("other", "a", fatal=True)
    assert book.tracked() == 4
    book.forget_departed("svc", {"b"})
    assert book.tracked() == 2 and book.is_ejected("svc", "b") and book.is_ejected("other", "a")
    book.forget_departed("svc", set())
    book.forget_departed("unknown", set())
    assert book.tracked() == 1 and book.is_ejected("other", "a")


def test_instances_of_two_services_with_one_id_are_judged_apart() -> None:
    # Native heartbeats let a backend choose its id: two teams may both say "worker-1".
    book = HealthBook()
    alpha, beta = _records("worker-1", service="alpha"), _records("worker-1", service="beta")
    book.failed("alpha", "worker-1", fatal=True)
    assert book.usable("alpha", alpha) == []
    assert book.usable("beta", beta) == beta
    assert not book.is_ejected("beta", "worker-1")
    (checked,) = _records("worker-1", service="beta", health_path="/health")
    book.active_result(checked, False, fall=1, rise=1)
    assert book.is_ejected("beta", "worker-1")
    book.forget(beta, [checked])  # alpha's instance is gone: only its state goes
    assert book.is_ejected("beta", "worker-1")
    assert book.usable("alpha", alpha) == alpha


def test_an_instance_no_longer_checked_is_not_left_marked_down() -> None:
    book = HealthBook()
    (checked,) = _records("a", health_path="/health")
    book.active_result(checked, False, fall=2, rise=2)
    book.active_result(checked, False, fall=2, rise=2)
    assert book.usable("svc", [checked]) == []
    book.forget([checked], [checked])  # still checked at that path: still down
    assert book.usable("svc", [checked]) == []
    # It heartbeats without a health path now: no check will ever pass again.
    (unchecked,) = _records("a")
    book.forget([unchecked], [])
    assert book.usable("svc", [unchecked]) == [unchecked]


def test_a_changed_health_path_starts_the_count_over() -> None:
    book = HealthBook()
    (old,) = _records("a", health_path="/old")
    (new,) = _records("a", health_path="/new")
    for _ in range(2):
        book.active_result(old, False, fall=2, rise=2)
    assert book.is_ejected("svc", "a")
    book.forget([new], [new])
    assert not book.is_ejected("svc", "a")
    book.active_result(old, False, fall=2, rise=2)  # a result of the old path, late
    book.active_result(new, False, fall=2, rise=2)  # one failure at the new path: not yet
    assert not book.is_ejected("svc", "a")
