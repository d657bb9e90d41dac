"""What a pass-through splice (`webapi.passthrough`) and a tunnel (`webapi.tunnel`)
share: the upstream connection's protocol, the connect with retries, and the flow
control between the two connections."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Protocol, cast

from common.errors import quoted
from webapi.errors import ProxyLoop
from webapi.proxy.errors import UpstreamConnectError
from webapi.proxy.upstream import split_address

if TYPE_CHECKING:
    from webapi.proxy.attempts import Attempts
    from webapi.proxy.forward import Proxy


class Owner(Protocol):
    """What the splice needs of the client connection's protocol (`FastPathProtocol`)."""

    transport: asyncio.Transport | None

    def passthrough_ended(self, leftover: bytes, close: bool) -> None: ...

    def passthrough_head_too_large(self, held: bytes, limit: int) -> None: ...

    def touch(self) -> None: ...


class Splice(Protocol):
    """What the upstream connection reports to (`PassThrough`, `webapi.tunnel.Tunnel`)."""

    def from_upstream(self, data: bytes) -> None: ...

    def upstream_gone(self) -> None: ...

    def pause_client(self) -> None: ...

    def resume_client(self) -> None: ...


# What an instance may send before its splice has started (`UpstreamLeg.early`): beyond
# this, its connection stops being read until the splice takes it.
EARLY_LIMIT = 64 * 1024


class UpstreamLeg(asyncio.Protocol):
    """The upstream connection's protocol: everything goes to the splice.

    What the instance sends before the splice has started (between the connect and
    `started`: an instance that speaks first, an early error response and its close)
    is kept for it, up to `EARLY_LIMIT` bytes (then reading pauses), and so is its
    close: dropped, the client never got those bytes, and a splice to an instance
    that had closed meanwhile waited for an answer that could not come."""

    __slots__ = ("early", "early_end", "splice", "transport")

    def __init__(self) -> None:
        self.splice: Splice | None = None
        self.transport: asyncio.Transport | None = None
        self.early: bytearray | None = bytearray()  # None once the splice has started
        self.early_end = False  # the instance closed before the splice started

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        splice = self.splice
        if splice is not None:
            splice.from_upstream(data)
        elif self.early is not None:
            self.early += data
            if len(self.early) >= EARLY_LIMIT and self.transport is not None:
                self.transport.pause_reading()  # (`started` resumes it)

    def eof_received(self) -> bool:
        self._ended()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._ended()

    def _ended(self) -> None:
        if self.splice is not None:
            self.splice.upstream_gone()
        elif self.early is not None:
            self.early_end = True

    def started(self) -> None:
        """The splice has started (attached as `splice`, the client's first bytes given to
        it): hand it what the instance sent before, then the instance's close if it came."""
        early, self.early = self.early, None
        if early:
            if len(early) >= EARLY_LIMIT and self.transport is not None and not self.early_end:
                self.transport.resume_reading()  # (writing to the client may pause it again)
            if self.splice is not None:
                self.splice.from_upstream(bytes(early))
        if self.early_end and self.splice is not None:
            self.splice.upstream_gone()

    def pause_writing(self) -> None:
        if self.splice is not None:
            self.splice.pause_client()

    def resume_writing(self) -> None:
        if self.splice is not None:
            self.splice.resume_client()


class SpliceBase:
    """Ending a splice, its head deadline, and its flow control: a side whose socket
    buffer is full stops the other side being read. Subclasses set `owner`, `upstream`,
    `attempts` and `head_began`."""

    __slots__ = ()

    owner: Owner
    upstream: UpstreamLeg
    attempts: Attempts
    # When the request head not whole yet began (`time.monotonic`); 0: there is none.
    head_began: float

    def head_overdue(self, now: float, limit: float) -> bool:
        """Whether a request head not whole yet began more than `limit` seconds before
        `now` (a client trickling it: the timeouts that restart at every byte never
        end it)."""
        began = self.head_began
        return bool(began) and now - began > limit

    def close(self) -> None:
        """The client's connection is gone or timed out: close the upstream's too."""
        self._detach()

    def _detach(self) -> bool:
        """Close the upstream connection and end the instance's try; False when the
        splice was detached already."""
        upstream = self.upstream
        if upstream.splice is None:
            return False
        upstream.splice = None
        if upstream.transport is not None:
            upstream.transport.close()
        self.attempts.closed()
        return True

    def pause_client(self) -> None:
        client = self.owner.transport
        if client is not None:
            client.pause_reading()

    def pause_upstream(self) -> None:
        if self.upstream.transport is not None:
            self.upstream.transport.pause_reading()

    def resume_upstream(self) -> None:
        if self.upstream.transport is not None:
            self.upstream.transport.resume_reading()


async def connect(
    proxy: Proxy,
    service: str,
    method: str,
    client: asyncio.BaseTransport | None = None,
    *,
    bind_host: str = "",
) -> tuple[UpstreamLeg, Attempts]:
    """A connection to a healthy instance of `service`, and the `Attempts` it was
    chosen by (call its `closed()` when the splice ends). Connect failures eject
    their instance and are retried on another one, within the service's attempt
    limit and the retry budget (`webapi.proxy.attempts`); raises the proxy's errors
    (`NoHealthyInstance`, `UnknownService`, `UpstreamFailed`) when none is reached.

    A splice forwards no header, so no `Via` can tell a loop: an instance reached on
    the port `client` (the client's connection) arrived on, at the address it arrived
    on, or at any address of this host when the gateway listens on all of them
    (`bind_host` a wildcard), is this gateway. It is ejected and `ProxyLoop` (508)
    raised: each splice to it would connect again, one connection more each time."""
    loop = asyncio.get_running_loop()
    attempts = proxy.attempts(service, method, replayable=False)
    timeout = attempts.connect_timeout or proxy.pool.connect_timeout
    while True:
        endpoint = attempts.next()
        host, port = split_address(endpoint.address)
        try:
            async with asyncio.timeout(timeout):
                _, leg = await loop.create_connection(UpstreamLeg, host, port)
        except (OSError, TimeoutError) as exc:
            attempts.failed(UpstreamConnectError(f"{endpoint.address}: {exc or 'timed out'}"))
            continue  # (`failed` raised if no other try is allowed)
        except BaseException:  # cancelled: the try ends without an outcome
            attempts.abandoned()
            raise
        if client is not None and _leads_back(leg, client, bind_host):
            assert leg.transport is not None
            leg.transport.close()
            attempts.report_failure(fatal=True)
            raise ProxyLoop(f"instance {quoted(endpoint.instance_id)} of {quoted(service)} "
                            "is this gateway: a proxy loop")  # fmt: skip
        attempts.connected()
        return leg, attempts


def _leads_back(leg: UpstreamLeg, client: asyncio.BaseTransport, bind_host: str) -> bool:
    """Whether `leg` goes to the gateway itself: to the port `client` came in on, at the
    address it came in on, or at another address of this host (the source address a
    local connect takes) when the gateway listens on every address. (Bound to one
    address, another server of this host may listen on the same port elsewhere.)"""
    upstream = leg.transport
    if upstream is None:
        return False
    peer = upstream.get_extra_info("peername")
    ours = client.get_extra_info("sockname")
    if not (isinstance(peer, tuple) and isinstance(ours, tuple)) or peer[1] != ours[1]:
        return False  # (a unix socket, or another port)
    if peer[0] == ours[0]:
        return True
    source = upstream.get_extra_info("sockname")
    return bind_host in _WILDCARDS and isinstance(source, tuple) and peer[0] == source[0]


_WILDCARDS = frozenset({"", "0.0.0.0", "::"})
