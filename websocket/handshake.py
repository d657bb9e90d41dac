"""The upstream's handshake on a client's behalf: what the relay (`/ws/proxy/`) and the
envelope mode (`/ws/stream`) send an instance when they open a connection to it.

The same fields as the gateway's HTTP proxy sends (`common.forwarding`): the client's
handshake fields, less

* the hop-by-hop ones (`Connection`, `Upgrade`, `Proxy-*`, those `Connection` names...)
  and those the client library writes itself for its own handshake (`Host`,
  `Sec-WebSocket-Key`, `-Version`, `-Extensions`; `Sec-WebSocket-Protocol` is
  `subprotocols_passed_on`'s);
* the client's API key (`X-Api-Key`, `Authorization: Bearer sbk_...`), as the gateway
  drops it: a backend never sees a reusable key. A bearer JWT in `Authorization`
  passes, as it does to the gateway's HTTP backends (short-lived; it tells the backend
  who the user is). The `bearer` subprotocol and the credential after it are never
  offered to the backend (`subprotocols_passed_on`: a subprotocol is no secret to a
  server, which may log it). A browser's JWT in it, the credential this service
  authenticated, reaches the backend as a header client's does, as `Authorization:
  Bearer <jwt>` (`subprotocol_credential`; not when the client sent an `Authorization`
  field of its own: that one passes as it is); an API key in it, never;

less the client's forwarding fields (`Forwarded`, every `X-Forwarded-*`, `X-Real-IP`,
`X-Client-IP`, `True-Client-IP`: they are the front door's, never the client's), and
less nothing else: a request with ambiguous credential fields (two `Authorization`, two
`X-Api-Key`, a bearer and an `X-Api-Key` that differ) never gets here (`websocket.app`
refuses it with 400), so the credential passed on is the one authenticated;

then `X-Forwarded-For` (the lines received, then the TCP peer), `-Proto`, `-Host`,
`X-Request-Id` (the client's when well formed, else a new one) and
`Via: 1.1 switchboard`. Cookies, `Origin`, `User-Agent`, `Accept-Language` and the
client's own `X-*` fields pass as sent: backends check them (sessions, CSRF origin
checks, tenant headers), as behind nginx. A credential never arrives in the query
string here (`websocket.auth`), so the target's query passes as it is.

Values pass byte for byte: Sanic reads a field as UTF-8 (surrogate escapes for
other bytes) and `websockets` writes one as ISO-8859-1, so each value is turned back
into the bytes received (`wire_value`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from common.balancing.sticky import balance_key
from common.clientip import request_client_ip
from common.forwarding import hop_headers_out
from common.request_ids import request_id_of
from websocket.auth import SUBPROTOCOL, presented_token, subprotocol_token

if TYPE_CHECKING:
    from websocket.app import WsRequest

# The fields of a WebSocket handshake that the client library writes for its own
# (`Host`, `Connection` and `Upgrade` are dropped by `hop_headers_out` already).
_LIBRARY_OWN = frozenset({"sec-websocket-key", "sec-websocket-version",
                          "sec-websocket-extensions", "sec-websocket-protocol",
                          "sec-websocket-accept"})  # fmt: skip


def upstream_headers(request: WsRequest) -> list[tuple[str, str]]:
    """The fields of the upstream's handshake for the client's upgrade `request`
    (module docstring), as `websockets` writes them (ISO-8859-1 strings).

    `request.ip` is the socket's peer. Not `request.scheme` nor `request.host`: they
    follow Sanic's own proxy settings, and `scheme` says `ws` on an upgrade; these are
    the gateway fast path's values (`http`/`https` from the socket, `Host` as sent)."""
    client = [*request.headers.items(), *subprotocol_credential(request)]
    tls = request.conn_info is not None and request.conn_info.ssl
    out = hop_headers_out(
        client,
        client_ip=request.ip,
        scheme="https" if tls else "http",
        host=request.headers.get("host", ""),
        request_id=request_id_of(request.headers.get("x-request-id")),
        upstream=None,  # `websockets` writes the instance's `Host`
        drop=_LIBRARY_OWN,
    )
    return [(name, wire_value(value)) for name, value in out]


def subprotocol_credential(request: WsRequest) -> list[tuple[str, str]]:
    """`Authorization: Bearer <jwt>` for a client whose credential, the one this service
    authenticated (`websocket.app`), is a JWT in the `bearer` subprotocol: the field a
    header client's JWT reaches the backend in (module docstring). None (an empty
    list) for an API key, a client with an `Authorization` field of its own, or a
    subprotocol token that is not the credential authenticated."""
    token = subprotocol_token(request)
    principal = getattr(request.ctx, "principal", None)
    if token is None or principal is None or principal.kind != "user":
        return []
    if "authorization" in request.headers or token != presented_token(request):
        return []
    return [("Authorization", f"Bearer {token}")]


def client_key(request: WsRequest, service: str) -> str | None:
    """The client's sticky key for `service` (`common.balancing.sticky`: the `hash`
    strategy's), under the service's `hash_on`. Its address is read as the gateway reads
    it (`common.clientip.request_client_ip`): the peer, or behind `TRUSTED_PROXIES` the
    right-most untrusted hop of `X-Forwarded-For`; never a header an untrusted peer
    wrote, nor Sanic's `remote_addr`, which believes any peer when Sanic's own proxy
    settings (`SANIC_REAL_IP_HEADER`, `SANIC_PROXIES_COUNT`) are set."""
    hash_on = request.app.ctx.upstreams.policy.hash_on(service)
    return balance_key(hash_on, request.headers.get, lambda: client_address(request))


def client_address(request: WsRequest) -> str:
    """The client's address as the gateway reads it (`common.clientip.request_client_ip`):
    the TCP peer, or behind `TRUSTED_PROXIES` the right-most untrusted hop of
    `X-Forwarded-For`. The sticky key's (`client_key`) and the refusal log's
    (`websocket.errors`)."""
    return request_client_ip(request.ip, request.headers.get_all, request.app.ctx.trusted_proxies)


def subprotocols_passed_on(offered: Sequence[str]) -> list[str]:
    """What the upstream is offered of the client's subprotocols `offered`: all but
    `bearer` and the credential that follows it (`bearer, <token>`: `websocket.auth`)."""
    passed: list[str] = []
    skip = False
    for token in offered:
        if skip:
            skip = False
        elif token.lower() == SUBPROTOCOL:
            skip = True
        else:
            passed.append(token)
    return passed


def wire_value(value: str) -> str:
    """`value` as Sanic read it (UTF-8, surrogate escapes) turned into the string that
    `websockets` writes as the same bytes (ISO-8859-1)."""
    if value.isascii():
        return value
    return value.encode("utf-8", "surrogateescape").decode("latin-1")


def sanic_value(value: str) -> str:
    """`value` as `websockets` read it (ISO-8859-1: an upstream's answer) turned into the
    string that Sanic writes as the same bytes (UTF-8, surrogate escapes): `wire_value`'s
    reverse."""
    if value.isascii():
        return value
    return value.encode("latin-1").decode("utf-8", "surrogateescape")
