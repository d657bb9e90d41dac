"""`python -m webapi`: serve the gateway on BIND_HOST:WEBAPI_PORT."""

from __future__ import annotations

from common.sanic_main import serve
from webapi.app import create_app

if __name__ == "__main__":
    serve("webapi", create_app, lambda settings: settings.webapi_port)
