"""`python -m webapi`: serve the gateway on BIND_HOST:WEBAPI_PORT."""

from __future__ import annotations

from typing import Any

from common.lingering import LingeringHttpProtocol
from common.sanic_main import serve
from common.settings import Settings
from webapi.app import create_app
from webapi.fastpath import FastPathProtocol


def _protocol(settings: Settings) -> dict[str, Any]:
    # Both close connections lingering (common.lingering); the fast path also answers
    # plain /svc/ requests and splices pass-through routes itself.
    return {"protocol": FastPathProtocol if settings.proxy_fast_path else LingeringHttpProtocol}


if __name__ == "__main__":
    serve("webapi", create_app, lambda settings: settings.webapi_port, _protocol,
          port_setting="WEBAPI_PORT")  # fmt: skip
