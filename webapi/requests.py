"""Reading request input strictly: malformed input is a 4xx, never a 500."""

from __future__ import annotations

import json
import os
import re
from typing import Any

from sanic import Request

from webapi.errors import MalformedJson

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


def json_object(request: Request[Any, Any], *, empty_ok: bool = True) -> dict[str, Any]:
    """The body as a JSON object; an empty body is `{}` when `empty_ok`."""
    raw = request.body
    if not raw or not raw.strip():
        if empty_ok:
            return {}
        raise MalformedJson("a JSON object body is required")
    try:
        value = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise MalformedJson(f"body is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise MalformedJson(f"body must be a JSON object, not {type(value).__name__}")
    return value


def request_id_from(request: Request[Any, Any]) -> str:
    """The caller's `X-Request-Id` when it is well formed, else a new one."""
    return request_id_of(request.headers.get("x-request-id"))


def request_id_of(incoming: str | None) -> str:
    """`incoming` (an `X-Request-Id` value) when it is well formed, else a new id."""
    # 128 random bits as 32 hex digits, as `uuid4().hex` but without its object (hot path).
    return incoming if incoming and _REQUEST_ID.match(incoming) else os.urandom(16).hex()
