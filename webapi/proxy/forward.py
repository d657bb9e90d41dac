"""Forwarding one request to one healthy instance: the reverse proxy's core.

For each request: the live instances of the service come from the local
registry view (no Redis on the hot path), are narrowed to the requested
version (`X-Service-Version`) and to healthy ones (`HealthBook`), and the
service's balancing strategy picks one (after the live policy's version weights
chose a version, when the request names none: `BalancingPolicy.for_request`).
Each try is reported to the health book and the strategy, and a failed one is
retried on another instance where that is safe: the rule is `webapi.proxy.attempts`.

Per service, the live policy (`services.<name>` of the policy document) may set
`timeout` (the wait for the response head, shorter or longer than
PROXY_TIMEOUT, which then still bounds each gap in the bodies), `total_timeout`
(the whole exchange, from the first try to the response's last byte: past it, a
request still waiting for its head gets 504 and a response being streamed is cut,
its client connection closed; PROXY_TOTAL_TIMEOUT, no bound by default),
`connect_timeout`, `retries` (attempts after the first), `retry_budget` and
`max_body` (the routes refuse a larger request body with 413); without them the
gateway's settings apply. A request reads them once, when it starts, so a
policy change never alters a request in flight.

Errors: 404 unknown service (`rpc_service` for a service RPC workers serve: call it
at `POST /rpc/<service>/<method>`), 503 no healthy instance, 502 upstream failed,
504 upstream timeout (all JSON, via `webapi.errors`).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from common.balancing import Endpoint, select_version
from common.balancing.policy import BalancingPolicy
from common.errors import quoted, shortened
from common.policy import PolicyWatcher, RetryBudgetPolicy
from common.registry_view import RegistryView
from webapi.errors import NoHealthyInstance, NotAnHttpService, UnknownService
from webapi.proxy.attempts import Attempts
from webapi.proxy.errors import UpstreamError
from webapi.proxy.health import HealthBook
from webapi.proxy.upstream import UpstreamPool, UpstreamResponse


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
        retry_budget: RetryBudgetPolicy | None = None,
        max_body: int = 1024**3,
        total_timeout: float | None = None,
    ) -> None:
        self.view, self.pool = view, pool
        self.default_max_body = max_body
        self.book = book or HealthBook()
        self.max_attempts = max_attempts  # defaults, unless the policy sets the service's own
        self.timeout = timeout
        self.total_timeout = total_timeout
        self.policy = BalancingPolicy(
            watcher,
            options={"least_time": {"decay": least_time_decay}},
            retry_budget=retry_budget,
        )
        self.policy.follow(view, self.book)

    def candidates(self, service: str, version: str | None, kind: str = "http") -> list[Endpoint]:
        """Healthy endpoints of `service` (and `version`). Hot path: no I/O."""
        records = self.view.instances(service, kind=kind)
        if not records:
            if self.view.is_rpc_service(service):
                raise NotAnHttpService(
                    f"{quoted(service)} is an RPC service, not an HTTP one: call "
                    f"POST /rpc/{shortened(service)}/<method>"
                )
            if not self.view.registered(service):
                raise UnknownService(f"no service named {quoted(service)} is registered")
            raise NoHealthyInstance(f"no live instance of {quoted(service)}", service=service)
        usable = self.book.usable(service, records)
        endpoints = self.policy.endpoints(service, usable)  # (a new list: no copy needed)
        if version is not None:
            endpoints = select_version(endpoints, version)
        if not endpoints:
            raise NoHealthyInstance(f"no healthy instance of {quoted(service)}" + (
                f" at version {quoted(version)}" if version else ""), service=service)  # fmt: skip
        return endpoints

    def max_body(self, service: str) -> int:
        """The largest request body forwarded to `service` (bytes): its live policy's
        `max_body`, else the gateway's PROXY_MAX_BODY."""
        settings = self.policy.service_policy(service)
        if settings is not None and settings.max_body is not None:
            return settings.max_body
        return self.default_max_body

    def attempts(
        self,
        service: str,
        method: str,
        *,
        version: str | None = None,
        key: str | None = None,
        replayable: bool = True,
        timeout: float | None = None,
        kind: str = "http",
    ) -> Attempts:
        """The tries of one request to `service` (see `webapi.proxy.attempts`)."""
        return Attempts(self, service, method, version=version, key=key,
                        replayable=replayable, timeout=timeout, kind=kind)  # fmt: skip

    async def forward(
        self,
        service: str,
        method: str,
        target: str,
        headers: list[tuple[str, str]] | bytes,
        body: bytes | AsyncIterator[bytes] | None,
        *,
        version: str | None = None,
        key: str | None = None,
        timeout: float | None = None,
        kind: str = "http",
        attempts: Attempts | None = None,
        first: Endpoint | None = None,
        stale_first: bool = False,
    ) -> Forwarded:
        """Send the request to a chosen instance, retrying where it is safe.

        `headers` may be the whole request head as bytes (`UpstreamPool.request`).
        `timeout` overrides the policy's and the default wait for the response head.
        `attempts` continues a request whose earlier tries were made elsewhere (the
        fast path's callback exchange), with `first` as this try's instance when it is
        already chosen (else `attempts` chooses the next), and `stale_first` when
        `first`'s reused connection went stale: the pool's retry rule, applied there
        (`UpstreamPool.request`'s `fresh`).
        """
        if attempts is None:
            replayable = body is None or isinstance(body, bytes)
            attempts = self.attempts(service, method, version=version, key=key,
                                     replayable=replayable, timeout=timeout, kind=kind)  # fmt: skip
            endpoint = attempts.next()
        else:
            endpoint = first or attempts.next()
        fresh = stale_first  # (only `first`'s try: a retry elsewhere may reuse a connection)
        while True:
            try:
                response = await self.pool.request(
                    endpoint.address,
                    method,
                    target,
                    headers,
                    body,
                    timeout=attempts.timeout,
                    connect_timeout=attempts.connect_timeout,
                    fresh=fresh,
                    total=attempts.remaining(),
                )
            except UpstreamError as exc:
                attempts.failed(exc)  # raises unless another try is allowed
                endpoint, fresh = attempts.next(), False
                continue
            except BaseException:
                attempts.abandoned()  # cancelled: the client left
                raise
            elapsed = attempts.answered(response.status)
            return Forwarded(response, endpoint, elapsed, attempts.attempt)


def latency_headers(forwarded: Forwarded, received: float) -> list[tuple[str, str]]:
    """`X-Upstream-Latency`, `X-Gateway-Latency` (ms) and `X-Upstream-Instance` of a
    response; `received` is when the request arrived (`time.perf_counter()`)."""
    upstream_ms, gateway_ms = latencies_ms(
        forwarded.upstream_seconds, received, time.perf_counter()
    )
    return [
        ("X-Upstream-Latency", f"{upstream_ms:.3f}"),
        ("X-Gateway-Latency", f"{gateway_ms:.3f}"),
        ("X-Upstream-Instance", forwarded.instance.instance_id),
    ]


def latencies_ms(upstream_seconds: float, received: float, now: float) -> tuple[float, float]:
    """The upstream's and the gateway's share (ms) of a request that arrived at
    `received` and waited `upstream_seconds` upstream, at `now` (`time.perf_counter()`
    both: the caller reads the clock, so a test can fix it in the caller's module)."""
    total = now - received
    return upstream_seconds * 1000, max(total - upstream_seconds, 0.0) * 1000
