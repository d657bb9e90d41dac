"""JSON responses that understand the RPC codec's types (datetime, UUID, Decimal, ...).
(The response an instance's answer is relayed in is `common.relayed.RelayedResponse`.)"""

from __future__ import annotations

import json
from collections.abc import Mapping
from functools import partial
from typing import Any

from sanic import HTTPResponse
from sanic.exceptions import SanicException
from sanic.response import json as sanic_json

from common.codec import json_default, not_json_message

_utf8_dumps = partial(json.dumps, default=json_default, ensure_ascii=False, separators=(",", ":"),
                      allow_nan=False)  # fmt: skip
_ascii_dumps = partial(json.dumps, default=json_default, separators=(",", ":"), allow_nan=False)


class NotJson(SanicException):
    """A body JSON cannot carry, from a service's answer (the gateway parses no such
    value from a client): NaN or an infinity (a strict parser, a browser's included,
    refuses `NaN`), bytes that are not UTF-8 (`common.codec.json_default`), a map key
    that is not text, an integer of more digits than Python writes. The service's
    answer is unusable: a 502, its message naming the cause."""

    status_code = 502
    code = "invalid_result"
    quiet = True


def _dumps(body: Any) -> bytes:
    """`body` as UTF-8 JSON; as ASCII JSON when a string in it holds a lone surrogate
    (an upstream's `"\\ud800"`, relayed by `/ai_server/`), which UTF-8 cannot encode
    and only a `\\u` escape can carry. The same one encode as before on the common path."""
    try:
        try:
            return _utf8_dumps(body).encode()
        except UnicodeEncodeError:
            return _ascii_dumps(body).encode()
    except (ValueError, TypeError) as exc:  # (allow_nan=False; json_default's refusals)
        raise NotJson(not_json_message("the answer", exc)) from None


def json_response(
    body: Any, status: int = 200, headers: Mapping[str, str] | None = None
) -> HTTPResponse:
    """`body` (any JSON-able value, the codec's types included) as a JSON response."""
    return sanic_json(body, status=status, headers=dict(headers or {}), dumps=_dumps)
