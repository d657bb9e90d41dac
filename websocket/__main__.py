"""`python -m websocket`: serve the WebSocket service on BIND_HOST:WEBSOCKET_PORT."""

from __future__ import annotations

from common.log import setup_logging
from common.settings import get_settings
from websocket.app import create_app


def main() -> None:
    settings = get_settings()
    setup_logging("websocket", settings.log_level)
    app = create_app(settings)
    app.run(
        host=settings.bind_host,
        port=settings.websocket_port,
        single_process=True,
        access_log=False,
        motd=False,
    )


if __name__ == "__main__":
    main()
