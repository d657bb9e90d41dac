"""`BearerProtocol`: the server protocol `python -m websocket` runs (Sanic's, with the
`bearer` subprotocol answered only to clients offering it, relayed clients held for
`websocket.splice` and a relay's upstream connected before its upgrade is answered)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sanic import Request
from websockets import http11
from websockets.datastructures import Headers

from websocket.auth import offers_bearer
from websocket.handshake import wire_value
from websocket.relay import connect_first, drop_untaken
from websocket.route_kinds import RouteKind, route_kind
from websocket.tap import TapServerProtocol


class BearerProtocol(TapServerProtocol):
    """Sanic's WebSocket protocol, answering the `bearer` subprotocol only to clients offering it
    (and tapping relayed clients for `websocket.splice`).

    A route's subprotocols are otherwise required of every client (websockets
    refuses a client offering none with 400), and a browser that offered
    `bearer, <token>` refuses a server that does not select one. A relayed client
    (`/ws/proxy/`) is answered with the subprotocol its upstream chose, connected
    first (`websocket.relay.connect_first`), else as any other.
    """

    @staticmethod
    def sanic_request_to_ws_request(request: Request[Any, Any]) -> http11.Request:
        """The upgrade request as `websockets` reads one: each value as the bytes received,
        read as ISO-8859-1 (`wire_value`). Sanic's own hands the values over as it read
        them, as UTF-8, and `websockets` refuses a surrogate escape (a byte that is not
        UTF-8) as no header value: a 500 where the head is one HTTP allows."""
        headers = Headers([(name, wire_value(value)) for name, value in request.headers.items()])
        return http11.Request(path=request.path, headers=headers)

    async def websocket_handshake(
        self, request: Request[Any, Any], subprotocols: Sequence[str] | None = None
    ) -> Any:
        relayed = route_kind(request) is RouteKind.RELAY
        chosen = await connect_first(request) if relayed else None
        if chosen is not None:
            subprotocols = [chosen]  # (one the client offered: the upstream was offered it)
        elif subprotocols and not offers_bearer(request):
            subprotocols = None
        try:
            return await super().websocket_handshake(request, subprotocols)
        except BaseException:
            drop_untaken(request)  # not upgraded: no handler will take a relay's upstream
            raise
