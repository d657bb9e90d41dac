"""`MethodRouter`: Sanic's router, with HEAD served wherever GET is, for both Sanic
services (the gateway and the websocket service).

HTTP requires it (RFC 9110 §9.3.2: a server answers HEAD as it answers GET, without the
body), and Sanic's router does not do it by itself: a route declared GET gave HEAD a
405. A HEAD the router would refuse is routed as the GET of the same path; the handler
runs as for a GET and Sanic's HTTP/1.1 writer drops the body (`Http.head_only`), so
the headers are the GET's, Content-Length included. The route, and so its access
declaration, is the GET's: a HEAD needs what a GET needs. Not on a WebSocket route:
its GET is an upgrade (RFC 6455 §4.1), which a HEAD cannot be; a HEAD there is a 405
whose `Allow` is GET.

A method the path has no route for is a 405 whose `Allow` names the methods it has
(with HEAD wherever GET is), whatever the credential: neither service checks access for
a request no route took (`webapi.access.Gatekeeper.admit`, `websocket.app._admit`).
So is a request for the server as a whole (`OPTIONS *`), which neither answers (an
empty `Allow`).
"""

from __future__ import annotations

from typing import Any

from sanic.exceptions import MethodNotAllowed
from sanic.models.handler_types import RouteHandler
from sanic.router import Router
from sanic_routing.route import Route

from common.errors import shortened


class MethodRouter(Router):
    """Sanic's router, answering HEAD with the GET route (module docstring)."""

    def _get(
        self, path: str, method: str, host: str | None
    ) -> tuple[Route, RouteHandler, dict[str, Any]]:
        # (`Router.get`, which calls this, caches the answer by path, method and host.)
        if path == "*":  # asterisk-form (RFC 9112 §3.2.4): about the server as a whole
            raise MethodNotAllowed(
                f"{shortened(method)} * (the server as a whole) is not answered here",
                method=method,
                headers={"Allow": ""},  # (an empty Allow: no method, RFC 9110 §10.2.1)
            )
        try:
            return super()._get(path, method, host)
        except MethodNotAllowed as exc:
            allowed = set(exc.allowed_methods or ())
            get = super()._get(path, "GET", host) if "GET" in allowed else None
            if get is not None and not getattr(get[0].extra, "websocket", False):
                if method == "HEAD":
                    return get
                allowed.add("HEAD")
            message = f"{shortened(method)} is not allowed for {shortened(path)}"
            allow = sorted(allowed)
            raise MethodNotAllowed(message, method=method, allowed_methods=allow) from None
