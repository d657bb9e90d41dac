"""Register and log in, over the `auth` service. Access control comes with its own issue."""

from __future__ import annotations

from sanic import Blueprint, HTTPResponse

from webapi.context import GatewayRequest
from webapi.requests import json_object
from webapi.responses import json_response

bp = Blueprint("auth", url_prefix="/api/v1/auth")


@bp.post("/register")
async def register(request: GatewayRequest) -> HTTPResponse:
    body = json_object(request, empty_ok=False)
    result = await request.app.ctx.rpc.invoke(
        "auth.register",
        kwargs={"username": body.get("username"), "password": body.get("password")},
    )
    return json_response(result, status=201)


@bp.post("/login")
async def login(request: GatewayRequest) -> HTTPResponse:
    body = json_object(request, empty_ok=False)
    result = await request.app.ctx.rpc.invoke(
        "auth.login",
        kwargs={"username": body.get("username"), "password": body.get("password")},
    )
    return json_response(result)
