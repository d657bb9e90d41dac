"""The Sanic WebSocket service: `create_app()` builds it, `python -m websocket` serves it."""

from websocket.app import create_app

__all__ = ["create_app"]
