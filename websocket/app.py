"""`create_app()` for the WebSocket service (design §7).

Routes:

    GET /health                        200 when Redis answers; open connections (HEAD too)
    WS  /ws                            authenticated clients: subscriptions, JSON-RPC (`session`)
    WS  /ws/stream                     the original dispatcher's envelope mode (`envelope`)
    WS  /ws/proxy/<service>/<path>     relayed to an instance of `service` (`relay`)

Every WebSocket route needs a credential (`websocket.auth`): `/ws/stream` and
`/ws/proxy/...` with the upgrade request (else HTTP 401; a relay to a service
outside the credential's scopes is HTTP 403, an envelope request for one is
answered "model not allowed"), `/ws` with the upgrade or as its first message.
A relay's path is checked as the gateway's `/svc/` (400 `invalid_path`), and its
service must be known (404 `unknown_service`: `websocket.relay.admit_relay`).
A method a path does not take is a 405 with `Allow` and a path no route takes a
404, whatever the credential (`common.router`; a WebSocket route takes GET only).
Close codes are in
`websocket.connections`. Limits (settings `WS_*`): frames over
WS_MAX_MESSAGE_BYTES close with 1009; pings every WS_PING_INTERVAL, no pong
within WS_PING_TIMEOUT closes with 1011 (on `/ws` one task pings every
connection, `websocket.client`; a spliced relay has none: its pings are end to
end, `websocket.splice`); a `/ws` client more than WS_SEND_QUEUE
messages behind a full socket buffer is closed with 1013; beyond WS_MAX_CONNECTIONS the
upgrade is refused with HTTP 503; SIGTERM closes every connection with 1001.
"""

from __future__ import annotations

import asyncio
import contextvars
from dataclasses import dataclass, field
from typing import Any, TypeAlias

import redis.asyncio as aioredis
from sanic import HTTPResponse, Request, Sanic
from sanic.config import Config
from sanic.response import json as json_response
from sanic.server.websockets.impl import WebsocketImplProtocol

from common.aio import cancel_and_wait
from common.client import RpcClient
from common.clientip import Network, parse_networks
from common.connection import connect_configured
from common.credentials import Authenticator, Principal
from common.errors import Unauthorized, shortened
from common.forwarding import PROXY_LOOP, headers_credential_fault, via_loop
from common.http_head import head_fault
from common.log_budget import LogBudgets
from common.policy import PolicyWatcher, RetryBudgetPolicy
from common.redis_failures import REDIS_DOWN_OR_REFUSING, check_writable, redis_failure
from common.registry_view import RegistryView
from common.router import MethodRouter
from common.settings import Settings, get_settings
from common.strict_http import StrictRequest
from websocket.auth import SUBPROTOCOL, authenticate, presented_token
from websocket.client import ClientProtocol, keepalive
from websocket.connections import TRY_AGAIN_LATER, Connections
from websocket.envelope import stream_endpoint
from websocket.errors import JsonErrorHandler, http_refusals, log_close, refusal
from websocket.hub import ChannelHub
from websocket.relay import admit_relay, proxy_endpoint
from websocket.route_kinds import RouteKind, route_kind
from websocket.session import Session
from websocket.upstreams import Upstreams


@dataclass
class WsContext:
    settings: Settings
    # Peers whose X-Forwarded-For is believed (`TRUSTED_PROXIES`, as at the gateway).
    trusted_proxies: tuple[Network, ...] = ()
    connections: Connections = field(init=False)
    redis: aioredis.Redis = field(init=False)
    rpc: RpcClient = field(init=False)
    view: RegistryView = field(init=False)
    policy: PolicyWatcher = field(init=False)
    upstreams: Upstreams = field(init=False)
    hub: ChannelHub = field(init=False)
    authenticator: Authenticator = field(init=False)
    # Refusal log lines, bounded per client address (`websocket.errors`).
    refusals: LogBudgets = field(init=False)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)


WsApp: TypeAlias = Sanic[Config, WsContext]
MAX_REQUEST_BODY = 1024
# The routes that open connections to instances with the client's fields (`_relayed`).
_RELAYING = frozenset({RouteKind.RELAY, RouteKind.STREAM})
WsRequest: TypeAlias = Request[WsApp, Any]


def create_app(settings: Settings | None = None, name: str = "websocket") -> WsApp:
    settings = settings or get_settings()
    config = Config()
    config.WEBSOCKET_MAX_SIZE = settings.ws_max_message_bytes
    # No route here takes a body (an upgrade has none, RFC 6455 §4.1; /health is a GET):
    # a larger one is a 413 at its head, not up to Sanic's 100 MB read into memory
    # before the credential check. A small one, which some clients send, is read and dropped.
    config.REQUEST_MAX_SIZE = MAX_REQUEST_BODY
    # Sanic annotates these as int but takes seconds as any number.
    config.WEBSOCKET_PING_INTERVAL = settings.ws_ping_interval  # type: ignore[assignment]
    config.WEBSOCKET_PING_TIMEOUT = settings.ws_ping_timeout  # type: ignore[assignment]
    config.GRACEFUL_SHUTDOWN_TIMEOUT = settings.ws_drain_timeout
    # A request head, or a body, that stalls this long is a 408 (`common.strict_http`).
    config.REQUEST_TIMEOUT = settings.request_timeout  # type: ignore[assignment]
    # And a head that has not all come this long after it began (0: REQUEST_TIMEOUT).
    config.REQUEST_HEAD_TIMEOUT = settings.request_head_timeout
    ctx = WsContext(settings=settings, trusted_proxies=parse_networks(settings.trusted_proxies))
    ctx.connections = Connections(settings.ws_max_connections)
    ctx.refusals = http_refusals(settings.log_refusals_per_client)
    app: WsApp = Sanic(
        name,
        config=config,
        ctx=ctx,
        configure_logging=False,
        error_handler=JsonErrorHandler(),
        request_class=StrictRequest,
        router=MethodRouter(),  # HEAD where GET is, 405s with `Allow` (`common.router`)
    )
    # Each route declares its kind (`websocket.route_kinds`), which is how the rest
    # of the service tells them apart.
    app.add_route(health, "/health", methods=["GET"], ctx_kind=RouteKind.PLAIN)
    # Counted by the connection itself (`websocket.client`): the handler returns at once.
    # Strict: `/ws/` is not `/ws` (the connection take-over and first-message auth are
    # `/ws`'s alone; `/ws/` was upgraded, then closed at once).
    app.add_websocket_route(client_endpoint, "/ws", subprotocols=[SUBPROTOCOL],
                            strict_slashes=True, ctx_kind=RouteKind.CLIENTS)  # fmt: skip
    # Every route takes the `bearer` subprotocol: how a browser presents its credential.
    bearer = [SUBPROTOCOL]
    app.add_websocket_route(_counted(stream_endpoint), "/ws/stream", subprotocols=bearer,
                            ctx_kind=RouteKind.STREAM)  # fmt: skip
    app.add_websocket_route(_counted(proxy_endpoint), "/ws/proxy/<service:str>",
                            subprotocols=bearer, ctx_kind=RouteKind.RELAY)  # fmt: skip
    app.add_websocket_route(_counted(proxy_endpoint), "/ws/proxy/<service:str>/<path:path>",
                            name="proxy_path", subprotocols=bearer,
                            ctx_kind=RouteKind.RELAY)  # fmt: skip
    app.register_middleware(_check_head, "request")
    app.register_middleware(_admit, "request")
    app.register_listener(_open, "before_server_start")
    app.register_listener(_drain, "before_server_stop")
    app.register_listener(_close, "after_server_stop")
    return app


async def _open(app: WsApp) -> None:
    ctx, settings = app.ctx, app.ctx.settings
    ctx.redis = connect_configured(settings, name="websocket")
    ctx.rpc = RpcClient(redis=ctx.redis, settings=settings)
    await ctx.rpc.start()
    ctx.view = RegistryView(ctx.redis, recovery_grace=settings.heartbeat_ttl)
    await ctx.view.start()
    ctx.policy = PolicyWatcher(ctx.redis)
    await ctx.policy.start()
    ctx.upstreams = Upstreams(
        ctx.view,
        ctx.policy,
        connect_timeout=settings.proxy_connect_timeout,
        max_size=settings.ws_max_message_bytes,
        retry_budget=RetryBudgetPolicy.from_settings(settings),
    )
    ctx.hub = ChannelHub(ctx.redis)
    ctx.authenticator = Authenticator(
        ctx.redis,
        configured_secret=settings.jwt_secret,
        api_key_cache_ttl=settings.api_key_cache_ttl,
        api_key_stale_if_error=settings.api_key_stale_if_error,
    )
    await ctx.authenticator.start()
    ctx.connections.follow(ctx.authenticator.revocations)
    ctx.tasks.append(asyncio.create_task(ctx.policy.run(), name="policy-watcher"))
    if settings.ws_ping_interval > 0:
        pings = keepalive(ctx.connections, settings.ws_ping_interval, settings.ws_ping_timeout)
        ctx.tasks.append(asyncio.create_task(pings, name="ws-keepalive"))


async def _drain(app: WsApp) -> None:
    await app.ctx.connections.drain(app.ctx.settings.ws_drain_timeout)


async def _close(app: WsApp) -> None:
    app.ctx.refusals.flush()  # the counts of refusals not logged yet
    for task in app.ctx.tasks:
        await cancel_and_wait(task)
    await app.ctx.policy.close()
    await app.ctx.hub.close()
    await app.ctx.authenticator.close()
    await app.ctx.view.close()
    await app.ctx.rpc.close()
    await app.ctx.redis.aclose()


async def _check_head(request: WsRequest) -> HTTPResponse | None:
    """Refuse a head with what HTTP does not allow (`common.http_head`), or with
    ambiguous credential fields (`common.forwarding.credential_fault`: a relay's upstream
    must get the credential checked, no other), as the gateway does, before anything
    reads it; and, as the gateway does, a request to be relayed to an instance that has
    come through the gateway `MAX_VIA_HOPS` times already (`common.forwarding.via_loop`:
    a relay's upstream that leads back here would otherwise loop, each hop adding its
    `Via`). Other routes answer as they would without the `Via` field."""
    fault = head_fault(request.head)
    if fault is not None:
        request.stream.keep_alive = False  # type: ignore[union-attr]  # its framing is suspect
        return refusal(request, 400, "malformed_header", fault)
    fault = headers_credential_fault(request.headers)
    if fault is not None:
        return refusal(request, 400, "malformed_header", fault)
    if _relayed(request) and via_loop(request.headers.getall("via", None)):
        return refusal(request, 508, "proxy_loop", PROXY_LOOP)
    return None


def _relayed(request: WsRequest) -> bool:
    """Whether `request` is to a route that opens connections to instances for the
    client, with its fields (`websocket.handshake`): `/ws/proxy/...` and `/ws/stream`."""
    return route_kind(request) in _RELAYING


async def _admit(request: WsRequest) -> HTTPResponse | None:
    """Refuse an upgrade before it happens: 503 when full, 401 for a missing or bad
    credential (on `/ws` it may instead come as the first message), 403 for a
    relay to a service the credential's scopes do not reach, then a relay's path
    (400 `invalid_path`) or unknown service (404 `unknown_service`: `admit_relay`).
    A request no route took gets the router's answer whatever its credential, as at
    the gateway: a wrong method its 405 (`common.router`), an unknown path its 404,
    a head Sanic could not parse its parse error (400). Sanic runs this middleware
    before those answers too, with no route, and no handler runs for them."""
    kind = route_kind(request)
    if request.route is None or kind is RouteKind.PLAIN:
        return None
    ctx = request.app.ctx
    if ctx.connections.full():
        return refusal(
            request, 503, "too_many_connections", "connection limit reached, retry later"
        )
    request.ctx.principal = None
    token = presented_token(request)
    if token is None:
        if kind is RouteKind.CLIENTS:
            return None
        return refusal(
            request, 401, "unauthorized", "credentials required: a bearer token or an API key"
        )
    try:
        principal = await authenticate(ctx.authenticator, token)
    except Unauthorized as exc:
        return refusal(request, 401, "unauthorized", exc.message)
    request.ctx.principal = principal
    service = request.match_info.get("service")
    if not isinstance(service, str):
        return None
    if not principal.allows(service, None):
        return refusal(
            request,
            403,
            "forbidden",
            f"this credential's scopes do not include {shortened(service)}",
        )
    return admit_relay(request, service)


def _counted(handler: Any) -> Any:
    """`handler` counted against the connection cap (closed with 1013 past it); a
    connection it closes other than normally is logged (`log_close`)."""

    async def counted(request: WsRequest, ws: WebsocketImplProtocol, **params: Any) -> None:
        connections = request.app.ctx.connections
        try:
            if not connections.add(ws):
                await ws.close(TRY_AGAIN_LATER, "connection limit reached")
                return
            principal = getattr(request.ctx, "principal", None)
            if principal is not None:
                connections.authenticated(ws, principal)
            try:
                await handler(request, ws, **params)
            finally:
                connections.discard(ws)
        finally:
            close = ws.ws_proto.close_sent  # None once spliced: the splice logs its own
            relayed = getattr(request.ctx, "close_relayed", False)  # see `proxy_endpoint`
            if close is not None and not ws.ws_proto.close_rcvd_then_sent and not relayed:
                log_close(request.path, close.code, close.reason)

    counted.__name__ = handler.__name__  # (Sanic names a route after its handler)
    return counted


async def health(request: WsRequest) -> HTTPResponse:
    """200 when Redis takes writes within a second, 503 with the failure's kind
    (`common.redis_failures`) otherwise; with the open connections."""
    connections = len(request.app.ctx.connections)
    try:
        async with asyncio.timeout(1.0):
            await check_writable(request.app.ctx.redis)
    except REDIS_DOWN_OR_REFUSING as exc:
        if (kind := redis_failure(exc)) is None:
            raise  # an error reply of no known kind: a 500, logged as such
        down = {"status": "degraded", "redis": {"ok": False, "error": kind}}
        return json_response({**down, "connections": connections}, 503)
    body: dict[str, Any] = {"status": "ok", "redis": {"ok": True}, "connections": connections}
    body["policy_version"] = request.app.ctx.policy.current.version  # the one applied here
    return json_response(body)


async def client_endpoint(request: WsRequest, ws: WebsocketImplProtocol) -> None:
    """An authenticated client: its connection is taken from Sanic (`websocket.client`; it
    needs the `websocket.protocol.BearerProtocol` that `python -m websocket` runs) and
    served by callbacks (`websocket.session`). Returns without awaiting anything."""
    ctx = request.app.ctx
    settings = ctx.settings
    taken = ClientProtocol.take_over(ws, settings.ws_max_message_bytes, settings.ws_send_queue)
    if taken is None:  # the client is already gone
        return
    conn, early = taken
    # Not in this handler's context: Sanic's holds the request, which every timer and
    # task made here would keep alive for as long as the connection lasts.
    contextvars.Context().run(_serve, ctx, conn, early, request.ctx.principal)


def _serve(ctx: WsContext, conn: ClientProtocol, early: bytes, principal: Principal | None) -> None:
    session = conn.session = Session(ctx, conn)
    if not ctx.connections.add(conn, conn):
        conn.fail(TRY_AGAIN_LATER, "connection limit reached")
        return
    if principal is not None:
        session.authenticated(principal, reply=False)
    else:
        session.wait_for_auth()
    if early:
        conn.data_received(early)
