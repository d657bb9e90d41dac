"""Accounts over the `auth` service: register, login, refresh, logout, who am I, API keys.

Register, login and refresh are public (the refresh token is its own
credential) and rate-limited per client IP by the default policy; they pass
that IP on to the auth service's throttle (a login's failures are counted per
address; the address of a registration or a refresh is known as the user's). Everything
else acts for the authenticated caller: the gateway passes the caller's user
id and session id from the verified credential, never from the body.
"""

from __future__ import annotations

from typing import Any

from sanic import Blueprint, HTTPResponse

from common.credentials import Principal
from webapi.access import call_rpc, caller, own, public, requires
from webapi.context import GatewayRequest
from webapi.errors import MalformedJson, NotAllowed
from webapi.requests import json_object
from webapi.responses import json_response

bp = Blueprint("auth", url_prefix="/api/v1/auth")


async def _auth(request: GatewayRequest, method: str, **kwargs: Any) -> Any:
    return await call_rpc(request, f"auth.{method}", kwargs)


def _user_session(request: GatewayRequest) -> Principal:
    """The caller, who must be a user signed in with a token (not an API key)."""
    principal = caller(request)
    if principal.kind != "user":
        raise NotAllowed("API keys cannot manage accounts or keys: sign in with a user token")
    return principal


@bp.post("/register", ctx_access=public("auth", "register"))
async def register(request: GatewayRequest) -> HTTPResponse:
    """A new user. The client's address goes with it, as with a login: the auth
    service knows it as the user's, so the throttle's account-wide lock spares it."""
    body = json_object(request, empty_ok=False)
    result = await _auth(
        request,
        "register",
        username=body.get("username"),
        password=body.get("password"),
        address=request.app.ctx.gate.client_ip(request),
    )
    return json_response(result, status=201)


@bp.post("/login", ctx_access=public("auth", "login"))
async def login(request: GatewayRequest) -> HTTPResponse:
    """Tokens for a username and password. The client's address (read as the rate
    limits read it) goes with them: the auth service counts failed logins per
    username and address, so strangers elsewhere do not lock the owner's address (the
    account-wide backstop spares only the addresses known as the user's).

    The answer's `device_token`, sent back as the body's `device_token` at the
    user's next login, counts that login per device instead, so strangers at the
    same address (a NAT) do not lock the owner's device. It travels in the JSON
    body, as the refresh token does: the gateway sets no cookies (nor knows the
    scheme a TLS-terminating proxy saw, to mark one `Secure`), and every client
    (CLI, app, browser script) keeps it as it keeps the refresh token."""
    body = json_object(request, empty_ok=False)
    # Named only when sent: an auth worker from before device tokens refuses the name.
    device = {"device_token": body["device_token"]} if "device_token" in body else {}
    result = await _auth(
        request,
        "login",
        username=body.get("username"),
        password=body.get("password"),
        address=request.app.ctx.gate.client_ip(request),
        **device,
    )
    return json_response(result)


@bp.post("/refresh", ctx_access=public("auth", "refresh"))
async def refresh(request: GatewayRequest) -> HTTPResponse:
    """A new access token and a new refresh token for a refresh token (used once). The
    client's address goes with it: a valid one keeps the address known as the user's."""
    body = json_object(request, empty_ok=False)
    result = await _auth(
        request,
        "refresh",
        refresh_token=body.get("refresh_token"),
        address=request.app.ctx.gate.client_ip(request),
    )
    return json_response(result)


@bp.post("/logout", ctx_access=own("auth", "logout"))
async def logout(request: GatewayRequest) -> HTTPResponse:
    """Ends the caller's session: its refresh token and access tokens stop working."""
    principal = _user_session(request)
    if not principal.session_id:
        raise MalformedJson("this token belongs to no session")
    return json_response(await _auth(request, "logout", session_id=principal.session_id))


@bp.get("/me", ctx_access=own("auth", "me"))
async def me(request: GatewayRequest) -> HTTPResponse:
    principal = caller(request)
    account = await _auth(request, "me", user_id=principal.subject)
    credential: dict[str, Any] = {"kind": principal.kind, "scopes": sorted(principal.scopes)}
    if principal.key_id:
        credential["key_id"] = principal.key_id
    return json_response({**account, "credential": credential})


@bp.post("/keys", ctx_access=requires("auth", "create_api_key"))
async def create_key(request: GatewayRequest) -> HTTPResponse:
    """A new API key, shown once in the answer (only its hash is kept)."""
    principal = _user_session(request)
    body = json_object(request, empty_ok=False)
    result = await _auth(
        request,
        "create_api_key",
        user_id=principal.subject,
        name=body.get("name"),
        scopes=body.get("scopes"),
        expires_in=body.get("expires_in"),
    )
    return json_response(result, status=201)


@bp.get("/keys", ctx_access=requires("auth", "list_api_keys"))
async def list_keys(request: GatewayRequest) -> HTTPResponse:
    principal = _user_session(request)
    return json_response({"keys": await _auth(request, "list_api_keys", user_id=principal.subject)})


@bp.delete("/keys/<key_id:str>", ctx_access=requires("auth", "delete_api_key"))
async def delete_key(request: GatewayRequest, key_id: str) -> HTTPResponse:
    principal = _user_session(request)
    return json_response(
        await _auth(request, "delete_api_key", user_id=principal.subject, key_id=key_id)
    )
