"""`create_app()`: the gateway's app factory (design §6).

Long-lived resources (the Redis pool, the RPC client, the registry view) are
opened in `before_server_start` onto the typed `app.ctx` and closed in
`after_server_stop`; handlers stay thin and delegate to RPC services.

The request middleware (request id, head check, access check: `_prepare`) runs
before the request's body is read: Sanic reads a whole body before its request
middleware, so a request the access check refuses (no credential) waited for its
body first, and a client that never sent it held the connection until a timeout.
`GatewayRequestClass.receive_body` runs it first; it runs once per request.
"""

from __future__ import annotations

import asyncio
from typing import cast

from sanic import Sanic
from sanic.config import Config
from sanic.response import BaseHTTPResponse

from common.aio import cancel_and_wait
from common.client import RpcClient
from common.clientip import parse_networks
from common.connection import connect_configured
from common.credentials import Authenticator
from common.log import request_id_var
from common.policy import PolicyWatcher, RetryBudgetPolicy
from common.ratelimit import RateLimiter
from common.registry import Registry
from common.registry_view import RegistryView
from common.router import MethodRouter
from common.sanic_main import UNPARSED_METHOD
from common.settings import Settings, get_settings
from common.strict_http import StrictRequest
from webapi.access import Gatekeeper, rate_limit_headers
from webapi.blueprints import api
from webapi.context import GatewayApp, GatewayContext, GatewayRequest
from webapi.errors import JsonErrorHandler, error_logs
from webapi.proxy.forward import Proxy
from webapi.proxy.health import ActiveChecker
from webapi.proxy.upstream import UpstreamPool
from webapi.requests import check_head, request_id_from

# Bodies larger than this are refused with 413 before they are read (RPC/REST JSON).
MAX_BODY_BYTES = 1024 * 1024


def create_app(settings: Settings | None = None, name: str = "webapi") -> GatewayApp:
    """Build the gateway app; nothing connects until the server starts."""
    settings = settings or get_settings()
    config = Config()
    config.REQUEST_MAX_SIZE = MAX_BODY_BYTES
    # A request head, or a body, that stalls this long is a 408 (`common.strict_http`).
    config.REQUEST_TIMEOUT = settings.request_timeout  # type: ignore[assignment]
    # And a head that has not all come this long after it began (0: REQUEST_TIMEOUT).
    config.REQUEST_HEAD_TIMEOUT = settings.request_head_timeout
    config.FALLBACK_ERROR_FORMAT = "json"
    # How long requests under way may take to finish once SIGTERM arrives (Sanic's 15 s).
    config.GRACEFUL_SHUTDOWN_TIMEOUT = settings.shutdown_grace
    # The app's own error log budgets (`webapi.errors`), with its settings' limit.
    ctx = GatewayContext(settings=settings,
                         error_logs=error_logs(settings.log_refusals_per_client))  # fmt: skip
    app: GatewayApp = Sanic(
        name,
        config=config,
        ctx=ctx,
        error_handler=JsonErrorHandler(),
        request_class=GatewayRequestClass,
        router=MethodRouter(),
        configure_logging=False,
    )
    app.blueprint(api)
    app.register_listener(_open_resources, "before_server_start")
    app.register_listener(_close_resources, "after_server_stop")
    app.register_middleware(_prepare, "request")
    app.register_middleware(_decorate_response, "response")
    return app


async def _open_resources(app: GatewayApp) -> None:
    ctx = app.ctx
    ctx.redis = connect_configured(ctx.settings, name="webapi")
    ctx.registry = Registry(ctx.redis, ctx.settings.heartbeat_ttl)
    ctx.rpc = RpcClient(redis=ctx.redis, settings=ctx.settings)
    await ctx.rpc.start()
    ctx.view = RegistryView(ctx.redis, recovery_grace=ctx.settings.heartbeat_ttl)
    await ctx.view.start()
    ctx.policy = PolicyWatcher(ctx.redis)
    await ctx.policy.start()
    settings = ctx.settings
    # Idle connections kept per upstream: above the concurrency we expect per
    # instance, or a burst closes and reopens connections (seen in bench-proxy at 32).
    pool = UpstreamPool(
        connect_timeout=settings.proxy_connect_timeout,
        read_timeout=settings.proxy_timeout,
        max_idle_per_host=256,
    )
    ctx.proxy = Proxy(
        ctx.view,
        pool,
        ctx.policy,
        timeout=settings.proxy_timeout,
        least_time_decay=settings.least_time_decay,
        retry_budget=RetryBudgetPolicy.from_settings(settings),
        max_body=settings.proxy_max_body,
        total_timeout=settings.proxy_total_timeout or None,
    )
    authenticator = Authenticator(
        ctx.redis,
        configured_secret=settings.jwt_secret,
        api_key_cache_ttl=settings.api_key_cache_ttl,
        api_key_stale_if_error=settings.api_key_stale_if_error,
    )
    await authenticator.start()
    ctx.gate = Gatekeeper(
        authenticator,
        RateLimiter(ctx.redis, on_redis_down=settings.rate_limit_on_redis_down),
        ctx.policy,
        parse_networks(settings.trusted_proxies),
    )
    checker = ActiveChecker(ctx.view, ctx.proxy.book)
    ctx.extra["checker"] = checker
    ctx.extra["tasks"] = [
        asyncio.create_task(ctx.policy.run(), name="policy-watcher"),
        asyncio.create_task(checker.run(), name="active-health"),
    ]


async def _close_resources(app: GatewayApp) -> None:
    # First, as the websocket service does: no request comes any more, and a close step
    # below that fails must not lose the counts of error lines not logged yet.
    app.ctx.error_logs.flush()
    for task in app.ctx.extra.get("tasks", []):
        await cancel_and_wait(task)
    await app.ctx.extra["checker"].close()
    await app.ctx.policy.close()
    await app.ctx.gate.limiter.close()
    await app.ctx.gate.authenticator.close()
    await app.ctx.proxy.pool.close()
    await app.ctx.view.close()
    await app.ctx.rpc.close()
    await app.ctx.redis.aclose()


class GatewayRequestClass(StrictRequest):
    """The gateway's requests: the request middleware runs before the body is read (see
    the module docstring)."""

    __slots__ = ()

    async def receive_body(self) -> None:
        await _prepare(cast("GatewayRequest", self))
        await super().receive_body()  # type: ignore[no-untyped-call]


async def _prepare(request: GatewayRequest) -> None:
    """The request middleware, once per request (before its body is read, or as
    middleware): the request id, the head's check, then the access check. Sanic runs
    request middleware again for an error raised after it ran (and for a timeout); that
    call does nothing."""
    ctx = request.ctx
    if getattr(ctx, "prepared", False):
        return
    ctx.prepared = True
    request_id = request_id_from(request)
    ctx.request_id = request_id
    request_id_var.set(request_id)
    check_head(request)  # a head with what HTTP does not allow, before anything reads it
    # Credentials, scopes and rate limits (`webapi.access`) before any handler runs. Not
    # for the stand-in of an unparsed head: it has no headers to read, and the parse
    # error (400, 413...) is the answer, not a 401 for the missing credential.
    if request.method != UNPARSED_METHOD:
        await request.app.ctx.gate.admit(request)


async def _decorate_response(request: GatewayRequest, response: BaseHTTPResponse) -> None:
    request_id = getattr(request.ctx, "request_id", None)
    if request_id:
        response.headers["X-Request-Id"] = request_id
    decision = getattr(request.ctx, "rate", None)
    if decision is not None and response.status != 429:
        response.headers.update(rate_limit_headers(decision))
