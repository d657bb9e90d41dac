"""Every open client connection of one process: the cap, the drain, and revocations.

A connection's credential is checked as it opens (on `/ws`, also as its session
renews it). An open connection must not outlive its credential's revocation (a
logout, a reused refresh token, `/admin/revoke`, a deleted API key, a narrowed role):
each authenticated connection is indexed by the revocation members its credential
answers to (`Principal.revoked_by`), and when the process learns that one of them is
revoked (`common.revocation`: published, or found by a resync) every connection
under it is closed with 1008 "credential revoked": a `/ws` session, an envelope-mode
connection and a relay, spliced or not, alike. A credential's expiry ends `/ws`
sessions only (they renew with an `auth` message); a relay or an envelope-mode
connection lasts past its token's expiry, as a WebSocket proxied by nginx or Kong
does (the credential is checked at the upgrade), but not past its revocation.

Close codes used by the service (design §7; tested in tests/websocket):

    1000  normal: the peer closed, or an upstream closed with 1000
    1001  going away: the service is shutting down (SIGTERM drain; a spliced relay's
          upstream gets it too), or, to an upstream, its relayed client went away
    1008  policy violation: authentication missing, invalid or expired, or the
          credential revoked
    1009  message too big: a message over WS_MAX_MESSAGE_BYTES
    1011  internal error: no pong within WS_PING_TIMEOUT (`/ws`: `websocket.client`'s
          keepalive; the envelope mode: Sanic's; a spliced relay has none: pings pass
          end to end)
    1013  try again later: the send queue overflowed (slow consumer), or the
          connection cap was reached after the handshake
    1014  bad gateway: the upstream could not be reached, died mid-stream or (on a
          spliced relay) stopped reading for WS_RELAY_SEND_TIMEOUT
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Hashable, Iterator
from typing import Protocol

from sanic.server.websockets.impl import WebsocketImplProtocol

from common.aio import held
from common.credentials import Principal
from common.log import get_logger
from common.revocation import RevocationView

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
        self._members: dict[Hashable, tuple[str, ...]] = {}  # connection -> its revocations
        self._by_member: dict[str, set[Hashable]] = {}  # revocation member -> connections
        self._closing: set[asyncio.Task[None]] = set()
        self._is_revoked: Callable[[str], bool] = lambda member: False

    def follow(self, revocations: RevocationView) -> None:
        """Close the connections whose credential `revocations` revokes, from now on."""
        self._is_revoked = revocations.is_revoked
        revocations.on_revoke(self.revoked)

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
        self._unindex(ws)

    def authenticated(self, ws: Hashable, principal: Principal) -> None:
        """`ws` now acts as `principal`: closed when its credential is revoked."""
        if ws not in self._open:
            return
        self._unindex(ws)
        members = self._members[ws] = principal.revoked_by()
        for member in members:
            self._by_member.setdefault(member, set()).add(ws)
        # Revoked since it was checked (an upgrade's handshake lies between): now.
        for member in filter(self._is_revoked, members):
            self.revoked(member)

    def revoked(self, member: str) -> None:
        """`member` was revoked (`RevocationView.on_revoke`): close its connections, 1008."""
        affected = self._by_member.pop(member, None)
        if not affected:
            return
        kind = member.partition(":")[0]
        log.info("credential revoked: closing its connections",
                 extra={"fields": {"kind": kind, "connections": len(affected)}})  # fmt: skip
        for ws in affected:
            self._unindex(ws)
            closing = self._close(ws, POLICY_VIOLATION, "credential revoked")
            if closing is not None:
                held(self._closing, closing)

    def _unindex(self, ws: Hashable) -> None:
        for member in self._members.pop(ws, ()):
            connections = self._by_member.get(member)
            if connections is not None:
                connections.discard(ws)
                if not connections:
                    del self._by_member[member]

    def _close(self, ws: Hashable, code: int, reason: str) -> Awaitable[None] | None:
        closer = self._closers.get(ws)
        if closer is not None:
            return closer.close(code, reason)
        if isinstance(ws, WebsocketImplProtocol):
            return _close(ws, code, reason)
        return None

    def hand_over(self, ws: WebsocketImplProtocol, closer: Closer) -> None:
        """From now on `closer`, not `ws`, closes this connection (still counted as `ws`)."""
        self._closers[ws] = closer

    async def drain(self, timeout: float) -> None:
        """Close every connection with 1001 and wait (up to `timeout`) for the handshakes."""
        self.draining = True
        if not self._open:
            return
        log.info("draining websocket connections", extra={"fields": {"open": len(self._open)}})
        closes = [self._close(ws, GOING_AWAY, "server shutting down") for ws in list(self._open)]
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.gather(*(c for c in closes if c is not None)), timeout)


async def _close(ws: WebsocketImplProtocol, code: int, reason: str) -> None:
    try:
        async with asyncio.timeout(1.0):
            await ws.close(code, reason)
    except Exception:  # slow or already gone: send the close frame without waiting
        ws.fail_connection(code, reason)
