"""The JSON error body of every Sanic service (webapi, websocket), and the code an
exception gets in it.

Every error response of the platform has the body `{"error": {"code": ..., "message":
...}}`, whoever raised it: our handlers, or Sanic itself for a request it could not
parse (`BadRequest` is `bad_request`, `PayloadTooLarge` is `payload_too_large`).
"""

from __future__ import annotations

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
