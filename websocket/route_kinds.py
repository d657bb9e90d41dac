"""What each route of the service is (`RouteKind`), declared where the route is added
(`ctx_kind=`, into Sanic's route context) and read from the route a request took
(`route_kind`): the one classification that the admission and the `Via` loop check
(`websocket.app`), the tap (`websocket.tap`) and the relay's upstream connected before
the upgrade (`websocket.protocol`) read.

A route that declares none is admitted as one that needs a credential with its
upgrade (`websocket.app._admit`), and is neither tapped nor relayed: as the gateway
takes an undeclared route for its most restrictive access, a new route cannot be
opened to everyone by omission."""

from __future__ import annotations

import enum
from typing import Any

from sanic import Request


class RouteKind(enum.Enum):
    """A route of the service, by what it does with a connection."""

    PLAIN = "plain"  # an HTTP route (`/health`): no credential, no upgrade
    CLIENTS = "clients"  # `/ws`: taken over by `websocket.client`; a credential may come late
    STREAM = "stream"  # `/ws/stream`: envelopes relayed to instances with the client's fields
    RELAY = "relay"  # `/ws/proxy/...`: relayed to an instance, held for `websocket.splice`


def route_kind(request: Request[Any, Any]) -> RouteKind | None:
    """The kind of the route `request` took; None when it took none (the router refused
    it) or the route declares none."""
    route = request.route
    if route is None:
        return None
    kind: RouteKind | None = getattr(route.ctx, "kind", None)
    return kind
