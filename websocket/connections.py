"""Every open client connection of one process: the cap, the drain, the send queue.

Close codes used by the service (design §7; tested in tests/websocket):

    1000  normal: the peer closed, or an upstream closed with 1000
    1001  going away: the service is shutting down (SIGTERM drain; a spliced relay's
          upstream gets it too), or, to an upstream, its relayed client went away
    1008  policy violation: authentication missing, invalid or expired
    1009  message too big: a message over WS_MAX_MESSAGE_BYTES
    1011  internal error: no pong within WS_PING_TIMEOUT (Sanic's keepalive; a spliced
          relay has none: pings pass end to end)
    1013  try again later: the send queue overflowed (slow consumer), or the
          connection cap was reached after the handshake
    1014  bad gateway: the upstream could not be reached or died mid-stream
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Protocol

from sanic.server.websockets.impl import WebsocketImplProtocol

from common.aio import cancel_and_wait
from common.log import get_logger

log = get_logger("websocket.connections")

GOING_AWAY = 1001
POLICY_VIOLATION = 1008
MESSAGE_TOO_BIG = 1009
TRY_AGAIN_LATER = 1013
BAD_GATEWAY = 1014

Message = str | bytes


class Outbox:
    """A bounded send queue: what is pushed to one client, written by one task.

    `put` never blocks, so a publisher fanning out to thousands of clients is
    never slowed by one of them. A client that lets `limit` messages pile up
    (it reads slower than it is sent to) is closed with 1013 and its queue
    dropped: memory per connection stays bounded. The writer task exists only
    while there is something to write.
    """

    __slots__ = ("_on_overflow", "_queue", "_task", "closed", "limit", "ws")

    def __init__(
        self, ws: WebsocketImplProtocol, limit: int, on_overflow: Callable[[], None]
    ) -> None:
        self.ws = ws
        self.limit = limit
        self.closed = False
        self._on_overflow = on_overflow
        self._queue: list[Message] = []
        self._task: asyncio.Task[None] | None = None

    def put(self, message: Message) -> bool:
        """Queue `message`; False (and the connection closed with 1013) if the queue is full."""
        if self.closed:
            return False
        if len(self._queue) >= self.limit:
            self.overflow()
            return False
        self._queue.append(message)
        if self._task is None:
            self._task = asyncio.create_task(self._write())
        return True

    def overflow(self) -> None:
        log.warning("slow consumer closed", extra={"fields": {"queued": len(self._queue)}})
        self.closed = True
        self._queue.clear()
        # Synchronous: the writer may hold the send lock while blocked on a full socket.
        self.ws.fail_connection(TRY_AGAIN_LATER, "send queue full: reading too slowly")
        self._on_overflow()

    async def _write(self) -> None:
        try:
            while self._queue and not self.closed:
                batch, self._queue = self._queue, []
                for message in batch:
                    await self.ws.send(message)
        except Exception:  # the connection went away under us: nothing more to write
            self.closed = True
            self._queue.clear()
        finally:
            self._task = None

    async def close(self) -> None:
        self.closed = True
        self._queue.clear()
        await cancel_and_wait(self._task)


class Closer(Protocol):
    """What closes a connection whose socket its WebsocketImplProtocol no longer reads
    (a spliced relay, `websocket.splice`)."""

    async def close(self, code: int, reason: str) -> None: ...


class Connections:
    """The open connections of this process: counted against the cap, drained on stop."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._open: set[WebsocketImplProtocol] = set()
        self._closers: dict[WebsocketImplProtocol, Closer] = {}
        self.draining = False

    def __len__(self) -> int:
        return len(self._open)

    def full(self) -> bool:
        return self.draining or len(self._open) >= self.limit

    def add(self, ws: WebsocketImplProtocol) -> bool:
        """Count `ws` in; False when the cap is reached (the caller closes it with 1013)."""
        if self.full():
            return False
        self._open.add(ws)
        return True

    def discard(self, ws: WebsocketImplProtocol) -> None:
        self._open.discard(ws)
        self._closers.pop(ws, None)

    def hand_over(self, ws: WebsocketImplProtocol, closer: Closer) -> None:
        """From now on `closer`, not `ws`, closes this connection (still counted as `ws`)."""
        self._closers[ws] = closer

    async def drain(self, timeout: float) -> None:
        """Close every connection with 1001 and wait (up to `timeout`) for the handshakes."""
        self.draining = True
        if not self._open:
            return
        log.info("draining websocket connections", extra={"fields": {"open": len(self._open)}})
        closes = [
            self._closers[ws].close(GOING_AWAY, "server shutting down")
            if ws in self._closers
            else _close(ws, GOING_AWAY, "server shutting down")
            for ws in list(self._open)
        ]
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.gather(*closes), timeout)


async def _close(ws: WebsocketImplProtocol, code: int, reason: str) -> None:
    try:
        async with asyncio.timeout(1.0):
            await ws.close(code, reason)
    except Exception:  # slow or already gone: send the close frame without waiting
        ws.fail_connection(code, reason)
