"""JSON-RPC 2.0 over `/ws`, onto the RPC services.

`{"jsonrpc": "2.0", "id": 1, "method": "iptv.list_channels", "params": {...}}`
calls `iptv.list_channels` with `params` as keyword arguments (an array: as
positional arguments) and answers `{"jsonrpc": "2.0", "id": 1, "result": ...}`
or `{"jsonrpc": "2.0", "id": 1, "error": {"code", "message", "data"?}}`. A
request without `id` is a notification: it runs, nothing is answered. Batches
(arrays) are refused with -32600.

Error codes:

    -32700  parse error: the message is not JSON (or holds a lone surrogate escape, "\\ud800")
    -32600  invalid request: not a JSON-RPC 2.0 request object (or a batch)
    -32601  method not found: no such service or method
    -32602  invalid params: the arguments do not fit the method (or cannot be sent over RPC:
            `data.code` "payload_too_large" when they encode to more than RPC_MAX_PAYLOAD_BYTES)
    -32603  internal error: the call failed here (a bug); logged with its traceback
    -32000  service error: the method raised; `data.code` is its code ("not_found" ...), or
            its result cannot be sent: "invalid_result" (what JSON cannot carry: NaN,
            bytes that are not UTF-8...: the gateway's 502) or "result_too_large"
    -32001  service unavailable: no live instance of the service
    -32002  overloaded: the service's backlog is full
    -32003  timeout: no answer within RPC_TIMEOUT
    -32004  too many calls in flight on this connection (WS_MAX_CALLS_IN_FLIGHT)
    -32005  forbidden: the connection's credential has no scope for the method
"""

from __future__ import annotations

import json
from typing import Any

from common.codec import json_default, not_json_message
from common.errors import (
    InvalidParams,
    InvalidResult,
    MethodNotFound,
    Overloaded,
    PayloadTooLarge,
    RemoteError,
    RpcError,
    RpcTimeout,
    ServiceUnavailable,
)
from common.http_errors import public_message

PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603
SERVICE_ERROR = -32000
SERVICE_UNAVAILABLE = -32001
OVERLOADED = -32002
TIMEOUT = -32003
TOO_MANY_CALLS = -32004
FORBIDDEN = -32005

Id = str | int | float | None


class InvalidRequest(Exception):
    """The message is JSON but not a valid JSON-RPC 2.0 request; `id` if one was readable."""

    def __init__(self, message: str, id: Id = None) -> None:
        super().__init__(message)
        self.id = id


def is_request(message: object) -> bool:
    """Whether a decoded message claims to be JSON-RPC (a batch or an object with `jsonrpc`)."""
    return isinstance(message, list) or (isinstance(message, dict) and "jsonrpc" in message)


def parse(message: object) -> tuple[Id, str, list[Any], dict[str, Any], bool]:
    """`(id, method, args, kwargs, is_notification)` of a request, or `InvalidRequest`."""
    if isinstance(message, list):
        raise InvalidRequest("batch requests are not supported")
    if not isinstance(message, dict):
        raise InvalidRequest("a request must be an object")
    id_ = message.get("id")
    if id_ is not None and (isinstance(id_, bool) or not isinstance(id_, str | int | float)):
        raise InvalidRequest("id must be a string, a number or null")
    if message.get("jsonrpc") != "2.0":
        raise InvalidRequest('jsonrpc must be "2.0"', id_)
    method = message.get("method")
    if not isinstance(method, str) or not method:
        raise InvalidRequest("method must be a non-empty string", id_)
    params = message.get("params", {})
    if isinstance(params, dict):
        args, kwargs = [], params
    elif isinstance(params, list):
        args, kwargs = params, {}
    else:
        raise InvalidRequest("params must be an object or an array", id_)
    return id_, method, args, kwargs, "id" not in message


def result(id_: Id, value: Any) -> str:
    """The answer to a call that returned `value`; `InvalidResult` when JSON cannot carry
    `value` (NaN, bytes that are not UTF-8...: `common.codec.not_json_message`), answered
    as the gateway answers it (its 502 `invalid_result`)."""
    answer = {"jsonrpc": "2.0", "id": id_, "result": value}
    try:
        return json.dumps(answer, default=json_default, allow_nan=False)
    except (ValueError, TypeError) as exc:
        raise InvalidResult(not_json_message("the answer", exc)) from None


def error(id_: Id, code: int, message: str, data: Any = None) -> str:
    """An error answer; `data` is left out if JSON cannot carry it (a service's `details`
    holding NaN or bytes that are not UTF-8): the code and message still say it all."""
    body: dict[str, Any] = {"code": code, "message": message}
    if data is not None:
        body["data"] = data
    answer = {"jsonrpc": "2.0", "id": id_, "error": body}
    try:
        return json.dumps(answer, default=json_default, allow_nan=False)
    except (ValueError, TypeError):
        body.pop("data", None)
        return json.dumps(answer)


def error_for(id_: Id, exc: RpcError) -> str:
    """The JSON-RPC error answer for a failed call."""
    if isinstance(exc, MethodNotFound):
        return error(id_, METHOD_NOT_FOUND, exc.message or "method not found")
    if isinstance(exc, InvalidParams):
        return error(id_, INVALID_PARAMS, exc.message or "invalid params", exc.details or None)
    if isinstance(exc, PayloadTooLarge):
        return error(id_, INVALID_PARAMS, exc.message, {"code": exc.code})
    if isinstance(exc, ServiceUnavailable):
        return error(id_, SERVICE_UNAVAILABLE, exc.message or "service unavailable")
    if isinstance(exc, Overloaded):
        return error(id_, OVERLOADED, exc.message or "service overloaded")
    if isinstance(exc, RpcTimeout):
        return error(id_, TIMEOUT, exc.message or "timed out")
    data = {"code": exc.code}
    if isinstance(exc, RemoteError) and exc.remote_type:
        data["type"] = exc.remote_type
    return error(id_, SERVICE_ERROR, public_message(exc) or exc.code, data)
