"""Saying once that a background loop lost Redis, and once that it has it back.

Every process keeps loops that talk to Redis on their own (a registry resync, an
event subscription, a reply inbox, a worker's read). While Redis is down each of them
retries every half second or so; a warning per attempt would write thousands of
lines in a minute's outage and bury the one line that matters. So each loop keeps
one `Outage`: `failed(exc)` on every failure, `recovered()` on every success, and only
the first failure of an outage (a warning) and the first success after it (an info
line with how long it lasted) are logged. When Redis is up but refusing (the
credentials, out of memory, a read-only replica: `common.redis_failures`), the
warning says so ("waiting for redis: redis refused the credentials"), so a wrong
password does not read as a network outage; the loop retries all the same.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from common.redis_failures import REFUSALS, redis_failure, redis_failure_message


class Outage:
    """The log of one loop's Redis outages: a warning as one starts, info as it ends."""

    def __init__(self, log: logging.Logger, down: str, up: str, **fields: Any) -> None:
        """`down`: the warning's message as an outage starts (`"registry resync failed"`),
        `up`: the info line's as it ends; `fields`: logged with both (say, a channel)."""
        self.log, self.down_message, self.up_message, self.fields = log, down, up, fields
        self.since: float | None = None  # when the outage began (time.monotonic)

    def failed(self, exc: BaseException, **fields: Any) -> None:
        """One more failure; logged (with `fields` too) only when it starts an outage."""
        if self.since is None:
            self.since = time.monotonic()
            message = self.down_message
            if (kind := redis_failure(exc)) in REFUSALS:
                message = f"{message}: {redis_failure_message(exc, kind)}"
            fields = {**self.fields, **fields, "error": str(exc) or type(exc).__name__}
            self.log.warning(message, extra={"fields": fields})

    def recovered(self) -> None:
        """A success; logged only when it ends an outage."""
        if self.since is not None:
            seconds = round(time.monotonic() - self.since, 1)
            self.since = None
            fields = {**self.fields, "after_seconds": seconds}
            self.log.info(self.up_message, extra={"fields": fields})
