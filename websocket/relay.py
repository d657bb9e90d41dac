"""`/ws/proxy/<service>/<path>`: a client connection relayed frame by frame to an upstream.

The upstream is `ws://<instance>/<path>?<query>` on an instance picked by
`Upstreams` (connect failures fail over to another instance first). Text and
binary frames are passed as they are, both ways, by two pumps; whichever side
closes first has its close code and reason passed on to the other. When the
upstream goes away without a close frame (it died), the client is closed with
1014 "upstream connection lost"; when no instance can be connected, 1014 too,
with the reason. Backpressure is end to end: a pump awaits each send, so a slow
reader slows its writer instead of growing a buffer.

Hot path: `pump_to_upstream` and `pump_to_client` (one await per frame each way).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import TYPE_CHECKING
from urllib.parse import quote

from sanic.server.websockets.impl import WebsocketImplProtocol
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed
from websockets.frames import Close
from websockets.protocol import CLOSED, CLOSING

from websocket.connections import BAD_GATEWAY
from websocket.upstreams import NoUpstream

if TYPE_CHECKING:
    from websocket.app import WsRequest

# Sanic hands the path decoded: encode it again for the upstream URL.
_PATH_SAFE = "/:@!$&'()*+,;=-._~"
# Codes a peer may not put in a close frame (RFC 6455 §7.4.1): passed on as 1000.
_RESERVED = frozenset({1005, 1006, 1015})


async def proxy_endpoint(
    request: WsRequest, ws: WebsocketImplProtocol, service: str, path: str = ""
) -> None:
    """Relay one client connection to an instance of `service`."""
    upstreams = request.app.ctx.upstreams
    target = "/" + quote(path, safe=_PATH_SAFE)
    if request.query_string:
        target += f"?{request.query_string}"
    headers = [("X-Forwarded-For", request.remote_addr or request.ip)]
    try:
        upstream, endpoint = await upstreams.connect(service, target, headers=headers)
    except NoUpstream as exc:
        await ws.close(BAD_GATEWAY, f"upstream unavailable: {exc}"[:120])
        return
    started = time.monotonic()
    ok = False
    try:
        ok = await relay(ws, upstream)
    finally:
        upstreams.finished(service, endpoint, started, ok)


async def relay(ws: WebsocketImplProtocol, upstream: ClientConnection) -> bool:
    """Pump both ways until one side closes, then close the other alike.

    True when the upstream ended with a close frame or the client left first.
    """
    to_upstream = asyncio.create_task(pump_to_upstream(ws, upstream))
    to_client = asyncio.create_task(pump_to_client(upstream, ws))
    try:
        await asyncio.wait((to_upstream, to_client), return_when=asyncio.FIRST_COMPLETED)
        if to_upstream.done() and not to_client.done() and not _client_closed(ws):
            # Sending upstream failed while the client is still there: the upstream
            # is closing, and its pump is about to report how.
            await asyncio.wait((to_client,), timeout=1.0)
    finally:
        to_upstream.cancel()
        to_client.cancel()
        if not to_client.done() or _client_closed(ws):
            # The client left (Sanic may also cancel this handler when it does).
            await _close_upstream(ws, upstream)
    if to_client.cancelled() or to_client.exception() is not None:
        return True  # the client could not be written to: it is gone
    close = to_client.result()
    if close is None:  # the upstream died without a close frame
        await ws.close(BAD_GATEWAY, "upstream connection lost")
        return False
    await ws.close(_code(close.code), close.reason)
    return True


async def pump_to_upstream(ws: WebsocketImplProtocol, upstream: ClientConnection) -> None:
    """Client frames to the upstream until either side closes. Hot path."""
    with contextlib.suppress(ConnectionClosed):
        while True:
            message = await ws.recv()
            if message is None:
                return
            await upstream.send(message)


async def pump_to_client(upstream: ClientConnection, ws: WebsocketImplProtocol) -> Close | None:
    """Upstream frames to the client; the upstream's close frame, None if it died. Hot path."""
    try:
        async for message in upstream:
            await ws.send(message)
    except ConnectionClosed as exc:
        return exc.rcvd
    return upstream.protocol.close_rcvd


def _client_closed(ws: WebsocketImplProtocol) -> bool:
    return ws.ws_proto.close_rcvd is not None or ws.ws_proto.state in (CLOSING, CLOSED)


async def _close_upstream(ws: WebsocketImplProtocol, upstream: ClientConnection) -> None:
    """Close the upstream leg with the client's close code and reason."""
    received = ws.ws_proto.close_rcvd
    code = _code(received.code) if received else 1000
    with contextlib.suppress(Exception):
        await asyncio.wait_for(upstream.close(code, received.reason if received else ""), 2.0)


def _code(code: int) -> int:
    return 1000 if code in _RESERVED else code
