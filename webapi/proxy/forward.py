"""Forwarding one request to one healthy instance: the reverse proxy's core.

For each request: the live instances of the service come from the local
registry view (no Redis on the hot path), are narrowed to the requested
version (`X-Service-Version`) and to healthy ones (`HealthBook`), and the
service's balancing strategy picks one (after the live policy's version weights
chose a version, when the request names none: `BalancingPolicy.for_request`).
Failures are reported to the health book and the strategy. A connect failure
(nothing was sent) ejects the instance and is retried on another one; a broken
connection is retried only for idempotent methods whose body was not streamed;
both only while the retry budget allows. A timeout is not retried (slow is not dead: our users run
models that take seconds, and a retry would double the load on a slow pool):
it answers 504 and counts toward the instance's failure streak.

Per service, the live policy (`services.<name>` of the policy document) may set
`timeout` (the wait for the response head, shorter or longer than
PROXY_TIMEOUT, which then still bounds each gap in the bodies),
`connect_timeout` and `retries` (attempts after the first); without them the
gateway's settings apply. A request reads them once, when it starts, so a
policy change never alters a request in flight.

Errors: 404 unknown service, 503 no healthy instance, 502 upstream failed,
504 upstream timeout (all JSON, via `webapi.errors`).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

from common.balancing import Endpoint, select_version
from common.balancing.policy import BalancingPolicy
from common.log import get_logger
from common.policy import PolicyWatcher
from common.registry_view import RegistryView
from webapi.errors import (
    ApiError,
    NoHealthyInstance,
    UnknownService,
    UpstreamFailed,
    UpstreamTimedOut,
)
from webapi.proxy.budget import RetryBudget
from webapi.proxy.errors import UpstreamConnectError, UpstreamError, UpstreamTimeout
from webapi.proxy.health import HealthBook
from webapi.proxy.upstream import UpstreamPool, UpstreamResponse, strip_hop_by_hop

log = get_logger("webapi.proxy")

IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})


@dataclass(slots=True)
class Forwarded:
    """An upstream response on its way back, with what the headers report."""

    response: UpstreamResponse
    instance: Endpoint
    upstream_seconds: float
    attempts: int


class Proxy:
    """Everything the proxy routes share in one gateway process."""

    def __init__(
        self,
        view: RegistryView,
        pool: UpstreamPool,
        watcher: PolicyWatcher,
        *,
        book: HealthBook | None = None,
        max_attempts: int = 3,
        timeout: float = 30.0,
        least_time_decay: float = 10.0,
    ) -> None:
        self.view, self.pool = view, pool
        self.book = book or HealthBook()
        self.budget = RetryBudget()
        self.max_attempts = max_attempts  # defaults, unless the policy sets the service's own
        self.timeout = timeout
        self.policy = BalancingPolicy(watcher, options={"least_time": {"decay": least_time_decay}})
        view.on_change(self.policy.forget_endpoints)

    def candidates(self, service: str, version: str | None, kind: str = "http") -> list[Endpoint]:
        """Healthy endpoints of `service` (and `version`). Hot path: no I/O."""
        records = self.view.instances(service, kind=kind)
        if not records:
            if service not in self.view.services():
                raise UnknownService(f"no service named {service!r} is registered")
            raise NoHealthyInstance(f"no live instance of {service!r}")
        usable = self.book.usable(records)
        endpoints = select_version([self.policy.endpoint(r) for r in usable], version)
        if not endpoints:
            raise NoHealthyInstance(f"no healthy instance of {service!r}" + (
                f" at version {version!r}" if version else ""))  # fmt: skip
        return endpoints

    async def forward(
        self,
        service: str,
        method: str,
        target: str,
        headers: list[tuple[str, str]],
        body: bytes | AsyncIterator[bytes] | None,
        *,
        version: str | None = None,
        key: str | None = None,
        timeout: float | None = None,
        kind: str = "http",
    ) -> Forwarded:
        """Send the request to a chosen instance, retrying where it is safe.

        `timeout` overrides the policy's and the default wait for the response head.
        """
        settings = self.policy.service_policy(service)
        if timeout is None:
            timeout = settings.timeout if settings and settings.timeout else self.timeout
        connect_timeout = settings.connect_timeout if settings else None
        max_attempts = self.max_attempts
        if settings is not None and settings.retries is not None:
            max_attempts = settings.retries + 1
        self.budget.deposit()
        replayable = body is None or isinstance(body, bytes)
        tried: set[str] = set()
        failure: ApiError | None = None  # the last attempt's error, if we are retrying
        attempt = 0
        while True:
            attempt += 1
            try:
                candidates = self.candidates(service, version, kind)
            except (UnknownService, NoHealthyInstance):
                if failure is not None:
                    raise failure from None  # the failure itself, not "nobody left"
                raise
            fresh = [c for c in candidates if c.instance_id not in tried]
            if not fresh:
                if failure is not None:
                    raise failure
                fresh = candidates
            strategy = self.policy.strategy(service)
            endpoint: Endpoint = strategy.pick(
                self.policy.for_request(service, fresh, version, key), key
            )
            tried.add(endpoint.instance_id)
            self.book.started(endpoint.instance_id)
            strategy.started(endpoint)
            started = time.perf_counter()
            try:
                response = await self.pool.request(
                    endpoint.address,
                    method,
                    target,
                    headers,
                    body,
                    timeout=timeout,
                    connect_timeout=connect_timeout,
                )
            except UpstreamError as exc:
                elapsed = time.perf_counter() - started
                strategy.finished(endpoint, elapsed, False)
                connect_failed = isinstance(exc, UpstreamConnectError)
                self.book.failed(endpoint.instance_id, fatal=connect_failed)
                safe = connect_failed or (
                    not isinstance(exc, UpstreamTimeout) and method in IDEMPOTENT and replayable
                )
                if isinstance(exc, UpstreamTimeout):
                    failure = UpstreamTimedOut(f"{service} did not answer in time")
                else:
                    failure = UpstreamFailed(f"{service}: {exc.message or type(exc).__name__}")
                if safe and attempt < max_attempts and self.budget.try_spend():
                    log.info(
                        "retrying on another instance",
                        extra={"fields": {"instance": endpoint.instance_id, "error": str(exc)}},
                    )
                    continue
                raise failure from exc
            elapsed = time.perf_counter() - started
            ok = response.status < 500
            strategy.finished(endpoint, elapsed, ok)
            if ok:
                self.book.succeeded(endpoint.instance_id)
            else:
                self.book.failed(endpoint.instance_id, fatal=False)
            return Forwarded(response, endpoint, elapsed, attempt)


def latency_headers(forwarded: Forwarded, received: float) -> list[tuple[str, str]]:
    """`X-Upstream-Latency`, `X-Gateway-Latency` (ms) and `X-Upstream-Instance` of a
    response; `received` is when the request arrived (`time.perf_counter()`)."""
    total = time.perf_counter() - received
    return [
        ("X-Upstream-Latency", f"{forwarded.upstream_seconds * 1000:.3f}"),
        ("X-Gateway-Latency", f"{max(total - forwarded.upstream_seconds, 0) * 1000:.3f}"),
        ("X-Upstream-Instance", forwarded.instance.instance_id),
    ]


def hop_headers_out(
    headers: Sequence[tuple[str, str]],
    *,
    client_ip: str,
    scheme: str,
    host: str,
    request_id: str,
    upstream: str,
) -> list[tuple[str, str]]:
    """The headers sent upstream: hop-by-hop stripped, X-Forwarded-* and X-Request-Id set."""
    drop = {"host", "x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "x-request-id",
            "content-length", "transfer-encoding"}  # fmt: skip
    prior = [v for k, v in headers if k.lower() == "x-forwarded-for"]
    out = [(k, v) for k, v in strip_hop_by_hop(list(headers)) if k.lower() not in drop]
    forwarded_for = ", ".join([*prior, client_ip]) if prior else client_ip
    out += [
        ("Host", upstream),
        ("X-Forwarded-For", forwarded_for),
        ("X-Forwarded-Proto", scheme),
        ("X-Forwarded-Host", host),
        ("X-Request-Id", request_id),
    ]
    return out
