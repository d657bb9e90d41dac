"""`GET /health`: does Redis take writes, and how many live instances each service has."""

from __future__ import annotations

import asyncio
from typing import Any

from sanic import Blueprint, HTTPResponse

from common.redis_failures import REDIS_DOWN_OR_REFUSING, check_writable, redis_failure
from webapi.access import public
from webapi.context import GatewayRequest
from webapi.responses import json_response

bp = Blueprint("health")

_REDIS_CHECK_TIMEOUT = 1.0


@bp.get("/health", ctx_access=public("gateway", "health"))
async def health(request: GatewayRequest) -> HTTPResponse:
    """200 with per-service live instance counts when Redis takes writes; 503 with the
    failure's kind (`common.redis_failures`: `unreachable`, `out_of_memory`...) otherwise."""
    registry = request.app.ctx.registry
    try:
        async with asyncio.timeout(_REDIS_CHECK_TIMEOUT):
            await check_writable(request.app.ctx.redis)
            live = await registry.live_ids_by_service(await registry.service_names())
            services = {name: {"live": len(ids), "instances": ids} for name, ids in live.items()}
    except REDIS_DOWN_OR_REFUSING as exc:
        if (kind := redis_failure(exc)) is None:
            raise  # an error reply of no known kind (bad data): a 500, logged as such
        down = {"status": "degraded", "redis": {"ok": False, "error": kind}}
        return json_response(down, status=503)
    body: dict[str, Any] = {"status": "ok", "redis": {"ok": True}, "services": services}
    body["policy_version"] = request.app.ctx.policy.current.version  # the one applied here
    return json_response(body)
