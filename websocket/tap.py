"""Holding what each side of a relayed connection sends until `websocket.splice` takes over
(and what a `/ws` client sends until `websocket.client` does).

From the client's upgrade to the take-over (the upstream is connected first:
`websocket.relay.connect_first`), `TapServerProtocol` keeps what the client sends
without giving it to Sanic, and `TapClientConnection` what the upstream sends past
its handshake response (from then until the take-over) without giving it to
`websockets`: neither library parses a frame the
splice will relay. Past `TAP_LIMIT` held bytes the socket is paused until the
take-over. When there is no splice, `untap` gives each library what it did
not see, and it reads the socket again. What a client sends before its upgrade is
answered (frames in the same read as its request head, as RFC 6455 allows) Sanic
leaves in its `recv_buffer`, which it reads no more once upgraded: `upgraded` hands
it on, first, on every route (to the tap, or to Sanic's WebSocket).

What Sanic parses of a connection (every route's, a relay's once untapped) it
handles in a task per read (`WebsocketImplProtocol.async_data_received`), and a
complete message's task waits, holding the connection's event lock, until the
handler reads that message. A handler that closes the connection without reading
to its end (a relay refused with 1014 while the client sends, a relay or an
envelope stream that ends while frames still come) would leave that task, and
every later one of the connection, pending for good (with the protocol and the
request), until a garbage collection destroyed them with an error ("Task was
destroyed but it is pending!"). `TapServerProtocol` feeds Sanic itself, as Sanic's
own `data_received` and `eof_received` do, keeps those tasks, and cancels the
ones still pending once the connection is lost: no reader can come then (Sanic
cancels the handler), and nothing they would do (send, wake a reader) still can.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from sanic import Request
from sanic.server.protocols.websocket_protocol import WebSocketProtocol
from sanic.server.websockets.impl import WebsocketImplProtocol
from websockets.asyncio.client import ClientConnection
from websockets.protocol import CLOSED, CONNECTING

from common.aio import held
from common.lingering import LingeringHttpProtocol
from common.strict_http import StrictHttp
from websocket.route_kinds import RouteKind, route_kind

TAP_LIMIT = 256 * 1024  # bytes held before the take-over past which the socket is paused
# The routes whose client connections are held: for a splice, or `websocket.client`.
TAPPED = frozenset({RouteKind.RELAY, RouteKind.CLIENTS})


class TapServerProtocol(WebSocketProtocol, LingeringHttpProtocol):
    """Sanic's WebSocket protocol; what a relayed client sends is held, unparsed, for the
    splice. Before an upgrade, a connection closes lingering, as the gateway's do
    (`common.lingering`): a client still sending the head refused with 431, or a body
    nobody reads, gets its answer instead of a reset."""

    HTTP_CLASS = StrictHttp  # (`common.strict_http`)
    __slots__ = ("parsing", "tap")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.tap: bytearray | None = None
        # Sanic's tasks handling what it parsed, until done (the module docstring).
        self.parsing: set[asyncio.Task[None]] = set()

    async def websocket_handshake(
        self, request: Request[Any, Any], subprotocols: Sequence[str] | None = None
    ) -> Any:
        if route_kind(request) in TAPPED:
            self.tap = bytearray()
        ws = await super().websocket_handshake(request, subprotocols)
        self.upgraded()
        return ws

    def upgraded(self) -> None:
        """What the client sent past its upgrade request before `websocket` was set (in
        the same read as the request head, or while a relay's upstream was connected)
        waits in Sanic's `recv_buffer`, which nothing reads once upgraded: it goes where
        later bytes go (the tap, or Sanic's WebSocket), first. Called as soon as
        `websocket` is set, with nothing awaited since (Sanic's `connection_made`
        awaits nothing): no later byte can have gone first."""
        if not self.recv_buffer:  # the usual case
            return
        early = bytes(self.recv_buffer)
        self.recv_buffer.clear()
        transport = self.transport
        if transport is not None and not transport.is_reading() and self._can_write.is_set():
            transport.resume_reading()  # Sanic pauses it when its buffer is full
        self.data_received(early)

    def data_received(self, data: bytes) -> None:
        if self.websocket is None:  # before `websocket`: into `recv_buffer`
            super().data_received(data)  # type: ignore[no-untyped-call]
            return
        tap = self.tap
        if tap is None:
            self.to_sanic(self.websocket, data)
            return
        tap += data
        if len(tap) > TAP_LIMIT and self.transport is not None:
            self.transport.pause_reading()  # until the splice takes over

    def to_sanic(self, ws: WebsocketImplProtocol, data: bytes) -> None:
        """Sanic's `ws.data_received` (`ws`: this connection's), its task kept. Hot path."""
        ws.ws_proto.receive_data(data)
        to_send, events = ws.ws_proto.data_to_send(), ws.ws_proto.events_received()
        if to_send or events:
            held(self.parsing, ws.async_data_received(to_send, events))  # type: ignore[no-untyped-call]

    def eof_received(self) -> bool | None:
        """Sanic's `WebsocketImplProtocol.eof_received`, its task kept."""
        ws = self.websocket
        if ws is None:
            return super().eof_received()
        ws.ws_proto.receive_eof()
        to_send, events = ws.ws_proto.data_to_send(), ws.ws_proto.events_received()
        held(self.parsing, ws.async_eof_received(to_send, events))  # type: ignore[no-untyped-call]
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)  # type: ignore[no-untyped-call]
        for task in self.parsing:
            task.cancel()  # (its done callback discards it)

    def pause_writing(self) -> None:
        super().pause_writing()  # type: ignore[no-untyped-call]
        if self.websocket is not None and self.transport is not None:
            # A WebSocket client that does not read: read nothing more from it, or the
            # answers its frames get (pongs to its pings) pile up in this process.
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        super().resume_writing()  # type: ignore[no-untyped-call]
        tap_full = self.tap is not None and len(self.tap) > TAP_LIMIT
        if self.websocket is not None and self.transport is not None and not tap_full:
            self.transport.resume_reading()

    def release(self) -> bytes:
        """Stop holding: what was held, and reading resumed."""
        held, self.tap = bytes(self.tap or b""), None
        if self.transport is not None and not self.transport.is_reading():
            self.transport.resume_reading()
        return held

    def untap(self) -> None:
        """No splice: Sanic gets what was held, and everything after."""
        held = self.release()
        if held and self.websocket is not None and self.websocket.ws_proto.state is not CLOSED:
            self.to_sanic(self.websocket, held)


class TapClientConnection(ClientConnection):
    """The `websockets` client connection; past the handshake, what the upstream sends is
    held, unparsed, for the splice."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.tap: bytearray | None = bytearray()  # the handshake response, then frames
        self.fed = 0  # bytes of `tap` the library has parsed

    def data_received(self, data: bytes) -> None:
        tap = self.tap
        if tap is None:
            super().data_received(data)
            return
        tap += data
        if self.protocol.state is CONNECTING:  # the handshake response is the library's
            self.fed = len(tap)
            super().data_received(data)
        elif len(tap) > TAP_LIMIT:
            self.transport.pause_reading()  # until the splice takes over

    def release(self) -> bytes:
        """Stop holding: all that was received since the connection opened, reading resumed."""
        held, self.tap = bytes(self.tap or b""), None
        if not self.transport.is_reading():
            self.transport.resume_reading()
        return held

    def untap(self) -> None:
        """No splice: the library gets what it did not parse yet, and everything after."""
        rest = self.release()[self.fed :]
        if rest:
            super().data_received(rest)


def untap(ws: WebsocketImplProtocol) -> None:
    """`ws` will not be spliced: let Sanic read the client again."""
    if isinstance(ws.io_proto, TapServerProtocol):
        ws.io_proto.untap()
