"""The one way our Sanic services (webapi, websocket) start: `python -m <service>`.

One process per container or replica, Sanic's worker manager off: scaling is by
replicas (design §9), and a single process keeps signals and shutdown simple.
Sanic is imported by the callers only; workers that do not install it never
import this module. A configuration error ends the process with one line on
stderr and exit status 1 (`common.settings.exit_on_config_error`), also when a
listener raises it while the server starts, and so does an address the server
cannot listen on (`check_listen`: BIND_HOST and the port).
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable
from typing import Any

from sanic.server.socket import bind_socket

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


def check_listen(host: str, port: int, port_setting: str) -> None:
    """`ConfigError` naming the setting unless a server can listen on `host`:`port`: a
    BIND_HOST that is neither an IP address nor a name this machine resolves, an address
    that is not this machine's, a port already taken. Checked by binding as Sanic will
    (`bind_socket`), then letting go: Sanic's own failure is a traceback that names
    neither setting."""
    try:
        sock = bind_socket(host, port)
    except (socket.gaierror, UnicodeError) as exc:
        reason = exc.strerror if isinstance(exc, socket.gaierror) else str(exc)
        raise ConfigError(
            f"BIND_HOST={host!r} is not valid: not an IP address or a host name this "
            f"machine resolves ({reason})"
        ) from None
    except OSError as exc:  # EADDRNOTAVAIL, EADDRINUSE, EACCES...
        raise ConfigError(
            f"cannot listen on BIND_HOST={host!r}, {port_setting}={port}: {exc.strerror or exc}"
        ) from None
    sock.close()


def serve(
    name: str,
    create_app: Callable[[Settings], Any],
    port: Callable[[Settings], int],
    options: Callable[[Settings], dict[str, Any]] | None = None,
    *,
    port_setting: str,
) -> None:
    """Set up JSON logging, build the app from the settings and serve it until SIGTERM.

    What `options` derives from the settings goes to `app.run` (both services pass
    their `protocol`); `port_setting` names the variable `port` reads, for errors.
    """
    with exit_on_config_error(name):
        settings = get_settings()
        settings.require_redis_url()  # both services need it: say so before Sanic starts
        check_listen(settings.bind_host, port(settings), port_setting)
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
