"""Upstream WebSocket connections: which instance, and connecting with failover.

Instances come from the local `RegistryView` (no Redis on the connect path):
those of kind "ws" and "http" (the original dispatcher registered its
WebSocket backends with the same heartbeat as HTTP ones). Ejected instances
(`HealthBook`) are left out; the live policy's version weights choose a
version when the client names none, and the service's balancing strategy
(round_robin unless the policy names another) picks one instance of it
(`BalancingPolicy`, shared with the gateway). A connect failure ejects the
instance and the next attempt goes to another instance, up to `max_attempts`
(the policy's `retries` + 1 when it sets them), before the caller sees
`NoUpstream`; each connect is bounded by the policy's `connect_timeout`, else
the service's setting. Each failover also needs the service's retry budget
(`RetryBudget`, as the gateway's proxy: each connection adds a fifth of a retry by
default), so a dead pool is not hammered with `max_attempts` connects per client.
An instance that answers the upgrade with a 4xx (a path it does not serve, an `Origin`
or a cookie of the client's it refuses: `websocket.handshake` passes them on) has
refused the client, not failed: it is not ejected, nothing is retried, and the caller
gets `UpstreamRefused`, with the instance's answer (its fields and body, for the relay
to pass on: `websocket.refusals`), as the gateway's proxy answers a 4xx and retries
nothing. A redirect (3xx) is the same: passed on to the client, never followed
(`NoRedirects`).
Any other answer but 101 is a connect failure.
These steps are the gateway's too (`common.balancing.tries.Tries`). For
`least_conn` the strategy counts a relayed connection from its connect until it ends.

What `least_time` learns is the connect time once connected, then the caller's choice
(`finished`'s `seconds`): a relayed connection reports its connect time (its lifetime
says nothing of the instance's speed: a client may hold it for an hour), as the
gateway's pass-through splice does and nginx's `stream` module measures `least_time
connect`; an envelope stream, one request per connection, reports the time to its
last frame.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import NamedTuple

from sanic.exceptions import SanicException
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidHandshake, InvalidStatus, InvalidURI
from websockets.typing import Subprotocol

from common.balancing import Endpoint, HealthBook
from common.balancing.policy import BalancingPolicy
from common.balancing.tries import Tries
from common.errors import shortened
from common.instance_record import InstanceRecord
from common.log import get_logger
from common.policy import PolicyWatcher, RetryBudgetPolicy
from common.registry_view import RegistryView
from websocket.tap import TapClientConnection

log = get_logger("websocket.upstreams")


class NoRedirects(connect):
    """`websockets`' `connect`, minus following an instance's redirects: a proxy answers
    with what the instance it chose answered (nginx does not follow them either), and
    a followed redirect would take the client's fields (Cookie, Authorization: dropped
    by `websockets` only across origins) to whatever address a backend names."""

    def process_redirect(self, exc: Exception) -> Exception | str:
        return exc


KINDS = ("ws", "http")


class NoUpstream(Exception):
    """No instance of the service could be connected to (an unknown service is refused
    before: `websocket.relay.admit_relay`)."""


class UpstreamRefused(SanicException):
    """The instance answered the upgrade with a 3xx or 4xx (`status_code`): the client's
    request is refused (a path the backend does not serve, an `Origin` or a cookie it
    refuses), which is no failure of the instance (module docstring). `fields` are its
    answer's field lines as `websockets` read them (values ISO-8859-1), `body` its body
    (read by `websockets`, at most its `WEBSOCKETS_MAX_BODY_SIZE`, 1 MiB). Raised before a
    relay's upgrade (`websocket.relay.connect_first`), it refuses the client's with the
    instance's answer (`websocket.refusals.refused_answer`); on `/ws/stream` it is
    "model unavailable". (Not `headers`: a `SanicException`'s are fields Sanic adds to
    its answer.)"""

    code = "upstream_refused"

    def __init__(
        self,
        message: str,
        status: int,
        fields: Iterable[tuple[str, str]] = (),
        body: bytes = b"",
    ) -> None:
        super().__init__(message, status_code=status)
        self.fields = list(fields)
        self.body = body


class Connected(NamedTuple):
    """An open upstream connection, the instance it goes to and how long the connect took."""

    connection: ClientConnection
    endpoint: Endpoint
    connect_seconds: float


class Upstreams:
    """Balancing and failover for WebSocket upstreams, shared by every connection."""

    def __init__(
        self,
        view: RegistryView,
        watcher: PolicyWatcher,
        *,
        connect_timeout: float,
        max_size: int,
        max_attempts: int = 3,
        retry_budget: RetryBudgetPolicy | None = None,
    ) -> None:
        self.view = view
        self.book = HealthBook()
        self.connect_timeout = connect_timeout  # defaults, unless the policy sets the service's own
        self.max_size = max_size
        self.max_attempts = max_attempts
        self.policy = BalancingPolicy(watcher, retry_budget=retry_budget)
        self.policy.follow(view, self.book)

    def records(self, service: str, version: str | None = None) -> list[InstanceRecord]:
        """Live ws/http instances of `service` (of one version if given). No I/O."""
        return [
            r
            for r in self.view.instances(service)
            if r.kind in KINDS and r.address and (version is None or r.version == version)
        ]

    async def connect(
        self,
        service: str,
        path: str,
        *,
        version: str | None = None,
        key: str | None = None,
        headers: Sequence[tuple[str, str]] = (),
        subprotocols: Sequence[str] = (),
        splice: bool = False,
    ) -> Connected:
        """An open connection to `ws://<instance><path>`, failing over on connect errors.

        `key` is the sticky key (`common.balancing.sticky`) of the `hash` strategy;
        `headers` are the handshake's fields besides the library's own (no `User-Agent`
        of its own: the client's passes, or none), `subprotocols` those offered (the
        connection's `subprotocol` is the one the instance chose). With `splice`, a
        `TapClientConnection` that `websocket.splice` can take over. The caller reports
        the end of the connection with `finished`. Raises `NoUpstream`, or
        `UpstreamRefused` for an instance that answered with a 3xx or 4xx.
        """
        tries = Tries(self.policy, self.book, service, version=version, key=key,
                      max_attempts=self.max_attempts)  # fmt: skip
        settings = tries.settings
        connect_timeout = self.connect_timeout
        if settings is not None and settings.connect_timeout:
            connect_timeout = settings.connect_timeout
        last_error = "no live instance"
        while True:
            usable = self.book.usable(service, self.records(service, version))
            candidates = tries.untried(self.policy.endpoints(service, usable))
            if not candidates:
                break
            if tries.attempt and not tries.spend_retry(error=last_error):
                if tries.attempt < tries.max_attempts:
                    last_error = f"retry budget exhausted after {last_error}"
                break
            endpoint = tries.choose(candidates)
            try:
                upstream = await NoRedirects(
                    f"ws://{endpoint.address}{path}",
                    open_timeout=connect_timeout,
                    max_size=self.max_size,
                    compression=None,
                    ping_interval=None,  # the client side of the relay keeps the liveness checks
                    additional_headers=list(headers),
                    user_agent_header=None,
                    subprotocols=[Subprotocol(p) for p in subprotocols] or None,
                    create_connection=TapClientConnection if splice else None,
                )
            except (OSError, TimeoutError, InvalidHandshake, InvalidURI) as exc:
                if isinstance(exc, InvalidStatus) and 300 <= exc.response.status_code < 500:
                    # The instance is up and answered: the client is refused, not retried
                    # (a redirect too: `NoRedirects`).
                    tries.connected()
                    tries.closed()
                    answer = exc.response
                    status = answer.status_code
                    raise UpstreamRefused(
                        f"{shortened(service)} refused the upgrade: HTTP {status}",
                        status,
                        answer.headers.raw_items(),
                        bytes(answer.body),
                    ) from None
                last_error = f"{type(exc).__name__}: {exc}"
                tries.report_failure(fatal=True)
                log.info("upstream connect failed", extra={"fields": {
                    "instance": endpoint.instance_id, "error": last_error}})  # fmt: skip
                continue
            except BaseException:  # cancelled: the client left
                tries.abandoned()
                raise
            return Connected(upstream, endpoint, tries.connected())
        if not tries.attempt and self.view.is_rpc_service(service):
            # Its instances are RPC workers, live or not: "no live instance" would mislead.
            last_error = "an RPC service: call it with JSON-RPC on /ws"
        raise NoUpstream(f"{shortened(service)}: {last_error}")

    def finished(self, service: str, endpoint: Endpoint, seconds: float, ok: bool) -> None:
        """A connection from `connect` has ended; `seconds` is what `least_time` learns
        of the instance (module docstring), `ok` whether it ended cleanly."""
        self.policy.strategy(service).closed(endpoint, seconds, ok)
