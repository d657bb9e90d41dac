"""The tries of one call to a service's instances, whatever the protocol.

Shared by everything that fails over between registered instances: the gateway's
proxy (`webapi.proxy.attempts.Attempts` adds the HTTP rule of which failures may be
retried) and the websocket relay's connect (`websocket.upstreams`). The steps live
here once:

* `untried` narrows the healthy candidates to the instances this call has not tried;
* `choose` asks the service's strategy (after the live policy's version split) for one
  of them, and tells the health book and the strategy that a try started. The first
  try pays its share into the service's `RetryBudget`;
* each try ends exactly once: `report_failure` (the health book judges it, the strategy
  learns a failure), `connected` then `closed` (a long-lived connection: the instance
  is healthy at once, the strategy counts the connection until it closes, and
  least-time learns the connect time), `abandoned` (the caller went away: released,
  not judged), or the caller's own success report (HTTP: `Attempts.answered`);
* `spend_retry` says whether another try may follow: within the attempt limit
  (`retries` in the live policy, else the caller's default) and the retry budget. The
  first refusal of a spell is logged as a warning, not every refusal.

One object per call, on one event loop; not thread-safe.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from common.balancing import Endpoint, HealthBook, RetryBudget, Strategy
from common.log import get_logger

if TYPE_CHECKING:
    from common.balancing.policy import BalancingPolicy

log = get_logger("common.balancing")


class Tries:
    """The tries of one call to `service`: `choose` the next instance, report how each
    try ended, and ask `spend_retry` before another (see the module docstring). Hot
    path: one per proxied request."""

    __slots__ = ("_budget", "_connect_seconds", "_started", "_strategy", "attempt", "book",
                 "endpoint", "key", "max_attempts", "policy", "service", "settings", "tried",
                 "version")  # fmt: skip

    def __init__(
        self,
        policy: BalancingPolicy,
        book: HealthBook,
        service: str,
        *,
        version: str | None = None,
        key: str | None = None,
        max_attempts: int = 3,
    ) -> None:
        self.policy, self.book = policy, book
        self.service, self.version, self.key = service, version, key
        # The service's live policy, read once: a change never alters a call in flight.
        settings = self.settings = policy.service_policy(service)
        if settings is not None and settings.retries is not None:
            max_attempts = settings.retries + 1
        self.max_attempts = max_attempts
        self.attempt = 0  # tries chosen so far
        self.tried: set[str] = set()
        self.endpoint: Endpoint | None = None  # the current try's
        self._strategy: Strategy | None = None
        self._budget: RetryBudget | None = None  # the service's, from the first try on
        self._started = 0.0
        self._connect_seconds = 0.0

    def untried(self, candidates: Sequence[Endpoint]) -> list[Endpoint]:
        """Those of `candidates` this call has not tried yet."""
        tried = self.tried
        return [c for c in candidates if c.instance_id not in tried]

    def choose(self, candidates: Sequence[Endpoint]) -> Endpoint:
        """One of `candidates` (healthy, not empty) for the next try, marked started."""
        policy, service = self.policy, self.service
        if self._budget is None:  # the call's first try: it pays into the budget
            self._budget = policy.retry_budget(service)
            self._budget.deposit()
        strategy = self._strategy = policy.strategy(service)
        endpoint = strategy.pick(
            policy.for_request(service, candidates, self.version, self.key), self.key
        )
        self.attempt += 1
        self.tried.add(endpoint.instance_id)
        self.book.started(service, endpoint.instance_id)
        strategy.started(endpoint)
        self.endpoint = endpoint
        self._started = time.perf_counter()
        return endpoint

    def elapsed(self) -> float:
        """Seconds since the current try started."""
        return time.perf_counter() - self._started

    def report_failure(self, *, fatal: bool) -> None:
        """The current try failed: `fatal` (nothing could be sent: a connect error)
        ejects the instance at once, otherwise it counts toward its failure streak."""
        endpoint, strategy = self.endpoint, self._strategy
        assert endpoint is not None and strategy is not None
        elapsed = time.perf_counter() - self._started
        strategy.finished(endpoint, elapsed, False)
        self.book.failed(self.service, endpoint.instance_id, fatal=fatal, elapsed=elapsed)

    def spend_retry(self, **fields: Any) -> bool:
        """Whether another try may follow the current one's failure: the attempt limit
        is not reached and the retry budget pays for it. `fields` go to the log."""
        if self.attempt >= self.max_attempts:
            return False
        budget = self._budget
        assert budget is not None  # (set by the first `choose`)
        was_exhausted = budget.exhausted
        fields = {"target_service": self.service, **fields}
        if budget.try_spend():
            log.info("retrying on another instance", extra={"fields": fields})
            return True
        if not was_exhausted:  # once per spell, not once per refused retry
            log.warning("retry budget exhausted: failures are answered, not retried",
                        extra={"fields": fields})  # fmt: skip
        return False

    def connected(self) -> float:
        """The current try's connection is made and will be held (a relayed connection:
        call `closed` when it ends). The instance is healthy; its load lasts until
        `closed`. Returns the connect time in seconds."""
        endpoint = self.endpoint
        assert endpoint is not None
        self.book.succeeded(self.service, endpoint.instance_id)
        self._connect_seconds = time.perf_counter() - self._started
        if self._strategy is not None:
            self._strategy.connected(endpoint, self._connect_seconds)
        return self._connect_seconds

    def closed(self) -> None:
        """The connection `connected` reported has ended: the strategy learns its
        connect time (its lifetime says nothing of the instance's speed)."""
        endpoint, strategy = self.endpoint, self._strategy
        if endpoint is not None and strategy is not None:
            self._strategy = None  # exactly once
            strategy.closed(endpoint, self._connect_seconds, True)

    def abandoned(self) -> None:
        """The current try ended without an outcome (the caller left): released, not judged."""
        endpoint, strategy = self.endpoint, self._strategy
        if endpoint is not None and strategy is not None:
            strategy.finished(endpoint, time.perf_counter() - self._started, True)
