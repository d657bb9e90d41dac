"""Every open client connection of one process: the cap and the drain.

Close codes used by the service (design §7; tested in tests/websocket):

    1000  normal: the peer closed, or an upstream closed with 1000
    1001  going away: the service is shutting down (SIGTERM drain; a spliced relay's
          upstream gets it too), or, to an upstream, its relayed client went away
    1008  policy violation: authentication missing, invalid or expired
    1009  message too big: a message over WS_MAX_MESSAGE_BYTES
    1011  internal error: no pong within WS_PING_TIMEOUT (`/ws`: `websocket.client`'s
          keepalive; the envelope mode: Sanic's; a spliced relay has none: pings pass
          end to end)
    1013  try again later: the send queue overflowed (slow consumer), or the
          connection cap was reached after the handshake
    1014  bad gateway: the upstream could not be reached or died mid-stream
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Hashable, Iterator
from typing import Protocol

from sanic.server.websockets.impl import WebsocketImplProtocol

from common.log import get_logger

log = get_logger("websocket.connections")

NORMAL_CLOSURE = 1000
GOING_AWAY = 1001
POLICY_VIOLATION = 1008
MESSAGE_TOO_BIG = 1009
INTERNAL_ERROR = 1011
TRY_AGAIN_LATER = 1013
BAD_GATEWAY = 1014


class Closer(Protocol):
    """What closes a connection whose socket Sanic no longer reads (a spliced relay,
    `websocket.splice`; a `/ws` client, `websocket.client`)."""

    async def close(self, code: int, reason: str) -> None: ...


class Connections:
    """The open connections of this process: counted against the cap, drained on stop."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        # a Sanic connection (WebsocketImplProtocol) or a `/ws` client (`websocket.client`)
        self._open: set[Hashable] = set()
        self._closers: dict[Hashable, Closer] = {}
        self.draining = False

    def __len__(self) -> int:
        return len(self._open)

    def full(self) -> bool:
        return self.draining or len(self._open) >= self.limit

    def __iter__(self) -> Iterator[Hashable]:
        return iter(list(self._open))

    def add(self, ws: Hashable, closer: Closer | None = None) -> bool:
        """Count `ws` in (closed by `closer` on the drain, if given); False when the cap is
        reached (the caller closes it with 1013)."""
        if self.full():
            return False
        self._open.add(ws)
        if closer is not None:
            self._closers[ws] = closer
        return True

    def discard(self, ws: Hashable) -> None:
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
        closes = []
        for ws in list(self._open):
            closer = self._closers.get(ws)
            if closer is not None:
                closes.append(closer.close(GOING_AWAY, "server shutting down"))
            elif isinstance(ws, WebsocketImplProtocol):
                closes.append(_close(ws, GOING_AWAY, "server shutting down"))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.gather(*closes), timeout)


async def _close(ws: WebsocketImplProtocol, code: int, reason: str) -> None:
    try:
        async with asyncio.timeout(1.0):
            await ws.close(code, reason)
    except Exception:  # slow or already gone: send the close frame without waiting
        ws.fail_connection(code, reason)
