"""One proxied request's way through a service's instances: which one to try next,
and whether a failed try may be retried on another.

Both ways of forwarding use it: `Proxy.forward` (a coroutine, for every route) and
the fast path's callback exchange (`webapi.fastpath.direct`, no task per request),
which hands its `Attempts` over to `Proxy.forward` when a retry needs a new
connection. So the retry rule lives here once:

* a connect failure (nothing was sent) ejects the instance and is retried on
  another one;
* a broken connection is retried only for idempotent methods whose body can be
  sent again (not streamed);
* a timeout is not retried (slow is not dead: our users run models that take
  seconds, and a retry would double the load on a slow pool): it answers 504 and
  counts toward the instance's failure streak;
* every retry also needs the service's retry budget (`RetryBudget`: each
  request adds a fifth of a retry by default) and its attempt limit (`retries`
  in the live policy, else the gateway's default).

Each try is reported to the health book and the strategy exactly once, by
`answered` or `failed`. A pass-through splice (`webapi.passthrough`) is one long
try: `connected` tells the health book, and `closed`, when the splice ends, tells
the strategy (so least-connections counts open splices, as nginx's `stream` does,
and least-time learns the connect time, not the connection's lifetime).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from common.balancing import Endpoint, RetryBudget, Strategy
from common.log import get_logger
from webapi.errors import (
    ApiError,
    NoHealthyInstance,
    UnknownService,
    UpstreamFailed,
    UpstreamTimedOut,
)
from webapi.proxy.errors import UpstreamConnectError, UpstreamError, UpstreamTimeout
from webapi.proxy.upstream import IDEMPOTENT_METHODS

if TYPE_CHECKING:
    from webapi.proxy.forward import Proxy

log = get_logger("webapi.proxy")


class Attempts:
    """The tries of one request: `next()` picks an instance, `answered()` or `failed()`
    reports how the try ended. Hot path: one per proxied request."""

    __slots__ = ("_budget", "_connect_seconds", "_proxy", "_started", "_strategy", "attempt",
                 "connect_timeout", "endpoint", "failure", "key", "kind", "max_attempts",
                 "method", "replayable", "service", "timeout", "tried", "version")  # fmt: skip

    def __init__(
        self,
        proxy: Proxy,
        service: str,
        method: str,
        *,
        version: str | None,
        key: str | None,
        replayable: bool,
        timeout: float | None = None,
        kind: str = "http",
    ) -> None:
        self._proxy = proxy
        self.service, self.method, self.version, self.key, self.kind = (
            service, method, version, key, kind)  # fmt: skip
        self.replayable = replayable
        # The policy is read once, when the request starts: a change never alters it.
        settings = proxy.policy.service_policy(service)
        if timeout is None:
            timeout = settings.timeout if settings and settings.timeout else proxy.timeout
        self.timeout: float = timeout  # the wait for the response head
        self.connect_timeout = settings.connect_timeout if settings else None
        self.max_attempts = proxy.max_attempts
        if settings is not None and settings.retries is not None:
            self.max_attempts = settings.retries + 1
        self.attempt = 0
        self.tried: set[str] = set()
        self.failure: ApiError | None = None  # the last try's error, while retrying
        self.endpoint: Endpoint | None = None  # the current try's
        self._strategy: Strategy | None = None
        self._budget: RetryBudget | None = None  # the service's, once it has an instance
        self._started = 0.0

    def next(self) -> Endpoint:
        """Choose the instance of the next try and mark it started. Raises `ApiError`:
        `UnknownService` or `NoHealthyInstance`, or the last try's failure when no
        instance is left."""
        proxy = self._proxy
        service, version = self.service, self.version
        try:
            candidates = proxy.candidates(service, version, self.kind)
        except (UnknownService, NoHealthyInstance):
            if self.failure is not None:
                raise self.failure from None  # the failure itself, not "nobody left"
            raise
        tried = self.tried
        if tried:
            fresh = [c for c in candidates if c.instance_id not in tried]
            if not fresh:
                if self.failure is not None:
                    raise self.failure
                fresh = candidates
            candidates = fresh
        policy = proxy.policy
        if self._budget is None:  # the request's first try: it pays into the budget
            self._budget = policy.retry_budget(service)
            self._budget.deposit()
        strategy = self._strategy = policy.strategy(service)
        endpoint: Endpoint = strategy.pick(
            policy.for_request(service, candidates, version, self.key), self.key
        )
        self.attempt += 1
        tried.add(endpoint.instance_id)
        proxy.book.started(endpoint.instance_id)
        strategy.started(endpoint)
        self.endpoint = endpoint
        self._started = time.perf_counter()
        return endpoint

    def answered(self, status: int) -> float:
        """The try got a response head with `status`; the seconds it took."""
        elapsed = time.perf_counter() - self._started
        endpoint, strategy = self.endpoint, self._strategy
        assert endpoint is not None and strategy is not None
        ok = status < 500
        strategy.finished(endpoint, elapsed, ok)
        if ok:
            self._proxy.book.succeeded(endpoint.instance_id)
        else:
            self._proxy.book.failed(endpoint.instance_id, fatal=False)
        return elapsed

    def failed(self, exc: UpstreamError) -> None:
        """The try failed before a response head. Returns when another try is allowed
        (then call `next()`); raises the error to answer (`UpstreamFailed`,
        `UpstreamTimedOut`) otherwise."""
        elapsed = time.perf_counter() - self._started
        endpoint, strategy = self.endpoint, self._strategy
        assert endpoint is not None and strategy is not None
        strategy.finished(endpoint, elapsed, False)
        connect_failed = isinstance(exc, UpstreamConnectError)
        timed_out = isinstance(exc, UpstreamTimeout)
        self._proxy.book.failed(endpoint.instance_id, fatal=connect_failed)
        if timed_out:
            self.failure = UpstreamTimedOut(f"{self.service} did not answer in time")
        else:
            self.failure = UpstreamFailed(f"{self.service}: {exc.message or type(exc).__name__}")
        safe = connect_failed or (
            not timed_out and self.method in IDEMPOTENT_METHODS and self.replayable
        )
        if safe and self.attempt < self.max_attempts:
            fields = {"service": self.service, "instance": endpoint.instance_id, "error": str(exc)}
            budget = self._budget
            assert budget is not None  # (set by `next`)
            was_exhausted = budget.exhausted
            if budget.try_spend():
                log.info("retrying on another instance", extra={"fields": fields})
                return
            if not was_exhausted:  # once per spell, not once per refused retry
                log.warning("retry budget exhausted: failures are answered, not retried",
                            extra={"fields": fields})  # fmt: skip
        raise self.failure from exc

    def connected(self) -> None:
        """The try's connection is made: a pass-through splice starts on it (call
        `closed` when it ends). The instance is healthy; its load lasts until `closed`."""
        endpoint = self.endpoint
        assert endpoint is not None
        self._proxy.book.succeeded(endpoint.instance_id)
        self._connect_seconds = time.perf_counter() - self._started

    def closed(self) -> None:
        """The splice begun by `connected` has ended."""
        endpoint, strategy = self.endpoint, self._strategy
        if endpoint is not None and strategy is not None:
            self._strategy = None  # exactly once
            strategy.finished(endpoint, self._connect_seconds, True)

    def abandoned(self) -> None:
        """The try ended without an outcome (the client left): released, not judged."""
        endpoint, strategy = self.endpoint, self._strategy
        if endpoint is not None and strategy is not None:
            strategy.finished(endpoint, time.perf_counter() - self._started, True)
