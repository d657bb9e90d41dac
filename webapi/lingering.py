"""`LingeringHttpProtocol`: Sanic's HTTP/1.1 protocol with nginx's lingering close.

Closing a socket that still has unread data (the body of a request refused with
413, or refused before its handler read it) makes the kernel send a reset, which
can destroy the error response before the client has read it. So when the gateway
closes a connection, it sends a FIN after the response and hands the socket to
`_Drain`, which reads and drops what the client still sends until the client
closes or `LINGER_SECONDS` pass (nginx's `lingering_close`). While the server shuts
down, connections are closed at once, and a request under way is the
connection's last (`close_if_idle`). The gateway always serves with this protocol
or its subclass `webapi.fastpath.FastPathProtocol`.
"""

from __future__ import annotations

import asyncio
from typing import Any, cast

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
    __slots__ = ("_lingering",)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._lingering = False

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
            self._lingering
            or transport is None
            or transport.is_closing()
            or self.signal.stopped
            or not transport.can_write_eof()
        ):
            super().close(timeout)
            return
        self._lingering = True
        timeouts = cast("asyncio.TimerHandle | None", self._callback_check_timeouts)
        if timeouts is not None:  # Sanic's own close cancels it too
            timeouts.cancel()
        self.recv_buffer.clear()
        transport.write_eof()
        transport.set_protocol(_Drain(self, transport))
        transport.resume_reading()  # Sanic pauses it when its buffer is full
