"""`python -m webapi`: serve the gateway on BIND_HOST:WEBAPI_PORT."""

from __future__ import annotations

from common.log import setup_logging
from common.settings import get_settings
from webapi.app import create_app


def main() -> None:
    settings = get_settings()
    setup_logging("webapi", settings.log_level)
    app = create_app(settings)
    # One process per container/replica: scale with replicas, not Sanic's worker manager.
    app.run(
        host=settings.bind_host,
        port=settings.webapi_port,
        single_process=True,
        access_log=False,
        motd=False,
    )


if __name__ == "__main__":
    main()
