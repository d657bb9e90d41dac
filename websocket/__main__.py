"""`python -m websocket`: serve the WebSocket service on BIND_HOST:WEBSOCKET_PORT."""

from __future__ import annotations

from common.sanic_main import serve
from websocket.app import create_app
from websocket.protocol import BearerProtocol

if __name__ == "__main__":
    serve(
        "websocket",
        create_app,
        lambda settings: settings.websocket_port,
        lambda settings: {"protocol": BearerProtocol},
        port_setting="WEBSOCKET_PORT",
    )
