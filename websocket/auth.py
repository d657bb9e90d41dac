"""Authentication of `/ws` clients, verified locally by `common.credentials.Authenticator`.

A client presents its access token (from `POST /api/v1/auth/login`), or an API
key, in one of three ways:

1. `Authorization: Bearer <token>` on the upgrade request (servers, CLIs);
2. `Sec-WebSocket-Protocol: bearer, <token>` (browsers, which cannot set
   headers on a WebSocket): the server selects the `bearer` subprotocol;
3. a first message `{"type": "auth", "token": "<token>"}` within
   `WS_AUTH_TIMEOUT` seconds, answered with `{"type": "authenticated", ...}`.

A bad token in a header or subprotocol is refused before the upgrade (HTTP 401);
a bad, missing or late first message closes the connection with 1008. The
connection is closed with 1008 when its token (or API key) expires.
"""

from __future__ import annotations

from typing import Any

from sanic import Request

from common.credentials import Authenticator, Principal
from common.errors import Unauthorized
from common.scopes import channel_resource, rpc_resource

SUBPROTOCOL = "bearer"


def presented_token(request: Request[Any, Any]) -> str | None:
    """The credential of the upgrade request (`Authorization: Bearer`, `X-Api-Key` or the
    `bearer` subprotocol), or None if there is none."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    api_key = request.headers.get("x-api-key", "").strip()
    if api_key:
        return str(api_key)
    return subprotocol_token(request)


def subprotocol_token(request: Request[Any, Any]) -> str | None:
    """The credential in the `bearer` subprotocol (`Sec-WebSocket-Protocol: bearer,
    <token>`, first), or None."""
    offered = offered_subprotocols(request)
    if len(offered) >= 2 and offered[0].lower() == SUBPROTOCOL:
        return offered[1]
    return None


def offered_subprotocols(request: Request[Any, Any]) -> list[str]:
    """The subprotocols the client offers, in its order (every `Sec-WebSocket-Protocol`
    line, comma-separated): one reading for authentication, for selecting `bearer`
    (`offers_bearer`) and for what the relay's upstream is offered
    (`websocket.handshake.subprotocols_passed_on`)."""
    return [token.strip() for line in request.headers.getall("sec-websocket-protocol", [])
            for token in line.split(",") if token.strip()]  # fmt: skip


def offers_bearer(request: Request[Any, Any]) -> bool:
    """Whether the client offers the `bearer` subprotocol, anywhere in its offer (every
    line: `offered_subprotocols`), so that the server selects it
    (`websocket.protocol.BearerProtocol`)."""
    return any(p.lower() == SUBPROTOCOL for p in offered_subprotocols(request))


async def authenticate(authenticator: Authenticator, credential: object) -> Principal:
    """The client behind `credential` (from a header or a message), or `Unauthorized`."""
    if not isinstance(credential, str) or not credential:
        raise Unauthorized("token must be a non-empty string")
    return await authenticator.authenticate(credential)


def may_call(principal: Principal | None, method: str) -> bool:
    """Whether `principal`'s scopes reach the RPC method `service.method`."""
    if principal is None:
        return False
    service, _, name = method.partition(".")
    return principal.allows(*rpc_resource(service, name or None))


def may_subscribe(principal: Principal | None, channel: str) -> bool:
    """Whether `principal`'s scopes reach the push channel `channel` (its first segment's
    service, as `/svc/<service>/`: see `common.scopes.channel_resource`)."""
    return principal is not None and principal.allows(*channel_resource(channel))
