"""`python -m webapi`: serve the gateway on BIND_HOST:WEBAPI_PORT."""

from __future__ import annotations

from typing import Any

from common.sanic_main import serve
from common.settings import get_settings
from webapi.app import create_app
from webapi.fastpath import FastPathProtocol

if __name__ == "__main__":
    options: dict[str, Any] = {}
    if get_settings().proxy_fast_path:
        options["protocol"] = FastPathProtocol
    serve("webapi", create_app, lambda settings: settings.webapi_port, **options)
