"""`POST /heartbeat`: HTTP/WebSocket backends register (and stay registered) here."""

from __future__ import annotations

from sanic import Blueprint, HTTPResponse

from webapi.access import requires
from webapi.context import GatewayRequest
from webapi.heartbeats import parse_heartbeat
from webapi.requests import json_object
from webapi.responses import json_response

bp = Blueprint("heartbeat")


@bp.post("/heartbeat", ctx_access=requires("registry", "heartbeat"))
async def heartbeat(request: GatewayRequest) -> HTTPResponse:
    body = json_object(request, empty_ok=False)
    records = parse_heartbeat(body, request.app.ctx.settings.webapi_port)
    registry = request.app.ctx.registry
    if body.get("leaving") is True:
        for record in records:
            await registry.deregister(record.service, record.instance_id)
        return json_response({"deregistered": [r.instance_id for r in records]})
    for record in records:
        await registry.heartbeat(record)
    ttl = request.app.ctx.settings.heartbeat_ttl
    return json_response({"registered": [r.instance_id for r in records], "ttl": ttl})
