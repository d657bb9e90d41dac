"""Structured logging: one JSON object per line, everywhere.

Every record carries the time, level, service, logger and message; the request
id of the current request or RPC call is added when there is one (it travels in
a context variable, so concurrent requests never mix ids). Extra fields passed
with `logger.info("...", extra={"fields": {...}})` are merged into the object.
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
            out.update(fields)
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
