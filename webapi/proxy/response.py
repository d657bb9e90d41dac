"""The response of an upstream request: status and head at once, the body as it arrives."""

from __future__ import annotations

import asyncio
from collections import deque
from types import TracebackType
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from webapi.proxy.connection import Connection

# Flow control of a response body: the socket stops being read when this many
# bytes wait for the consumer, and is read again once it has taken all but LOW_WATER.
HIGH_WATER = 256 * 1024
LOW_WATER = 64 * 1024


class Receiver(Protocol):
    """What a `Connection` reports one exchange's response to: `UpstreamResponse` (the
    caller awaits the head, then reads the body), or a receiver that acts in the
    connection's callbacks (`Connection.send`: the fast path's `DirectExchange`).

    The connection sets `status`, `reason` and `raw_headers` when the head arrives,
    then calls `_head()` (`send` only), `_feed()` per body chunk (its result is the
    bytes still waiting for the consumer: over `HIGH_WATER` pauses the socket),
    `_flush()` after each read that did not end the response (`send` only), and
    exactly one of `_complete()` or `_fail()`.
    """

    status: int
    reason: str
    raw_headers: list[tuple[bytes, bytes]]

    def _head(self) -> None: ...

    def _feed(self, data: bytes) -> int: ...

    def _flush(self) -> None: ...

    def _complete(self) -> None: ...

    def _fail(self, exc: BaseException) -> None: ...


class UpstreamResponse:
    """Status and headers of an upstream response; the body is read with `stream()` or
    `read()`, and `aclose()` releases the connection (also `async with response:`).

    The connection goes back to the pool as soon as the whole response has arrived
    and keep-alive holds, even before the buffered body is consumed; `aclose()` on a
    response still arriving closes its connection instead.
    """

    __slots__ = (
        "_buffered",
        "_chunks",
        "_closed",
        "_conn",
        "_done",
        "_error",
        "_headers",
        "_waiter",
        "raw_headers",
        "reason",
        "status",
    )

    def __init__(self, conn: Connection) -> None:
        self.status = 0
        self.reason = ""
        self.raw_headers: list[tuple[bytes, bytes]] = []
        self._headers: list[tuple[str, str]] | None = None
        self._conn: Connection | None = conn
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._done = False
        self._closed = False
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None

    @property
    def headers(self) -> list[tuple[str, str]]:
        """Header fields as received, hop-by-hop ones included (see `strip_hop_by_hop`).

        Decoded as UTF-8 with surrogate escapes, as Sanic encodes response headers, so
        passing them on reproduces the upstream's bytes.
        """
        if self._headers is None:
            self._headers = [
                (name.decode("utf-8", "surrogateescape"), value.decode("utf-8", "surrogateescape"))
                for name, value in self.raw_headers
            ]
        return self._headers

    @property
    def complete(self) -> bool:
        """Whether the whole body has arrived (then `read()` returns it without waiting)."""
        return self._done and self._error is None

    def stream(self) -> UpstreamResponse:
        """Iterate over the body chunks as they arrive (`async for chunk in resp.stream()`).

        Raises `UpstreamProtocolError` or `UpstreamTimeout` after the chunks that did
        arrive when the body is cut short or stalls.
        """
        return self

    def __aiter__(self) -> UpstreamResponse:
        return self

    async def __anext__(self) -> bytes:
        """Hot path: one call per body chunk."""
        while True:
            if self._chunks:
                chunk = self._chunks.popleft()
                self._buffered -= len(chunk)
                conn = self._conn
                if conn is not None and conn.reading_paused:
                    conn.consumed(self._buffered <= LOW_WATER)
                return chunk
            if self._error is not None:
                raise self._error
            if self._done or self._closed:
                raise StopAsyncIteration
            waiter = self._waiter = asyncio.get_running_loop().create_future()
            await waiter

    async def read(self) -> bytes:
        """The rest of the body, whole (meant for small bodies)."""
        if self._done and self._error is None:
            body = b"".join(self._chunks)
            self._chunks.clear()
            self._buffered = 0
            return body
        return b"".join([chunk async for chunk in self])

    async def aclose(self) -> None:
        """Release the response: a connection still receiving it is closed, not reused."""
        self.close()

    def close(self) -> None:
        """`aclose()`, for code compiled by mypyc, whose `finally` must not `await`
        (`FastPathProtocol._answer` says why)."""
        self._closed = True
        self._chunks.clear()
        self._buffered = 0
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.abandon()

    async def __aenter__(self) -> UpstreamResponse:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    # Called by the connection (`Receiver`).

    def _head(self) -> None:
        """Not called: `exchange()` resolves its future instead."""

    def _flush(self) -> None:
        """Not called: the consumer reads the chunks when it wants them."""

    def _feed(self, data: bytes) -> int:
        if self._closed:
            return 0
        self._chunks.append(data)
        self._buffered += len(data)
        self._wake()
        return self._buffered

    def _complete(self) -> None:
        self._conn = None
        self._done = True
        self._wake()

    def _fail(self, exc: BaseException) -> None:
        self._conn = None
        self._error = exc
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def __repr__(self) -> str:
        return f"<UpstreamResponse {self.status} {self.reason}>"
