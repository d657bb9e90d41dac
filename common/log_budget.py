"""Log lines a client can cause, with a bound: the first `LOGGED_PER_WINDOW` of a
`WINDOW` written in full, the rest counted and told by one summary line.

A client making mistakes in a loop must not flood the log and bury the lines that
matter: 5,000 bad websocket messages wrote 5,000 lines in 0.4 s, and a client sending
made-up credentials to the gateway made three lines in four of its log in a soak. So
such lines go through a budget: `LogBudget`, one source's lines of one kind (a
websocket connection's refused messages), or `LogBudgets`, a budget per key (the
gateway's refused requests, per client address). Past the budget, a line is counted;
the count is logged in one summary line (its fields, `count` and `limit`) once the
window is over: at the next line after it, or when the source ends (`flush`).
`LogBudgets` also logs the summaries that are due on its own, a timer being set only
while some line went uncounted, so a client that stops is still told about.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

# Lines written in full per source and window; the window (seconds).
LOGGED_PER_WINDOW = 10
WINDOW = 60.0
# `LogBudgets`: how many keys have a budget of their own at once; the lines of any other
# key meanwhile share one budget, whose summary names the key `OTHERS`. So a client
# with many addresses (an IPv6 block) still costs the log a bounded number of lines.
MAX_KEYS = 1000
OTHERS = "others"


class LogBudget:
    """One source's lines of one kind: `limit` per `WINDOW`, the rest counted and told
    by one `summary` line (module docstring)."""

    __slots__ = ("fields", "level", "limit", "log", "logged", "summary", "suppressed",
                 "window", "window_end")  # fmt: skip

    def __init__(
        self,
        log: logging.Logger,
        summary: str,
        level: int,
        fields: dict[str, Any],
        *,
        limit: int = LOGGED_PER_WINDOW,
        window: float = WINDOW,
        now: float | None = None,
    ) -> None:
        """`summary`: the count's message, logged at `level` with `fields` (the source)."""
        self.log, self.summary, self.level, self.fields = log, summary, level, fields
        self.limit, self.window = limit, window
        self.logged = 0  # lines written in this window
        self.suppressed = 0  # lines not written since the last summary
        self.window_end = (time.monotonic() if now is None else now) + window

    def spend(self, now: float | None = None) -> bool:
        """Whether the next line may be written; counted when not."""
        now = time.monotonic() if now is None else now
        if now >= self.window_end:
            self.flush()
            self.logged, self.window_end = 0, now + self.window
        if self.logged < self.limit:
            self.logged += 1
            return True
        self.suppressed += 1
        return False

    def flush(self) -> None:
        """Log how many lines went unwritten, if any (the window ended, or the source)."""
        if self.suppressed:
            fields = {**self.fields, "count": self.suppressed,
                      "limit": f"{self.limit} per {self.window:g} s"}  # fmt: skip
            self.log.log(self.level, self.summary, extra={"fields": fields})
            self.suppressed = 0


class LogBudgets:
    """A `LogBudget` per key (module docstring): `spend(key)` before each line. A key's
    budget lasts its window; the summaries due are logged at the next `spend` or by a
    timer, and all of them by `flush` (when the process stops). `limit` 0: no bound."""

    def __init__(
        self,
        log: logging.Logger,
        summary: str,
        level: int,
        field: str,
        *,
        limit: int = LOGGED_PER_WINDOW,
        window: float = WINDOW,
        max_keys: int = MAX_KEYS,
    ) -> None:
        """`field`: the name the key is logged under in a summary (`"client"`)."""
        self.log, self.summary, self.level, self.field = log, summary, level, field
        self.limit, self.window = limit, window
        self.max_keys = max_keys
        # In the order their windows started, so also of their ends: those over are first.
        self._budgets: dict[str, LogBudget] = {}
        self._timer: asyncio.TimerHandle | None = None

    def spend(self, key: str, fields: dict[str, Any] | None = None) -> bool:
        """Whether the next line of `key` may be written; counted when not. `fields`:
        what names the key in its summary line, when not `{field: key}` alone."""
        if not self.limit:
            return True
        now = time.monotonic()
        self._end_windows(now)
        budget = self._budgets.get(key)
        if budget is None:
            if len(self._budgets) >= self.max_keys:
                key, fields = OTHERS, None
                budget = self._budgets.get(key)
            if budget is None:
                budget = LogBudget(self.log, self.summary, self.level, fields or {self.field: key},
                                   limit=self.limit, window=self.window, now=now)  # fmt: skip
                self._budgets[key] = budget
        if budget.spend(now):
            return True
        if self._timer is None:
            self._summarise_at(budget.window_end - now)
        return False

    def flush(self) -> None:
        """Log every count not logged yet, and forget the budgets (the process stops)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for budget in self._budgets.values():
            budget.flush()
        self._budgets.clear()

    def _end_windows(self, now: float) -> None:
        """Log the counts of the windows over, and forget their budgets."""
        budgets = self._budgets
        while budgets:
            key = next(iter(budgets))
            budget = budgets[key]
            if budget.window_end > now:
                return
            del budgets[key]
            budget.flush()

    def _summarise_at(self, delay: float) -> None:
        """Log the counts due in `delay` seconds then, unless lines come meanwhile."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop (a script): the next spend or flush logs them
            return
        self._timer = loop.call_later(max(delay, 0.0), self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        now = time.monotonic()
        self._end_windows(now)
        for budget in self._budgets.values():
            if budget.suppressed:  # the earliest window with a count to tell
                self._summarise_at(budget.window_end - now)
                return
