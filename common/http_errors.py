"""The JSON error body of every Sanic service (webapi, websocket), the code an
exception gets in it, and the HTTP status of an RPC error (`status_for`, which also
tells the websocket service a caller's mistake from a service's failure).

Every error response of the platform has the body `{"error": {"code": ..., "message":
...}}`, whoever raised it: our handlers, or Sanic itself for a request it could not
parse (`BadRequest` is `bad_request`, `PayloadTooLarge` is `payload_too_large`).
Every refusal (a 4xx) is logged once, by the process that refused it (design §10):
`log_refusal`, its message cut to `MAX_LOGGED_MESSAGE` characters (messages quote a
client's input shortened already, `common.errors.quoted`: this bounds a line whatever
a message holds); the gateway's within a budget per client address (`webapi.errors`).
"""

from __future__ import annotations

import logging
import math
import re
from typing import Any

from redis.exceptions import RedisError

from common.clientip import address_block
from common.errors import (
    InvalidParams,
    InvalidResult,
    MethodNotFound,
    Overloaded,
    PayloadTooLarge,
    RedisUnavailable,
    RemoteError,
    RpcTimeout,
    ServiceError,
    ServiceUnavailable,
    SwitchboardError,
    shortened,
)
from common.log_budget import LOGGED_PER_WINDOW, LogBudgets
from common.redis_failures import redis_failure, redis_failure_message

# The most of a refusal's message a log line carries.
MAX_LOGGED_MESSAGE = 500


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


def refusal_budgets(log: logging.Logger, limit: int = LOGGED_PER_WINDOW) -> LogBudgets:
    """Budgets for `log_refusal`'s lines, one per client address block: `limit` lines a
    minute (`LOG_REFUSALS_PER_CLIENT`; 0: no bound), the rest counted in one `request
    refusals not logged` line (`common.log_budget`)."""
    return LogBudgets(log, "request refusals not logged", logging.INFO, "client", limit=limit)


def log_refusal(log: logging.Logger, method: str, path: str, status: int, code: str,
                message: str, client: str | None = None,
                budgets: LogBudgets | None = None) -> None:  # fmt: skip
    """Log one refused request, at info: what was wrong, never what was sent (no body,
    no credential, no query string), so a refusal's log line carries no secret. The
    message and the path are cut (`MAX_LOGGED_MESSAGE`): a line's size is bounded.
    `client`: the client's address; `budgets` (`refusal_budgets`), when given, bound
    such lines per client: keyed by its address block (`common.clientip.address_block`:
    an IPv6 client holds a /64, and would otherwise spread its lines over as many
    budgets as it has addresses)."""
    if budgets is not None and not budgets.spend(address_block(client or "") or client or ""):
        return
    fields = {"method": method, "path": shortened(path, MAX_LOGGED_MESSAGE), "status": status,
              "code": code, "message": shortened(message, MAX_LOGGED_MESSAGE)}  # fmt: skip
    if client is not None:
        fields["client"] = client
    log.info("request refused", extra={"fields": fields})


_RPC_STATUS: dict[type[SwitchboardError], int] = {
    MethodNotFound: 404,
    InvalidParams: 422,
    PayloadTooLarge: 413,  # the caller's arguments
    InvalidResult: 502,  # the service's result (ResultTooLarge too)
    ServiceUnavailable: 503,
    Overloaded: 503,
    RedisUnavailable: 503,
    RpcTimeout: 504,
}


def translated(exception: Exception) -> Exception:
    """`exception` as the platform's error: redis-py's errors for a Redis failure (down,
    or up and refusing: out of memory, a read-only replica, the credentials refused...,
    `common.redis_failures`), from a handler that talks to Redis itself, are
    `RedisUnavailable` (a 503 the caller may retry, not a 500 and a traceback per
    request while Redis is down or full). Its message names the kind only ("redis
    unreachable", "redis refused the write: out of memory"): redis-py's text names
    Redis's address, so it is only the `__cause__`, which the error's log line carries
    (`error_detail`)."""
    if isinstance(exception, RedisError) and (kind := redis_failure(exception)) is not None:
        translation = RedisUnavailable(redis_failure_message(exception, kind))
        translation.__cause__ = exception
        return translation
    return exception


def error_detail(exception: BaseException) -> dict[str, str]:
    """The log fields of what a client's message leaves out (`{"error": ...}`), if
    anything: what caused `exception` (redis-py's text, which names Redis's address),
    or a handler crash's own message (`public_error`)."""
    if isinstance(exception, RemoteError) and is_crash(exception):
        return {"error": shortened(exception.message, MAX_LOGGED_MESSAGE)}
    cause = exception.__cause__
    return {} if cause is None else {"error": shortened(str(cause) or type(cause).__name__,
                                                        MAX_LOGGED_MESSAGE)}  # fmt: skip


# Crashes whose message the platform itself wrote (not the handler's exception's text).
_OUR_CRASHES = frozenset({"", "WorkerLost"})


def is_crash(exc: RemoteError) -> bool:
    """True if a handler raised an exception that is not an application error (not a
    `ServiceError` with a code of its own): a bug, or a library's error passed up."""
    return exc.code == RemoteError.code and exc.remote_type not in _OUR_CRASHES


def public_message(exc: SwitchboardError) -> str:
    """The message a client of the public edge (HTTP, WebSocket) gets for `exc`.

    A handler crash's text may say anything about the worker's insides (redis-py's
    names Redis's address; others a file path, a query, a secret in a DSN). Callers
    over RPC get it whole, so services can act on it; clients of the gateway and the
    WebSocket service get the exception's type only, and the text is in the worker's
    log and the edge's error line (`error_detail`). Application errors (a
    `ServiceError`'s code and message) travel as the handler wrote them.
    """
    if isinstance(exc, RemoteError) and is_crash(exc):
        return f"the service's handler failed ({exc.remote_type}); its log has the details"
    return exc.message


def public_error(exc: SwitchboardError) -> dict[str, Any]:
    """`exc.to_dict()` with `public_message` as its message."""
    return {**exc.to_dict(), "message": public_message(exc)}


# Application errors raised by handlers (`common.errors.ServiceError` codes).
_REMOTE_CODE_STATUS = {
    "bad_request": 400,
    "unauthorized": 401,
    "forbidden": 403,
    "not_found": 404,
    "conflict": 409,
    "invalid_params": 422,
    "policy_invalid": 422,
    "too_many_attempts": 429,
    "policy_unreadable": 503,  # the stored policy is corrupt: no request of the caller's fixes it
}


def retry_after(exc: SwitchboardError) -> str | None:
    """The `Retry-After` header of an error that says when to try again (its
    `retry_after`, in whole seconds rounded up, at least 1), else None."""
    seconds = exc.retry_after if isinstance(exc, (RemoteError, ServiceError)) else None
    return None if seconds is None else str(max(1, math.ceil(seconds)))


def status_for(exc: SwitchboardError) -> int:
    """The HTTP status of an RPC error. A handler crash is the upstream's fault: 502."""
    if isinstance(exc, RemoteError):
        return _REMOTE_CODE_STATUS.get(exc.code, 502)
    if isinstance(exc, ServiceError):  # raised in the gateway itself (e.g. a policy check)
        return _REMOTE_CODE_STATUS.get(exc.code, 400)
    for cls, status in _RPC_STATUS.items():
        if isinstance(exc, cls):
            return status
    return 502
