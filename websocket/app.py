"""`create_app()` for the WebSocket service: `/health` and a `/ws` endpoint.

This first cut answers pings; subscriptions, JSON-RPC and the streaming proxy
come with the websocket issue and build on the same app and context.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any, TypeAlias

import redis.asyncio as aioredis
from sanic import HTTPResponse, Request, Sanic
from sanic.config import Config
from sanic.response import json as json_response
from sanic.server.websockets.impl import WebsocketImplProtocol

from common.connection import REDIS_DOWN_OR_SLOW, connect
from common.settings import Settings, get_settings

# Frames larger than this close the connection with 1009 (message too big).
MAX_MESSAGE_BYTES = 64 * 1024


@dataclass
class WsContext:
    settings: Settings
    redis: aioredis.Redis = field(init=False)


WsApp: TypeAlias = Sanic[Config, WsContext]
WsRequest: TypeAlias = Request[WsApp, Any]


def create_app(settings: Settings | None = None, name: str = "websocket") -> WsApp:
    settings = settings or get_settings()
    config = Config()
    config.WEBSOCKET_MAX_SIZE = MAX_MESSAGE_BYTES
    config.FALLBACK_ERROR_FORMAT = "json"
    app: WsApp = Sanic(
        name, config=config, ctx=WsContext(settings=settings), configure_logging=False
    )
    app.add_route(health, "/health", methods=["GET"])
    app.add_websocket_route(ws_endpoint, "/ws")
    app.register_listener(_open, "before_server_start")
    app.register_listener(_close, "after_server_stop")
    return app


async def _open(app: WsApp) -> None:
    app.ctx.redis = connect(app.ctx.settings.require_redis_url(), name="websocket")


async def _close(app: WsApp) -> None:
    await app.ctx.redis.aclose()


async def health(request: WsRequest) -> HTTPResponse:
    """200 when Redis answers within a second, 503 otherwise."""
    try:
        async with asyncio.timeout(1.0):
            await request.app.ctx.redis.ping()
    except REDIS_DOWN_OR_SLOW as exc:
        return json_response({"status": "degraded", "redis": {"ok": False, "error": str(exc)}}, 503)
    return json_response({"status": "ok", "redis": {"ok": True}})


def reply_to(message: str | bytes) -> str | None:
    """The answer to one client message.

    `ping` -> `pong`; `{"type": "ping", "id": 1}` -> `{"type": "pong", "id": 1}`.
    """
    text = message.decode(errors="replace") if isinstance(message, bytes) else message
    if text.strip() == "ping":
        return "pong"
    try:
        data = json.loads(text)
    except ValueError:
        return _error("malformed_json", "not JSON")
    if not isinstance(data, dict) or data.get("type") != "ping":
        return _error("unknown_type", "expected a message of type ping")
    answer: dict[str, Any] = {"type": "pong"}
    if "id" in data:
        answer["id"] = data["id"]
    return json.dumps(answer)


def _error(code: str, message: str) -> str:
    return json.dumps({"type": "error", "error": {"code": code, "message": message}})


async def ws_endpoint(request: WsRequest, ws: WebsocketImplProtocol) -> None:
    async for message in ws:
        answer = reply_to(message)
        if answer is not None:
            await ws.send(answer)
