"""`python -m webapi`: serve the gateway on BIND_HOST:WEBAPI_PORT."""

from __future__ import annotations

from typing import Any

from common.sanic_main import serve
from common.settings import get_settings
from webapi.app import create_app
from webapi.fastpath import FastPathProtocol
from webapi.lingering import LingeringHttpProtocol

if __name__ == "__main__":
    # Both close connections lingering (webapi.lingering); the fast path also answers
    # plain /svc/ requests and splices pass-through routes itself.
    fast = get_settings().proxy_fast_path
    options: dict[str, Any] = {"protocol": FastPathProtocol if fast else LingeringHttpProtocol}
    serve("webapi", create_app, lambda settings: settings.webapi_port, **options)
