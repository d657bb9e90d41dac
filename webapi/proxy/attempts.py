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
  counts toward the instance's failure streak. That holds for the wait for the
  head, a silence, and the service's total timeout, which counts from the first try;
* every retry also needs the service's retry budget (`RetryBudget`: each
  request adds a fifth of a retry by default) and its attempt limit (`retries`
  in the live policy, else the gateway's default).

The steps that are not HTTP's (choosing among the untried instances, telling the
health book and the strategy, the attempt limit and the budget) are
`common.balancing.tries.Tries`, which the websocket relay's connect uses too.
Each try is reported to the health book and the strategy exactly once, by
`answered` or `failed`. A pass-through splice (`webapi.passthrough`) is one long
try: `connected` tells the health book, and `closed`, when the splice ends, tells
the strategy (so least-connections counts open splices, as nginx's `stream` does,
and least-time learns the connect time, not the connection's lifetime).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from common.balancing import Endpoint
from common.balancing.tries import Tries
from common.compiled import caused
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


def client_error(service: str, exc: UpstreamError) -> ApiError:
    """What the client is answered for a failed exchange with `service`: 504 for a
    timeout (`UpstreamTimedOut`), 502 for anything else (`UpstreamFailed`)."""
    if isinstance(exc, UpstreamTimeout):
        return UpstreamTimedOut(f"{service} did not answer in time", service=service)
    return UpstreamFailed(f"{service}: {exc.message or type(exc).__name__}", service=service)


class Attempts(Tries):
    """The tries of one request: `next()` picks an instance, `answered()` or `failed()`
    reports how the try ended. Hot path: one per proxied request."""

    __slots__ = ("_began", "_proxy", "connect_timeout", "failure", "kind", "method",
                 "replayable", "timeout", "total_timeout")  # fmt: skip

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
        super().__init__(proxy.policy, proxy.book, service, version=version, key=key,
                         max_attempts=proxy.max_attempts)  # fmt: skip
        self._proxy = proxy
        self.method, self.kind, self.replayable = method, kind, replayable
        settings = self.settings
        if timeout is None:
            timeout = settings.timeout if settings and settings.timeout else proxy.timeout
        self.timeout: float = timeout  # the wait for the response head
        total = settings.total_timeout if settings and settings.total_timeout else None
        self.total_timeout = total or proxy.total_timeout  # the whole exchange's bound
        self._began = time.perf_counter() if self.total_timeout is not None else 0.0
        self.connect_timeout = settings.connect_timeout if settings else None
        self.failure: ApiError | None = None  # the last try's error, while retrying

    def remaining(self) -> float | None:
        """Seconds left of the request's total timeout (None: it has none)."""
        total = self.total_timeout
        return None if total is None else total - (time.perf_counter() - self._began)

    def next(self) -> Endpoint:
        """Choose the instance of the next try and mark it started. Raises `ApiError`:
        `UnknownService` or `NoHealthyInstance`, or the last try's failure when no
        instance is left."""
        try:
            candidates = self._proxy.candidates(self.service, self.version, self.kind)
        except (UnknownService, NoHealthyInstance):
            if self.failure is not None:
                # The failure itself, not "nobody left" (`caused`: as `from None`).
                raise caused(self.failure, None)  # noqa: B904
            raise
        if self.tried:
            fresh = self.untried(candidates)
            if not fresh:
                if self.failure is not None:
                    raise self.failure
                fresh = candidates
            candidates = fresh
        return self.choose(candidates)

    def answered(self, status: int) -> float:
        """The try got a response head with `status`; the seconds it took."""
        elapsed = self.elapsed()
        endpoint, strategy = self.endpoint, self._strategy
        assert endpoint is not None and strategy is not None
        ok = status < 500
        strategy.finished(endpoint, elapsed, ok)
        if ok:
            self.book.succeeded(self.service, endpoint.instance_id)
        else:
            self.book.failed(self.service, endpoint.instance_id, fatal=False, elapsed=elapsed)
        return elapsed

    def failed(self, exc: UpstreamError) -> None:
        """The try failed before a response head. Returns when another try is allowed
        (then call `next()`); raises the error to answer (`UpstreamFailed`,
        `UpstreamTimedOut`) otherwise."""
        endpoint = self.endpoint
        assert endpoint is not None
        connect_failed = isinstance(exc, UpstreamConnectError)
        timed_out = isinstance(exc, UpstreamTimeout)
        self.report_failure(fatal=connect_failed)
        self.failure = client_error(self.service, exc)
        safe = connect_failed or (
            not timed_out and self.method in IDEMPOTENT_METHODS and self.replayable
        )
        if safe and self.spend_retry(instance=endpoint.instance_id, error=str(exc)):
            return
        raise caused(self.failure, exc)
