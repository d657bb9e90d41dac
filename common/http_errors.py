"""The JSON error body of every Sanic service (webapi, websocket), and the code an
exception gets in it.

Every error response of the platform has the body `{"error": {"code": ..., "message":
...}}`, whoever raised it: our handlers, or Sanic itself for a request it could not
parse (`BadRequest` is `bad_request`, `PayloadTooLarge` is `payload_too_large`).
Every refusal (a 4xx) is logged once, by the process that refused it (design §10):
`log_refusal`.
"""

from __future__ import annotations

import logging
import re
from typing import Any


def error_body(code: str, message: str, **extra: Any) -> dict[str, Any]:
    """`{"error": {"code": code, "message": message, **extra}}`."""
    return {"error": {"code": code, "message": message, **extra}}


def error_code(exception: BaseException) -> str:
    """The exception's `code` attribute, else its class name in snake case."""
    code = getattr(exception, "code", None)
    if isinstance(code, str) and code:
        return code
    return re.sub(r"(?<!^)(?=[A-Z])", "_", type(exception).__name__).lower()


def error_message(exception: BaseException, code: str) -> str:
    """The exception's message, else its code in words (`payload too large`)."""
    return str(exception) or code.replace("_", " ")


def log_refusal(log: logging.Logger, method: str, path: str, status: int, code: str,
                message: str) -> None:  # fmt: skip
    """Log one refused request, at info: what was wrong, never what was sent (no body,
    no credential, no query string), so a refusal's log line carries no secret."""
    fields = {"method": method, "path": path, "status": status, "code": code, "message": message}
    log.info("request refused", extra={"fields": fields})
