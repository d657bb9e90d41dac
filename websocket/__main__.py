"""`python -m websocket`: serve the WebSocket service on BIND_HOST:WEBSOCKET_PORT."""

from __future__ import annotations

from collections.abc import Callable

from common.sanic_main import serve
from common.settings import Settings
from websocket.app import WsApp, create_app
from websocket.protocol import BearerProtocol


def main(create: Callable[[Settings], WsApp] = create_app) -> None:
    """Serve the app `create` makes as the service is served (a test adds routes to it)."""
    serve(
        "websocket",
        create,
        lambda settings: settings.websocket_port,
        lambda settings: {"protocol": BearerProtocol},
        port_setting="WEBSOCKET_PORT",
    )


if __name__ == "__main__":
    main()
