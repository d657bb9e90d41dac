"""`LingeringHttpProtocol`: Sanic's HTTP/1.1 protocol with nginx's lingering close, for
both Sanic services (the gateway's protocols and the websocket service's derive from it).

Closing a socket that still has unread data (the body of a request refused with
413, the rest of a head refused with 431, or a request refused before its handler
read it) makes the kernel send a reset, which can destroy the error response before
the client has read it, and fails a client still writing its request (most then
never read the answer). So when a server closes a connection, it sends a FIN after
the response and hands the socket to `_Drain`, which reads and drops what the client
still sends until the client closes or `LINGER_SECONDS` pass (nginx's
`lingering_close`). While the server shuts down, connections are closed at once, and
a request under way is the connection's last (`close_if_idle`). The gateway always
serves with this protocol or its subclass `webapi.fastpath.FastPathProtocol`; the
websocket service with `websocket.tap.TapServerProtocol`, Sanic's WebSocket protocol
on top of this one (an upgraded connection is closed by its WebSocket, not here).
"""

from __future__ import annotations

import asyncio
from typing import cast

from sanic.server.protocols.http_protocol import HttpProtocol

from common.strict_http import StrictHttp

LINGER_SECONDS = 2.0


class _Drain(asyncio.Protocol):
    """A closing connection's protocol: drops what arrives, ends on EOF or timeout."""

    def __init__(self, owner: HttpProtocol, transport: asyncio.Transport) -> None:
        self.owner = owner
        self.timer = asyncio.get_running_loop().call_later(LINGER_SECONDS, transport.abort)

    def data_received(self, data: bytes) -> None:
        pass  # the rest of a request nobody will answer

    def eof_received(self) -> bool:
        return False  # the transport closes itself

    def connection_lost(self, exc: Exception | None) -> None:
        self.timer.cancel()
        self.owner.connection_lost(exc)  # type: ignore[no-untyped-call]  # Sanic's cleanup


class LingeringHttpProtocol(HttpProtocol):
    """Sanic's HTTP/1.1 protocol whose close lingers (see the module docstring), parsing
    strictly (`common.strict_http`)."""

    HTTP_CLASS = StrictHttp
    # None of its own: `TapServerProtocol` derives from this and from Sanic's
    # `WebSocketProtocol`, and two bases that both add slots cannot be combined. Whether
    # the close lingers already is the transport's: its protocol is then a `_Drain`.
    __slots__ = ()

    def close_if_idle(self) -> bool:
        """Sanic asks this of every connection as the server stops: an idle one is
        closed; one with a request under way answers it with `Connection: close`, then
        closes, instead of reading its client's next requests until the drain's end."""
        closed: bool = super().close_if_idle()
        if not closed and self._http is not None:
            self._http.keep_alive = False
        return closed

    def close(self, timeout: float | None = None) -> None:
        transport = self.transport
        if (
            transport is None
            or isinstance(transport.get_protocol(), _Drain)  # lingering already
            or transport.is_closing()
            or self.signal.stopped
            or not transport.can_write_eof()
        ):
            super().close(timeout)
            return
        timeouts = cast("asyncio.TimerHandle | None", self._callback_check_timeouts)
        if timeouts is not None:  # Sanic's own close cancels it too
            timeouts.cancel()
        self.recv_buffer.clear()
        transport.write_eof()
        transport.set_protocol(_Drain(self, transport))
        transport.resume_reading()  # Sanic pauses it when its buffer is full
