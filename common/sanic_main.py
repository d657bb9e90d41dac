"""The one way our Sanic services (webapi, websocket) start: `python -m <service>`.

One process per container or replica, Sanic's worker manager off: scaling is by
replicas (design §9), and a single process keeps signals and shutdown simple.
Sanic is imported by the callers only; workers that do not install it never
import this module. A configuration error ends the process with one line on
stderr and exit status 1 (`common.settings.exit_on_config_error`), also when a
listener raises it while the server starts.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from common.errors import ConfigError
from common.log import setup_logging
from common.settings import Settings, exit_on_config_error, get_settings

# The method of the request Sanic makes up to answer a head it could not parse
# (`sanic.http.http1.Http.create_empty_request`). Request middleware still runs for it:
# an access check must let it through, or its 401 would replace the parse error (400).
UNPARSED_METHOD = "NONE"


def _not_a_config_error(record: logging.LogRecord) -> bool:
    """Drop Sanic's "Experienced exception while trying to serve" (with its traceback)
    for a `ConfigError`: `serve` reports that one itself, in one line."""
    return not (record.exc_info and isinstance(record.exc_info[1], ConfigError))


def serve(
    name: str,
    create_app: Callable[[Settings], Any],
    port: Callable[[Settings], int],
    options: Callable[[Settings], dict[str, Any]] | None = None,
) -> None:
    """Set up JSON logging, build the app from the settings and serve it until SIGTERM.

    What `options` derives from the settings goes to `app.run` (both services pass
    their `protocol`).
    """
    with exit_on_config_error(name):
        settings = get_settings()
        settings.require_redis_url()  # both services need it: say so before Sanic starts
        setup_logging(name, settings.log_level)
        logging.getLogger("sanic.error").addFilter(_not_a_config_error)
        app = create_app(settings)
        app.run(
            host=settings.bind_host,
            port=port(settings),
            single_process=True,
            access_log=False,
            motd=False,
            **(options(settings) if options else {}),
        )
