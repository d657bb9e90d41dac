"""`/ws/proxy/<service>/<path>`: a client connection relayed to an upstream.

The upstream is `ws://<instance>/<path>?<query>`, the path and query as the client sent
them (its percent-escapes untouched, as the gateway's proxy passes them), on an instance
picked by `Upstreams` (connect failures fail over to another instance first): of the version
the `X-Service-Version` header names, as on the gateway's `/svc/` routes, else as
the live policy's version weights say (a browser cannot set the header: it gets
the weights).

Before the upgrade, as the gateway's `/svc/` refuses the request (`admit_relay`, from the
service's admission, once the credential is checked): a path that would leave the
service's space (a `.` or `..` segment, encoded or with parameters: `..;`, an encoded
slash, a backslash, a NUL; the gateway's own check, `common.proxy_paths`) or that holds
a fragment (`#`: no part of a request target) is refused with 400 `invalid_path`, and a
service the registry has never heard of (no instance of it ever registered, none of its
RPC workers) with 404 `unknown_service`. A known service with no live instance is
upgraded, then closed with 1014 (below): a browser sees no status, only close codes.

The upstream is connected before the client's upgrade is answered, as nginx proxies
WebSockets (`connect_first`, called by `websocket.protocol`'s handshake), so that:

* the client's subprotocols (all but `bearer` and its token) are offered to the
  upstream, and the client is answered with the one the upstream chose (with
  `bearer` if it chose none and the client offered `bearer`, as a browser requires;
  with none otherwise);
* an upstream that refuses the upgrade with a 4xx (a path it does not serve, a
  cookie or an `Origin` it refuses, a credential it wants: 401 `WWW-Authenticate`),
  or redirects it (3xx: never followed), refuses the client's with its answer: that
  status, its fields less the hop-by-hop ones, its body up to 64 KiB, else a JSON
  body, code `upstream_refused` (`websocket.refusals`); that is no failure of the
  instance (`websocket.upstreams`).

When no instance can be connected, the upgrade is answered all the same and the
client closed with 1014 and the reason. The upstream's handshake carries the
client's fields as the gateway's proxy forwards them, with `X-Forwarded-*`,
`X-Request-Id` and `Via` (`websocket.handshake`). The client's address (`hash_on:
client_ip`) is read as the gateway reads it (`websocket.handshake.client_key`).

Once both handshakes are done the relay is a byte splice (`websocket.splice`):
frames, pings and close frames pass as they are, both ways, with end-to-end
backpressure; close codes and reasons pass through; an upstream that dies
closes the client with 1014 "upstream connection lost"; a client that vanishes
closes the upstream with 1001. Messages from the client over WS_MAX_MESSAGE_BYTES
close it with 1009 (messages from the upstream are not limited). An end that stops
reading for WS_RELAY_SEND_TIMEOUT is cut (`websocket.splice`, "Stalls"). The service
logs the 1014s and 1009s it sends (`log_close`), and a client cut for not reading
(as 1006: it gets no close frame), not the close codes it relays from the upstream:
those are the application's. When the splice cannot take over safely (one side
is already closing: say, the client sent a close frame while the upstream was
being connected, or the upstream closed as soon as it opened), two pumps relay
frame by frame as below, with the same endings. They need no stall bound of
their own: with one side closing, the relay ends with that closing handshake,
whose waits are bounded (Sanic's close timeout; 2 s for the upstream's).

Hot path: `websocket.splice`; in the fallback, `pump_to_upstream` and `pump_to_client`.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
from typing import TYPE_CHECKING

from sanic import HTTPResponse
from sanic.server.websockets.impl import WebsocketImplProtocol
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed
from websockets.frames import Close
from websockets.protocol import CLOSED, CLOSING

from common.errors import quoted
from common.proxy_paths import InvalidProxyPath, upstream_target
from websocket.auth import offered_subprotocols
from websocket.connections import BAD_GATEWAY, GOING_AWAY, MESSAGE_TOO_BIG
from websocket.errors import log_close, refusal
from websocket.handshake import client_key, subprotocols_passed_on, upstream_headers
from websocket.splice import CLIENT_STALLED, GONE, UPSTREAM_LOST, UPSTREAM_STALLED, Splice
from websocket.tap import untap
from websocket.upstreams import Connected, NoUpstream

if TYPE_CHECKING:
    from websocket.app import WsRequest

RELAYED = "/ws/proxy/"  # the relay's routes' prefix (`websocket.app`)
# What a connection ended without a close frame is logged with (RFC 6455 §7.1.5).
ABNORMAL_CLOSURE = 1006
# Codes a peer may not put in a close frame (RFC 6455 §7.4.1): passed on as 1000.
_RESERVED = frozenset({1005, 1006, 1015})

Opened = Connected | NoUpstream  # how connecting the upstream went, unless refused


def admit_relay(request: WsRequest, service: str) -> HTTPResponse | None:
    """The refusal of relay `request` to `service` before its upgrade (module docstring),
    else None, with the upstream's target (path and query) in `request.ctx.target`."""
    try:
        # (A fragment too: `websockets` would refuse the URL, a connect failure.)
        target = upstream_target(request.raw_url, RELAYED + service)
    except InvalidProxyPath as exc:
        return refusal(request, exc.status_code, exc.code, str(exc))
    view = request.app.ctx.view
    if not view.registered(service) and not view.is_rpc_service(service):
        message = f"no service named {quoted(service)} is registered"
        return refusal(request, 404, "unknown_service", message)
    request.ctx.target = target
    return None


async def connect_first(request: WsRequest) -> str | None:
    """Connect the upstream of relay `request` before its upgrade is answered; the
    subprotocol the upstream chose (None: none). Raises `UpstreamRefused` when the
    upstream refused with a 3xx or 4xx: the client's answer (`websocket.refusals`).

    The connection waits in `request.ctx.upstream` for `proxy_endpoint`; should the
    upgrade fail (`drop_untaken`, by the caller) or the handler never take it (the
    client left, or the connection cap refused it), it is aborted: at the latest when
    the client's connection ends."""
    opened = request.ctx.upstream = await open_upstream(request)
    if isinstance(opened, NoUpstream):
        return None  # the client is upgraded, then closed with the reason (`proxy_endpoint`)
    task = asyncio.current_task()  # the client connection's: it outlives the handler
    if task is not None:
        task.add_done_callback(lambda _: drop_untaken(request))
    return opened.connection.subprotocol


async def open_upstream(request: WsRequest) -> Opened:
    """A connection to an instance of the relay's service, with the client's fields and
    subprotocols (`websocket.handshake`), or why there is none; raises `UpstreamRefused`."""
    upstreams = request.app.ctx.upstreams
    service = request.match_info["service"]
    try:
        return await upstreams.connect(
            service,
            request.ctx.target,  # (`admit_relay`: checked before the upgrade)
            headers=upstream_headers(request),
            subprotocols=subprotocols_passed_on(offered_subprotocols(request)),
            splice=True,
            key=client_key(request, service),
            version=request.headers.get("x-service-version"),
        )
    except NoUpstream as exc:
        return exc


def drop_untaken(request: WsRequest) -> None:
    """Abort the upstream `connect_first` opened for `request` if no handler took it."""
    opened, request.ctx.upstream = getattr(request.ctx, "upstream", None), None
    if isinstance(opened, Connected):
        opened.connection.transport.abort()
        service = request.match_info["service"]
        request.app.ctx.upstreams.finished(service, opened.endpoint, opened.connect_seconds, True)


async def proxy_endpoint(
    request: WsRequest, ws: WebsocketImplProtocol, service: str, path: str = ""
) -> None:
    """Relay one client connection to an instance of `service`, connected before the
    upgrade (`connect_first`: `websocket.protocol.BearerProtocol` calls it for every
    upgrade to a route of this handler: `websocket.route_kinds.RouteKind.RELAY`)."""
    upstreams = request.app.ctx.upstreams
    opened: Connected | NoUpstream = request.ctx.upstream
    request.ctx.upstream = None  # taken
    if not isinstance(opened, Connected):
        untap(ws)
        await ws.close(BAD_GATEWAY, f"upstream unavailable: {opened}"[:120])
        return
    upstream, endpoint, connect_seconds = opened
    ok = False
    try:
        send_timeout = request.app.ctx.settings.ws_relay_send_timeout
        splice = Splice.take_over(ws, upstream, upstreams.max_size, send_timeout)
        if splice is None:
            ending = await relay(ws, upstream)
            ok = ending is not Ending.UPSTREAM_LOST
            # The close the client got is the upstream's: not one for `_counted` to log.
            request.ctx.close_relayed = ending is Ending.UPSTREAM_CLOSED
        else:
            request.app.ctx.connections.hand_over(ws, splice)
            ok = await splice.run()
            if splice.refused is not None:
                log_close(request.path, MESSAGE_TOO_BIG, splice.refused)
            elif splice.stalled_end == CLIENT_STALLED:
                log_close(request.path, ABNORMAL_CLOSURE, CLIENT_STALLED)  # aborted: no frame
            elif splice.stalled_end == UPSTREAM_STALLED:
                log_close(request.path, BAD_GATEWAY, UPSTREAM_STALLED)
            elif not ok:
                log_close(request.path, BAD_GATEWAY, UPSTREAM_LOST)
    finally:
        upstreams.finished(service, endpoint, connect_seconds, ok)


class Ending(enum.Enum):
    """How a relay (without splice) ended."""

    CLIENT_LEFT = "client left"  # the upstream was closed with the client's code
    UPSTREAM_CLOSED = "upstream closed"  # the client got the upstream's close code
    UPSTREAM_LOST = "upstream lost"  # the client got 1014: the upstream died without a close


async def relay(ws: WebsocketImplProtocol, upstream: ClientConnection) -> Ending:
    """Pump both ways until one side closes, then close the other alike (no splice)."""
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
        return Ending.CLIENT_LEFT  # the client could not be written to: it is gone
    close = to_client.result()
    if close is None:  # the upstream died without a close frame
        await ws.close(BAD_GATEWAY, UPSTREAM_LOST)
        return Ending.UPSTREAM_LOST
    await ws.close(_code(close.code), close.reason)
    return Ending.UPSTREAM_CLOSED


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
    """Close the upstream leg with the client's close code and reason (1001 if it sent none)."""
    received = ws.ws_proto.close_rcvd
    code, reason = (_code(received.code), received.reason) if received else (GOING_AWAY, GONE)
    with contextlib.suppress(Exception):
        await asyncio.wait_for(upstream.close(code, reason), 2.0)


def _code(code: int) -> int:
    return 1000 if code in _RESERVED else code
