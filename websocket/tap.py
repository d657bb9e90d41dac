"""Holding what each side of a relayed connection sends until `websocket.splice` takes over
(and what a `/ws` client sends until `websocket.client` does).

From the client's upgrade to the take-over (the upstream is connected first:
`websocket.relay.connect_first`), `TapServerProtocol` keeps what the client sends
without giving it to Sanic, and `TapClientConnection` what the upstream sends past
its handshake response (from then until the take-over) without giving it to
`websockets`: neither library parses a frame the
splice will relay. Past `TAP_LIMIT` held bytes the socket is paused until the
take-over. When there is no splice, `untap` gives each library what it did
not see, and it reads the socket again.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sanic import Request
from sanic.server.protocols.websocket_protocol import WebSocketProtocol
from sanic.server.websockets.impl import WebsocketImplProtocol
from websockets.asyncio.client import ClientConnection
from websockets.protocol import CLOSED, CONNECTING

from common.lingering import LingeringHttpProtocol
from common.strict_http import StrictHttp

TAP_LIMIT = 256 * 1024  # bytes held before the take-over past which the socket is paused
RELAYED = "/ws/proxy/"  # the routes whose client connections are held for a splice
CLIENTS = "/ws"  # the route whose connections `websocket.client` takes over


class TapServerProtocol(WebSocketProtocol, LingeringHttpProtocol):
    """Sanic's WebSocket protocol; what a relayed client sends is held, unparsed, for the
    splice. Before an upgrade, a connection closes lingering, as the gateway's do
    (`common.lingering`): a client still sending the head refused with 431, or a body
    nobody reads, gets its answer instead of a reset."""

    HTTP_CLASS = StrictHttp  # (`common.strict_http`)
    __slots__ = ("tap",)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.tap: bytearray | None = None

    async def websocket_handshake(
        self, request: Request[Any, Any], subprotocols: Sequence[str] | None = None
    ) -> Any:
        if request.path.startswith(RELAYED) or request.path == CLIENTS:
            self.tap = bytearray()
        return await super().websocket_handshake(request, subprotocols)

    def data_received(self, data: bytes) -> None:
        tap = self.tap
        if tap is None or self.websocket is None:  # before `websocket`: into `recv_buffer`
            super().data_received(data)  # type: ignore[no-untyped-call]
            return
        tap += data
        if len(tap) > TAP_LIMIT and self.transport is not None:
            self.transport.pause_reading()  # until the splice takes over

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
            self.websocket.data_received(held)  # type: ignore[no-untyped-call]


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
