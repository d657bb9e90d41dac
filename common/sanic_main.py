"""The one way our Sanic services (webapi, websocket) start: `python -m <service>`.

One process per container or replica, Sanic's worker manager off: scaling is by
replicas (design §9), and a single process keeps signals and shutdown simple.
Sanic is imported by the callers only; workers that do not install it never
import this module.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from common.log import setup_logging
from common.settings import Settings, get_settings

# The method of the request Sanic makes up to answer a head it could not parse
# (`sanic.http.http1.Http.create_empty_request`). Request middleware still runs for it:
# an access check must let it through, or its 401 would replace the parse error (400).
UNPARSED_METHOD = "NONE"


def serve(
    name: str,
    create_app: Callable[[Settings], Any],
    port: Callable[[Settings], int],
    **run_options: Any,
) -> None:
    """Set up JSON logging, build the app from the settings and serve it until SIGTERM.

    `run_options` go to `app.run` (the websocket service passes its `protocol`).
    """
    settings = get_settings()
    setup_logging(name, settings.log_level)
    app = create_app(settings)
    app.run(
        host=settings.bind_host,
        port=port(settings),
        single_process=True,
        access_log=False,
        motd=False,
        **run_options,
    )
