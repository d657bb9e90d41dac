"""`common.log_budget.LogBudgets`: lines per key with a bound, the rest counted in a
summary logged when the key's window is over, on its own (a timer) if no line comes."""

from __future__ import annotations

import logging

import pytest

from common.log_budget import OTHERS, LogBudgets
from tests.helpers import wait_for_async

pytestmark = pytest.mark.timeout(10)

log = logging.getLogger("tests.log_budget")


def _summaries(caplog: pytest.LogCaptureFixture) -> list[tuple[str, int]]:
    return [
        (r.fields["client"], r.fields["count"])  # type: ignore[attr-defined]
        for r in caplog.records
        if r.getMessage() == "lines not logged"
    ]


async def test_a_keys_count_is_logged_once_its_window_is_over_with_no_more_lines(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger=log.name)
    budgets = LogBudgets(log, "lines not logged", logging.INFO, "client", limit=2, window=0.3)
    assert [budgets.spend("a") for _ in range(5)] == [True, True, False, False, False]
    assert budgets.spend("b")  # each key has its own budget
    assert _summaries(caplog) == []
    await wait_for_async(lambda: _summaries(caplog), timeout=5)
    assert _summaries(caplog) == [("a", 3)]
    assert budgets.spend("a")  # a new window


async def test_keys_past_the_bound_share_one_budget(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=log.name)
    budgets = LogBudgets(log, "lines not logged", logging.INFO, "client", limit=1, max_keys=2)
    assert budgets.spend("a") and budgets.spend("b")
    assert budgets.spend("c")  # the first of the others
    assert not budgets.spend("d") and not budgets.spend("e") and not budgets.spend("a")
    budgets.flush()
    assert sorted(_summaries(caplog)) == [("a", 1), (OTHERS, 2)]


def test_limit_zero_logs_every_line() -> None:
    budgets = LogBudgets(log, "lines not logged", logging.INFO, "client", limit=0)
    assert all(budgets.spend("a") for _ in range(100))


def test_a_keys_summary_names_it_by_its_fields_and_the_others_by_theirs(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger=log.name)
    budgets = LogBudgets(log, "lines not logged", logging.INFO, "failure", limit=1, max_keys=1)
    kind = {"service": "pay", "status": 502}
    assert budgets.spend("502 pay", kind) and not budgets.spend("502 pay", kind)
    assert budgets.spend("503 pay", {"service": "pay", "status": 503})  # the others'
    assert not budgets.spend("504 pay", {"service": "pay", "status": 504})
    budgets.flush()
    fields = [r.fields for r in caplog.records]  # type: ignore[attr-defined]
    assert [{k: v for k, v in f.items() if k != "limit"} for f in fields] == [
        {"service": "pay", "status": 502, "count": 1},
        {"failure": OTHERS, "count": 1},
    ]
