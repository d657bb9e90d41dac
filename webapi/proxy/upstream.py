"""The gateway's upstream HTTP/1.1 client: a keep-alive connection pool per `host:port`.

    pool = UpstreamPool(connect_timeout=2.0, read_timeout=30.0)
    resp = await pool.request("10.0.0.5:8080", "GET", "/items?page=2", headers)
    async for chunk in resp.stream():
        ...
    await resp.aclose()

Built on `asyncio.Protocol` and httptools rather than a general client because the
proxy's cost per request is what limits the gateway (design §6: aiohttp's client
costs ~80 µs per request). Timeouts: `connect_timeout` bounds each connect;
`read_timeout` bounds every gap without progress (no byte received, no request body
byte accepted by the upstream, no body chunk taken by a consumer that made the
socket pause); the per-request `timeout` bounds the time to the response head,
connect included, and once the request is sent it alone bounds the wait for the
head (so it may be longer than `read_timeout`).

Retry rule. A request is retried once, transparently, on a new connection only when
all of these hold:
  * it went out on a *reused* idle connection,
  * that connection ended (EOF or reset) before a single response byte arrived,
  * the method is idempotent (GET, HEAD, OPTIONS, TRACE, PUT, DELETE),
  * the body can be sent again: none, or bytes (never an async iterator).
That is the race of a server closing an idle keep-alive connection as the request
is written. A non-idempotent request is not retried even with a bytes body: the
server may have read and applied it before the connection died (RFC 9112 §9.3.1),
so the caller gets `UpstreamProtocolError` and decides. To keep that race rare,
idle connections are dropped after `idle_timeout` (below common server keep-alive
timeouts) and the most recently used idle connection is taken first; a connection
the server closed while idle is noticed and dropped before it could be taken.
Connect failures are never retried here: `UpstreamConnectError` is for the caller,
which may try another instance.

Idle connections and entries are swept, not only checked when the next request to
their address comes (an instance that left gets none): one timer per pool, every
`idle_timeout / 2` (at most 1 s, at least 50 ms) while the pool has any entry,
closes the idle connections past `idle_timeout` and drops the entry of an address
with no connection open and none being made, its counts in `stats()` with it. A
connection to an instance that left is thus closed at most `idle_timeout` plus a
sweep interval after its last response, even when the instance never closes it.
Leaving the registry does not close an instance's connections sooner: the pool
knows addresses, not instances, and the sweep already bounds the wait.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any

from common.compiled import caused
from webapi.proxy.connection import Connection, StaleConnection
from webapi.proxy.deadlines import Deadlines
from webapi.proxy.errors import (
    UpstreamConnectError,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamTimeout,
)
from webapi.proxy.headers import NO_BODY, SIZED, RequestBody, build_request_head
from webapi.proxy.response import UpstreamResponse as UpstreamResponse

# The sweep of idle connections and empty entries runs every `idle_timeout / 2`,
# within these bounds (seconds).
SWEEP_MIN, SWEEP_MAX = 0.05, 1.0

IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})


def stale_retry_allowed(method: str, body: RequestBody) -> bool:
    """Whether a request whose reused connection went stale may be sent again on a new
    one (the retry rule above: an idempotent method, a body that can be sent again)."""
    return method in IDEMPOTENT_METHODS and (body is None or isinstance(body, bytes | bytearray))


class _Host:
    """The connections to one `host:port`: all open ones, and the idle ones (LIFO)."""

    __slots__ = (
        "address",
        "connecting",
        "connects",
        "conns",
        "host",
        "idle",
        "pool",
        "port",
        "retries",
        "reuses",
    )

    def __init__(self, pool: UpstreamPool, address: str) -> None:
        self.pool = pool
        self.address = address
        self.host, self.port = split_address(address)
        self.idle: deque[Connection] = deque()
        self.conns: set[Connection] = set()
        self.connecting = 0  # connects under way (their connection is not in `conns` yet)
        self.connects = 0
        self.reuses = 0
        self.retries = 0

    def take_idle(self, now: float) -> Connection | None:
        idle = self.idle
        limit = self.pool.idle_timeout
        if idle and now - idle[0].idle_since >= limit:
            idle.popleft().close()  # expire the oldest, one per request
        while idle:
            conn = idle.pop()
            if now - conn.idle_since < limit and conn.usable():
                conn.reused = True
                self.reuses += 1
                return conn
            conn.close()
        return None

    def release(self, conn: Connection) -> None:
        if self.pool.closed or len(self.idle) >= self.pool.max_idle_per_host:
            conn.close()
            return
        # The loop's clock without `asyncio.get_running_loop()` (a getpid() call: hot path);
        # `_loop` is set by the connect that made `conn`.
        assert self.pool._loop is not None
        conn.idle_since = self.pool._loop.time()
        self.idle.append(conn)

    def forget(self, conn: Connection) -> None:
        self.conns.discard(conn)
        if conn in self.idle:
            self.idle.remove(conn)


def split_address(address: str) -> tuple[str, int]:
    """The host and port of a registered `host:port` address; an IPv6 host loses its
    brackets (`[::1]:8080` -> `("::1", 8080)`), as a socket connect wants it."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"upstream address {address!r} is not host:port")
    return (host[1:-1] if host.startswith("[") and host.endswith("]") else host), int(port)


class UpstreamPool:
    """Keep-alive HTTP/1.1 connections to upstream servers, shared by all requests.

    One per process, opened at start-up and closed at shutdown (it lives on `app.ctx`).
    `max_idle_per_host` bounds the connections kept idle per address (there is no
    bound on those in use: the caller bounds concurrency). `max_body` bounds each
    response body (`UpstreamBodyTooLarge`); request bodies are the caller's to bound.
    """

    def __init__(
        self,
        *,
        connect_timeout: float = 2.0,
        read_timeout: float = 30.0,
        max_idle_per_host: int = 32,
        max_body: int | None = None,
        idle_timeout: float = 4.0,
    ) -> None:
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.max_idle_per_host = max_idle_per_host
        self.max_body = max_body
        self.idle_timeout = idle_timeout
        self.closed = False
        self._hosts: dict[str, _Host] = {}
        self._loop: asyncio.AbstractEventLoop | None = None  # set by the first connect
        self._deadlines: Deadlines | None = None  # the exchanges' timeouts (made in the loop)
        self._sweep_handle: asyncio.TimerHandle | None = None

    async def request(
        self,
        address: str,
        method: str,
        target: str,
        headers: list[tuple[str, str]] | bytes,
        body: RequestBody = None,
        timeout: float | None = None,
        connect_timeout: float | None = None,
        fresh: bool = False,
        total: float | None = None,
    ) -> UpstreamResponse:
        """Send a request to `address` ("host:port") and return once the response head
        has arrived; the body is then read from the response, which must be closed.

        `headers` are sent as given, plus `Host` if missing and the body framing
        (`Content-Length`, or `Transfer-Encoding: chunked` for an async iterator
        without a `Content-Length`). `headers` may also be the whole request head as
        bytes, framing included, for a `body` of bytes or None (the fast path builds
        it once per request, whichever instance it goes to). `timeout` bounds the wait
        for the head (it replaces the read timeout until the head arrives), `total`
        the whole exchange, connect and last body byte included (None: no bound),
        `connect_timeout` the connect (default: the pool's). `fresh`: this is the retry
        rule's second send, on a new connection, of a request whose reused connection
        went stale elsewhere (the fast path's callback exchange).
        Raises `UpstreamConnectError`, `UpstreamTimeout`, `UpstreamProtocolError`; an
        exception from the body iterator is raised as is.

        Hot path: one call per proxied request; it allocates the response, one future
        and one timer, and a connection only when no idle one is left.
        """
        if self.closed:
            raise UpstreamError("the upstream pool is closed")
        host = self._hosts.get(address)
        if host is None:
            host = self._add_host(address)
        if isinstance(headers, bytes):
            assert body is None or isinstance(body, bytes | bytearray)
            head, length = headers, len(body or b"")
            framing = SIZED if length else NO_BODY
        else:
            head, framing, length = build_request_head(method, target, headers, address, body)
        loop = asyncio.get_running_loop()
        now = loop.time()
        deadline = None if timeout is None else now + timeout
        end = None if total is None else now + total
        if end is not None and (deadline is None or end < deadline):
            deadline = end  # (the connect is bounded by it too)
        head_request = method == "HEAD"

        conn = None if fresh else host.take_idle(now)
        if conn is not None:
            try:
                return await conn.exchange(head, body, framing, length, head_request, deadline, end)
            except StaleConnection as exc:
                if not stale_retry_allowed(method, body):
                    raise caused(UpstreamProtocolError(str(exc)), exc)  # noqa: B904 (as `from`)
                fresh = True
        conn = await self._connect(
            address, loop, deadline, connect_timeout or self.connect_timeout, fresh
        )
        return await conn.exchange(head, body, framing, length, head_request, deadline, end)

    def idle_connection(self, address: str) -> Connection | None:
        """An idle keep-alive connection to `address`, taken out of the pool, or None
        (then `request()` connects). For `Connection.send`; hot path, no I/O."""
        host = self._hosts.get(address)
        if host is None or self._loop is None or self.closed:
            return None
        return host.take_idle(self._loop.time())

    def _add_host(self, address: str) -> _Host:
        host = self._hosts[address] = _Host(self, address)
        if self._sweep_handle is None and not self.closed:
            self._sweep_handle = asyncio.get_running_loop().call_later(
                self._sweep_interval(), self._sweep
            )
        return host

    def _sweep_interval(self) -> float:
        return min(max(self.idle_timeout / 2, SWEEP_MIN), SWEEP_MAX)

    def _sweep(self) -> None:
        """Close the idle connections past `idle_timeout`; drop the entries of addresses
        with no connection open or being made (the module docstring)."""
        self._sweep_handle = None
        if self.closed:
            return
        loop = asyncio.get_running_loop()
        expired = loop.time() - self.idle_timeout
        for address, host in list(self._hosts.items()):
            idle = host.idle
            # Oldest first (`release` appends). Taken out of `idle` before the close, so
            # no request can take it; the close frees the socket right away (nothing is
            # left to write on an idle connection) and `forget` empties `conns` when
            # the loss is reported, for the next sweep to drop the entry.
            while idle and idle[0].idle_since <= expired:
                idle.popleft().close()
            if not host.conns and not host.connecting:
                del self._hosts[address]
        if self._hosts:
            self._sweep_handle = loop.call_later(self._sweep_interval(), self._sweep)

    async def _connect(
        self,
        address: str,
        loop: asyncio.AbstractEventLoop,
        deadline: float | None,
        connect_timeout: float,
        retry: bool,
    ) -> Connection:
        # Looked up here, not passed in: while the request awaited a stale connection's
        # end, the sweep may have dropped the entry that connection emptied.
        host = self._hosts.get(address)
        if host is None:
            host = self._add_host(address)
        if retry:
            host.retries += 1
        timeout, total_bound = connect_timeout, False
        if deadline is not None and deadline - loop.time() < timeout:
            timeout, total_bound = deadline - loop.time(), True
        if self._deadlines is None:
            self._loop = loop
            self._deadlines = Deadlines(loop)
        conn = Connection(host, loop, self.read_timeout, self.max_body, self._deadlines)
        host.connecting += 1  # keeps the entry from the sweep until `conns` holds `conn`
        try:
            async with asyncio.timeout(timeout):
                await loop.create_connection(lambda: conn, host.host, host.port)
        # (`caused`: `raise ... from exc`, which mypyc compiles without its `from`.)
        except TimeoutError as exc:
            if total_bound:
                late = UpstreamTimeout(f"no response head from {host.address} in time")
                raise caused(late, exc)  # noqa: B904
            slow = UpstreamConnectError(f"connect to {host.address} timed out after {timeout:g} s")
            raise caused(slow, exc)  # noqa: B904
        except OSError as exc:
            refused = UpstreamConnectError(f"cannot connect to {host.address}: {exc}")
            raise caused(refused, exc)  # noqa: B904
        finally:
            host.connecting -= 1
        if self.closed:
            conn.close()
            raise UpstreamError("the upstream pool is closed")
        host.conns.add(conn)
        host.connects += 1
        return conn

    def stats(self) -> dict[str, dict[str, int]]:
        """Per address: connections `open`, `idle` and `active`, and the counts of
        `connects`, `reuses` (requests on an idle connection) and stale `retries`.
        An address is listed while the pool has an entry for it (the module docstring:
        the sweep drops an entry with no connection left, and its counts)."""
        return {
            address: {
                "open": len(host.conns),
                "idle": len(host.idle),
                "active": len(host.conns) - len(host.idle),
                "connects": host.connects,
                "reuses": host.reuses,
                "retries": host.retries,
            }
            for address, host in self._hosts.items()
        }

    async def close(self) -> None:
        """Close every connection; requests still in progress fail with `UpstreamError`."""
        self.closed = True
        if self._sweep_handle is not None:
            self._sweep_handle.cancel()
            self._sweep_handle = None
        conns = [conn for host in self._hosts.values() for conn in host.conns]
        for host in self._hosts.values():
            host.idle.clear()
        for conn in conns:
            conn.close()
        if conns:
            await asyncio.wait([asyncio.ensure_future(c.wait_closed()) for c in conns], timeout=5)
        if self._deadlines is not None:
            self._deadlines.close()

    async def __aenter__(self) -> UpstreamPool:
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.close()


__all__ = ["IDEMPOTENT_METHODS", "UpstreamPool"]
