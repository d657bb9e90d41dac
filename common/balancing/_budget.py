"""A retry budget: how many retries one service's requests may make (`RetryBudget`).

A retry adds load to a service that is already failing. Without a bound, every
client request to a struggling pool turns into `attempts` requests and the
failure feeds itself. The budget bounds the extra load, the way Finagle's
`RetryBudget` and Envoy's `retry_budget` do:

* each request deposits `ratio` of a retry (0.2: retries add at most 20 % load);
* time adds `min_per_second` retries per second whatever the traffic, so a quiet
  service can still retry its occasional connect failure;
* each retry spends one; with nothing left, the failure is answered, not retried.

The balance is capped at `WINDOW` seconds of the minimum rate (at least one
retry), so a long calm period never banks a retry storm. One budget per service
and process (`BalancingPolicy.retry_budget`): a failing service cannot use up
the retries of a healthy one.
"""

from __future__ import annotations

import time
from collections.abc import Callable

# Seconds of `min_per_second` the balance may hold.
WINDOW = 10.0


class RetryBudget:
    """The retries one service may still make (module docstring). Not thread-safe:
    one event loop."""

    __slots__ = ("_clock", "_refilled", "cap", "denied", "exhausted", "min_per_second", "ratio",
                 "tokens")  # fmt: skip

    def __init__(
        self,
        ratio: float = 0.2,
        min_per_second: float = 10.0,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._clock = clock
        self.ratio = self.min_per_second = self.cap = self.tokens = 0.0
        self.configure(ratio, min_per_second)
        self.tokens = self.cap  # a fresh budget may retry at once
        self._refilled = clock()
        self.denied = 0  # retries refused since the start
        self.exhausted = False  # the last retry asked for was refused

    def configure(self, ratio: float, min_per_second: float) -> None:
        """New limits; the balance is kept, within the new cap."""
        if ratio < 0 or min_per_second < 0:
            raise ValueError("a retry budget's ratio and min_per_second must be 0 or more")
        self.ratio, self.min_per_second = ratio, min_per_second
        self.cap = max(1.0, min_per_second * WINDOW)
        self.tokens = min(self.tokens, self.cap)

    def deposit(self) -> None:
        """A request has started. Hot path: no clock read."""
        tokens = self.tokens + self.ratio
        self.tokens = tokens if tokens < self.cap else self.cap

    def state(self) -> dict[str, float | int | bool]:
        """What an operator reads (`GET /admin/proxy/stats`): the retries it may make
        now (`available`, refilled to this moment; nothing is spent), its `cap`, the
        retries refused since the start (`denied`) and whether the last was (`exhausted`)."""
        refill = (self._clock() - self._refilled) * self.min_per_second
        available = min(self.cap, self.tokens + refill)
        return {"available": round(available, 3), "cap": self.cap, "denied": self.denied,
                "exhausted": self.exhausted}  # fmt: skip

    def try_spend(self) -> bool:
        """Whether one retry may go now (and, if so, spend it)."""
        now = self._clock()
        refill = (now - self._refilled) * self.min_per_second
        self._refilled = now
        self.tokens = min(self.cap, self.tokens + refill)
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            self.exhausted = False
            return True
        self.denied += 1
        self.exhausted = True
        return False
