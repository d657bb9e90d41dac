"""JSON responses that understand the RPC codec's types (datetime, UUID, Decimal, ...)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from functools import partial
from typing import Any

from sanic import HTTPResponse
from sanic.response import json as sanic_json

from common.codec import json_default

_dumps = partial(json.dumps, default=json_default, ensure_ascii=False, separators=(",", ":"))


def json_response(
    body: Any, status: int = 200, headers: Mapping[str, str] | None = None
) -> HTTPResponse:
    return sanic_json(body, status=status, headers=dict(headers or {}), dumps=_dumps)
