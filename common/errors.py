"""The one error hierarchy of Switchboard.

```
SwitchboardError                  base of everything raised on purpose
├── ConfigError                   a setting is missing or malformed
├── RedisUnavailable              Redis cannot be reached (translated at the boundary)
├── RpcError                      an RPC call did not produce a result
│   ├── RpcTimeout                no reply before the call's deadline (also a TimeoutError)
│   ├── RemoteError               the handler raised; carries the remote type, code and message
│   ├── MethodNotFound            the service has no such method (or no such service is known)
│   ├── InvalidParams             the arguments do not fit the handler's signature or type hints
│   ├── ServiceUnavailable        no live instance of the service: raised at once, not at timeout
│   ├── Overloaded                the service's backlog is over its bound: rejected at enqueue
│   ├── PayloadTooLarge           the call's arguments encode to more than RPC_MAX_PAYLOAD_BYTES:
│   │                             raised by the caller's client, nothing is sent
│   └── InvalidResult             the handler returned, but its result cannot reach the caller
│       │                         (a type the codec or JSON cannot carry, NaN for a JSON client)
│       └── ResultTooLarge        the result encodes to more than RPC_MAX_PAYLOAD_BYTES, or
│                                 Redis would not take it
└── ServiceError                  raised *by handlers* to answer with an application error
    ├── BadRequest                the request makes no sense for this service (code "bad_request")
    ├── Unauthorized              missing or wrong credentials (code "unauthorized")
    ├── Forbidden                 credentials are valid but not enough (code "forbidden")
    ├── NotFound                  the thing asked for does not exist (code "not_found")
    ├── Conflict                  the thing already exists or changed meanwhile (code "conflict")
    └── TooManyAttempts           refused for now, see `retry_after` (code "too_many_attempts")
```

A `ServiceError` raised in a handler reaches the caller as a `RemoteError` whose
`code` is the service error's code, so a gateway can map it to an HTTP status
without importing the service's code. Its `retry_after` (seconds), when set,
travels in the reply too: the gateway answers it as `Retry-After`.

A message that quotes what a client sent (a service name, a key, a method) quotes
it through `quoted` or `shortened`: at most `SHOWN_CHARS` characters of it, then
`...` and its length, so a request carrying a 1 MB name gets an answer and a log
line of bounded size, not the name back (once per place that quotes it).
"""

from __future__ import annotations

import math
from typing import Any

# How much of a client-supplied value an error message quotes.
SHOWN_CHARS = 80


def shortened(text: str, limit: int = SHOWN_CHARS) -> str:
    """`text`, or its first `limit` characters, `...` and its length when it is longer."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def quoted(value: object, limit: int = SHOWN_CHARS) -> str:
    """`value` as `{value!r}` shows it in a message, a long one shortened (`shortened`):
    for quoting a client's input, whose size the client chooses."""
    if isinstance(value, str):
        if len(value) <= limit:
            return repr(value)
        # Cut before `repr`: the repr of a huge string is as huge.
        return f"{value[:limit]!r}... ({len(value)} characters)"
    return shortened(repr(value), limit)


class SwitchboardError(Exception):
    """Base of every error Switchboard raises on purpose."""

    code: str = "error"

    def __init__(self, message: str = "") -> None:
        super().__init__(message)
        self.message = message

    def to_dict(self) -> dict[str, Any]:
        """The wire/JSON form: `{"code": ..., "message": ...}`."""
        return {"code": self.code, "message": self.message}


class ConfigError(SwitchboardError):
    """A setting is missing or malformed."""

    code = "config_error"


class RedisUnavailable(SwitchboardError):
    """Redis cannot be reached right now; callers may retry later."""

    code = "redis_unavailable"


class RpcError(SwitchboardError):
    """An RPC call did not produce a result. `service`: the service the call was to,
    set by the client that made it (`RpcClient.invoke`); "" when raised elsewhere. Not
    on the wire: the gateway's log lines of a failed call name it (`target_service`)
    and are bounded per service."""

    code = "rpc_error"
    service = ""


class RpcTimeout(RpcError, TimeoutError):
    """No reply arrived before the call's deadline."""

    code = "timeout"


class RemoteError(RpcError):
    """The handler raised; `remote_type` names the exception class on the worker."""

    code = "remote_error"

    def __init__(
        self,
        message: str = "",
        *,
        remote_type: str = "",
        code: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.remote_type = remote_type
        if code is not None:
            self.code = code
        self.retry_after = retry_after

    def to_dict(self) -> dict[str, Any]:
        out = {"code": self.code, "message": self.message, "type": self.remote_type}
        return _with_retry_after(out, self.retry_after)


class MethodNotFound(RpcError):
    """The service has no method of that name, or the service itself is unknown."""

    code = "method_not_found"


class InvalidParams(RpcError):
    """The arguments do not match the handler's signature or type hints."""

    code = "invalid_params"

    def __init__(self, message: str = "", *, details: list[dict[str, Any]] | None = None) -> None:
        super().__init__(message)
        self.details = details or []

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        if self.details:
            out["details"] = self.details
        return out


class ServiceUnavailable(RpcError):
    """No live instance of the service exists (or Redis is unreachable)."""

    code = "service_unavailable"


class Overloaded(RpcError):
    """The service's backlog is over its bound; the call was not enqueued."""

    code = "overloaded"


# Why Redis refused a value (a call's arguments, a result) whose size is within
# `RPC_MAX_PAYLOAD_BYTES`: the end of the error's message (`refused` below).
_REDIS_REFUSED_VALUE = (
    "Redis refused it (a value over its proto-max-bulk-len, set lower than RPC_MAX_PAYLOAD_BYTES?)"
)


class PayloadTooLarge(RpcError):
    """The call's arguments encode to more than `RPC_MAX_PAYLOAD_BYTES`: refused by the
    caller's client before anything is sent (a 413 at the gateway)."""

    code = "payload_too_large"

    @classmethod
    def refused(cls, service: str, size: int) -> PayloadTooLarge:
        """The error of a call to `service`, `size` bytes encoded (within
        `RPC_MAX_PAYLOAD_BYTES`), that Redis refused to take."""
        return cls(
            f"the call to {quoted(service)} ({size} bytes encoded) could not be sent: "
            f"{_REDIS_REFUSED_VALUE}"
        )


class InvalidResult(RpcError):
    """The handler returned, but what it returned cannot reach the caller: a value the
    RPC codec cannot encode, or (at the HTTP and WebSocket edge) one JSON cannot carry.
    The service's fault, not the caller's (a 502 at the gateway); the message names
    the cause."""

    code = "invalid_result"


class ResultTooLarge(InvalidResult):
    """The handler's result encodes to more than `RPC_MAX_PAYLOAD_BYTES`, or Redis
    refused to take it (its own bulk limit is lower): answered with this instead."""

    code = "result_too_large"

    @classmethod
    def over(cls, method: str, size: int, limit: int) -> ResultTooLarge:
        """The answer to `method` ("service.method"), whose result encodes to `size`
        bytes, over `limit`."""
        return cls(
            f"the result of {method} encodes to {size} bytes, over the {limit}-byte limit "
            "(RPC_MAX_PAYLOAD_BYTES)"
        )

    @classmethod
    def refused(cls, method: str, size: int) -> ResultTooLarge:
        """The answer to `method` ("service.method"), whose result encodes to `size`
        bytes (within `RPC_MAX_PAYLOAD_BYTES`), when Redis refused to take the result."""
        return cls(
            f"the result of {method} ({size} bytes encoded) could not be sent: "
            f"{_REDIS_REFUSED_VALUE}"
        )


class ServiceError(SwitchboardError):
    """Raised by a handler to answer with an application error and a stable code."""

    code = "service_error"
    # Seconds after which the same call may succeed, when the handler knows.
    retry_after: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return _with_retry_after(super().to_dict(), self.retry_after)


class BadRequest(ServiceError):
    """The request makes no sense for this service."""

    code = "bad_request"


class Unauthorized(ServiceError):
    """Missing or wrong credentials."""

    code = "unauthorized"


class Forbidden(ServiceError):
    """Valid credentials that are not enough for this action."""

    code = "forbidden"


class NotFound(ServiceError):
    """The thing asked for does not exist."""

    code = "not_found"


class Conflict(ServiceError):
    """The thing already exists, or changed meanwhile."""

    code = "conflict"


class TooManyAttempts(ServiceError):
    """Too many attempts (failed logins of one username): refused until `retry_after` passes."""

    code = "too_many_attempts"

    def __init__(self, message: str, *, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


def _with_retry_after(out: dict[str, Any], retry_after: float | None) -> dict[str, Any]:
    if retry_after is not None:
        out["retry_after"] = retry_after
    return out


def _seconds(value: Any) -> float | None:
    """A wire `retry_after`: a finite, non-negative number of seconds, else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) and value >= 0 else None


# The message of the `RemoteError` standing for an error reply that is not a map.
_MALFORMED_ERROR_REPLY = "malformed error reply"

# Errors the worker reports by code, rebuilt as the same class at the caller.
_PROTOCOL_ERRORS: dict[str, type[RpcError]] = {
    cls.code: cls
    for cls in (
        MethodNotFound,
        InvalidParams,
        Overloaded,
        ServiceUnavailable,
        InvalidResult,
        ResultTooLarge,
    )
}


def error_from_wire(payload: Any) -> RpcError:
    """Rebuild the caller-side exception from a worker's error reply (its `"e"`).

    Never raises, whatever the reply holds: one buggy handler must not break its
    callers' clients. A field of the wrong type is left out (an `InvalidParams`'s
    `details` that is not a list of maps, say); a payload that is not a map is a
    `RemoteError` "malformed error reply".
    """
    if not isinstance(payload, dict):
        return RemoteError(_MALFORMED_ERROR_REPLY)
    code = _text(payload.get("code")) or RemoteError.code
    message = _text(payload.get("message"))
    if code == InvalidParams.code:
        details = payload.get("details")
        if not isinstance(details, list):
            details = []
        return InvalidParams(message, details=[d for d in details if isinstance(d, dict)])
    cls = _PROTOCOL_ERRORS.get(code)
    if cls is not None:
        return cls(message)
    return RemoteError(
        message,
        remote_type=_text(payload.get("type")),
        code=code,
        retry_after=_seconds(payload.get("retry_after")),
    )


def _text(value: Any) -> str:
    """A wire string field, or "" when it is missing or not a string."""
    return value if isinstance(value, str) else ""


__all__ = [
    "SHOWN_CHARS",
    "BadRequest",
    "ConfigError",
    "Conflict",
    "Forbidden",
    "InvalidParams",
    "InvalidResult",
    "MethodNotFound",
    "NotFound",
    "Overloaded",
    "PayloadTooLarge",
    "RedisUnavailable",
    "RemoteError",
    "ResultTooLarge",
    "RpcError",
    "RpcTimeout",
    "ServiceError",
    "ServiceUnavailable",
    "SwitchboardError",
    "TooManyAttempts",
    "Unauthorized",
    "error_from_wire",
    "quoted",
    "shortened",
]
