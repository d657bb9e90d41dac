"""Saying once that a background loop lost Redis, and once that it has it back.

Every process keeps loops that talk to Redis on their own (a registry resync, an
event subscription, a reply inbox, a worker's read). While Redis is down each of them
retries every half second or so; a warning per attempt would write thousands of
lines in a minute's outage and bury the one line that matters. So each loop keeps
one `Outage`: `failed(exc)` on every failure, `recovered()` on every success, and only
the first failure of an outage (a warning) and the first success after it (an info
line with how long it lasted) are logged. When Redis is up but refusing (the
credentials, out of memory, a read-only replica: `common.redis_failures`), the
warning says so in its fields (`"kind": "auth", "refused": "redis refused the
credentials"`), so a wrong password does not read as a network outage; the loop
retries all the same. The message stays the loop's own, for log queries.

A loop hands every failure to its `Outage`, not only "Redis unreachable": Redis
refusing writes (maxmemory reached: the OOM error), a key of the wrong type, or a bug
must not end the loop either (a dead heartbeat unregisters a worker that still runs).
Within one outage each kind of failure is logged once: "unreachable" (a connection
error or timeout, whatever its text) is one kind, any other error's class is another,
so Redis refusing writes after it came back still gets its line. A failure that is not
Redis's (a bug) carries its traceback, in the same one line (`exc`).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from redis.exceptions import RedisError

from common.errors import RedisUnavailable
from common.redis_failures import REFUSALS, redis_failure, redis_failure_message


class Outage:
    """The log of one loop's Redis outages: a warning as one starts, info as it ends."""

    def __init__(self, log: logging.Logger, down: str, up: str, **fields: Any) -> None:
        """`down`: the warning's message as an outage starts (`"registry resync failed"`),
        `up`: the info line's as it ends; `fields`: logged with both (say, a channel)."""
        self.log, self.down_message, self.up_message, self.fields = log, down, up, fields
        self.since: float | None = None  # when the outage began (time.monotonic)
        self._kinds: set[str] = set()  # the kinds of failure logged in this outage

    def failed(self, exc: BaseException, **fields: Any) -> None:
        """One more failure; logged (with `fields` too) only when it starts an outage,
        or is the outage's first failure of its kind."""
        if isinstance(exc, RedisUnavailable) and isinstance(exc.__cause__, Exception):
            exc = exc.__cause__  # ours, standing for redis-py's error: the cause tells more
        kind = failure_kind(exc)
        if self.since is None:
            self.since = time.monotonic()
            self._kinds.clear()
        elif kind in self._kinds:
            return
        self._kinds.add(kind)
        fields = {**self.fields, **fields, "kind": kind, "error": str(exc) or type(exc).__name__}
        if kind in REFUSALS:
            fields["refused"] = redis_failure_message(exc, kind)
        bug = not isinstance(exc, RedisError | OSError)
        self.log.warning(self.down_message, extra={"fields": fields}, exc_info=exc if bug else None)

    def recovered(self) -> None:
        """A success; logged only when it ends an outage."""
        if self.since is not None:
            seconds = round(time.monotonic() - self.since, 1)
            self.since = None
            fields = {**self.fields, "after_seconds": seconds}
            self.log.info(self.up_message, extra={"fields": fields})


def failure_kind(exc: BaseException) -> str:
    """`"unreachable"` for Redis out of reach (connection error, timeout), Redis's
    refusal (`"out_of_memory"`, `"auth"`: `common.redis_failures`), else the error's
    class name (`"ResponseError"` for a reply of no known kind, `"KeyError"`)."""
    kind = redis_failure(exc)
    if kind in (None, "unreachable", "timeout"):
        return "unreachable" if kind else type(exc).__name__
    return kind
