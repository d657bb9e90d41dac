"""The iptv catalogue as REST: channels, a channel, its programme guide, search; and the
caller's own favourites (the user is the credential's, never one the request names;
iptv itself refuses a caller naming another user, `microservices.iptv.service`)."""

from __future__ import annotations

from typing import Any

from sanic import Blueprint, HTTPResponse

from webapi.access import call_rpc, caller, requires
from webapi.context import GatewayRequest
from webapi.responses import json_response

bp = Blueprint("channels", url_prefix="/api/v1")


async def _iptv(request: GatewayRequest, method: str, **kwargs: Any) -> Any:
    """Call `iptv.<method>` for the request's caller."""
    return await call_rpc(request, f"iptv.{method}", kwargs)


def _query(request: GatewayRequest, **names: str) -> dict[str, Any]:
    """Query parameters renamed to RPC arguments; validation is the service's (422)."""
    return {arg: request.args.get(q) for q, arg in names.items() if request.args.get(q) is not None}


@bp.get("/channels", ctx_access=requires("iptv", "list_channels"))
async def list_channels(request: GatewayRequest) -> HTTPResponse:
    kwargs = _query(request, category="category", page="page", page_size="page_size")
    return json_response(await _iptv(request, "list_channels", **kwargs))


@bp.get("/channels/<channel_id:str>", ctx_access=requires("iptv", "get_channel"))
async def get_channel(request: GatewayRequest, channel_id: str) -> HTTPResponse:
    return json_response(await _iptv(request, "get_channel", channel_id=channel_id))


@bp.get("/channels/<channel_id:str>/epg", ctx_access=requires("iptv", "get_epg"))
async def get_epg(request: GatewayRequest, channel_id: str) -> HTTPResponse:
    kwargs = {"channel_id": channel_id, **_query(request, **{"from": "start", "to": "end"})}
    return json_response(await _iptv(request, "get_epg", **kwargs))


@bp.get("/categories", ctx_access=requires("iptv", "list_categories"))
async def list_categories(request: GatewayRequest) -> HTTPResponse:
    return json_response(await _iptv(request, "list_categories"))


@bp.get("/search", ctx_access=requires("iptv", "search"))
async def search(request: GatewayRequest) -> HTTPResponse:
    kwargs = {"q": request.args.get("q", ""), **_query(request, limit="limit")}
    return json_response(await _iptv(request, "search", **kwargs))


@bp.get("/favourites", ctx_access=requires("iptv", "list_favourites"))
async def list_favourites(request: GatewayRequest) -> HTTPResponse:
    return json_response(await _iptv(request, "list_favourites", user_id=caller(request).subject))


@bp.put("/favourites/<channel_id:str>", ctx_access=requires("iptv", "add_favourite"))
async def add_favourite(request: GatewayRequest, channel_id: str) -> HTTPResponse:
    user_id = caller(request).subject
    return json_response(
        await _iptv(request, "add_favourite", user_id=user_id, channel_id=channel_id)
    )


@bp.delete("/favourites/<channel_id:str>", ctx_access=requires("iptv", "remove_favourite"))
async def remove_favourite(request: GatewayRequest, channel_id: str) -> HTTPResponse:
    user_id = caller(request).subject
    return json_response(
        await _iptv(request, "remove_favourite", user_id=user_id, channel_id=channel_id)
    )
