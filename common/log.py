"""Structured logging: one JSON object per line, everywhere.

Every record carries the time, level, service, logger and message; the request
id of the current request or RPC call is added when there is one (it travels in
a context variable, so concurrent requests never mix ids). Extra fields passed
with `logger.info("...", extra={"fields": {...}})` are merged into the object.

The record's own keys (`RECORD_KEYS`) always win: `service` names the process that
wrote the line, so logs queried by service find every line of it. A line about
another service names that one `target_service`; a field that collides all the same
is kept as `<name>_field` (`service_field`), never dropped and never over the
record's own. (Merged over them, a proxy failure's `"service": "nlp"` made the
gateway's line read as nlp's, lost to a query for `webapi`.)
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import time
from typing import Any

request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "request_id", default=None
)

_service_name = "switchboard"

# The keys every line's object has of its own (`request_id` and `exc` when there are):
# a field of the same name cannot replace them (module docstring).
RECORD_KEYS = frozenset({"ts", "level", "service", "logger", "msg", "request_id", "exc"})


class JsonFormatter(logging.Formatter):
    """Formats a record as one JSON line."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "service": _service_name,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        request_id = request_id_var.get()
        if request_id:
            out["request_id"] = request_id
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            for name, value in fields.items():
                out[f"{name}_field" if name in RECORD_KEYS else name] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, ensure_ascii=False)


def setup_logging(service: str, level: str = "INFO") -> None:
    """Route every logger of the process (ours, Sanic's, redis-py's) to JSON lines on stderr."""
    global _service_name
    _service_name = service
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Sanic installs its own handlers on these; make them propagate to ours instead.
    for name in ("sanic.root", "sanic.error", "sanic.access", "sanic.server", "sanic.websockets"):
        lg = logging.getLogger(name)
        lg.handlers[:] = []
        lg.propagate = True
    # httpx logs every request it makes at info: the gateway's active health checks
    # would write a line per instance every interval. Their warnings still show, and
    # a DEBUG level shows everything.
    quiet = logging.DEBUG if root.level <= logging.DEBUG else logging.WARNING
    for name in _CHATTY:
        logging.getLogger(name).setLevel(quiet)


# Libraries that log routine work at info.
_CHATTY = ("httpx", "httpcore")


def get_logger(name: str) -> logging.Logger:
    """A logger; use `extra={"fields": {...}}` for structured fields."""
    return logging.getLogger(name)
