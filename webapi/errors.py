"""HTTP errors of the gateway, and the handler that renders every error as JSON.

Every error response has the body `{"error": {"code": ..., "message": ...}}`
(plus `details` for invalid parameters). RPC errors map to statuses in one table
(`common.http_errors.status_for`); bad input is always a 4xx, and only a bug in the
gateway is a 500.

Both kinds of error line are bounded (`common.log_budget`), in budgets of the app's own
(`ErrorLogs`, its `ctx.error_logs`: two gateway apps in one process keep their own):

* each refusal (a 4xx) is logged as `request refused` with its client's address, within
  a budget per address block (IPv6 by its /64): `LOG_REFUSALS_PER_CLIENT` (10) a minute,
  then one `request refusals not logged` line counting the rest. A client sending
  made-up credentials in a loop made three lines in four of the gateway's log in a soak,
  burying the rest;
* each of the proxy's own failures (502 `upstream_failed`, 503 `no_healthy_instance`,
  504 `upstream_timeout`; a 508 `proxy_loop` too) is logged as a `gateway error` warning
  within a budget per (service, status, code): 10 a minute, then one `gateway errors not
  logged` warning a minute counting the rest. Unbounded, a service down under load wrote
  a warning per request: 4,800 lines for 4,800 requests in 9 s. The key is the failure,
  not the client: the upstream causes it, and every client of a down service gets it,
  so a per-client budget would still log it once per client. Per service and status,
  each distinct failure is seen at once (another service failing, or this one failing
  differently: timing out where it refused), however loud one is; the lines carry the
  message (the 502's names the instance and how it failed). Nothing a client chooses
  is in the key (the version asked for is only in the message), so no client can spread
  the lines over more budgets;
* each 5xx of an RPC route (503 `service_unavailable`, 504 `timeout`, 502 `remote_error`
  for a handler's crash...) is logged as an `rpc error` warning within a budget per
  (service, status, code) as well (the service the call was to, `RpcError.service`):
  10 a minute, then one `rpc errors not logged` warning a minute counting the rest. An
  RPC service down under load wrote a warning per request (200 for 200 in a test). The
  crashes of two services never share a budget; the service's log has their tracebacks.
* each response whose upstream body failed after its head was written (the proxy can
  only close the client's connection) is logged as an `upstream body failed` warning
  within a budget per service: 10 a minute, then one `upstream body failures not logged`
  warning a minute counting the rest (`log_cut`). An instance cutting its answers under
  load wrote one per request.

Lines about a service name it `target_service` (`service` is the gateway's own,
`common.log`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, cast

from sanic import HTTPResponse, Request
from sanic.exceptions import RequestCancelled, SanicException
from sanic.handlers import ErrorHandler

from common.clientip import peer_ip
from common.errors import Overloaded, RpcError, SwitchboardError, shortened
from common.http_errors import (
    MAX_LOGGED_MESSAGE,
    error_body,
    error_code,
    error_detail,
    error_message,
    log_refusal,
    public_error,
    refusal_budgets,
    retry_after,
    status_for,
    translated,
)
from common.log import get_logger
from common.log_budget import LogBudgets
from common.ratelimit import Decision
from webapi.responses import NotJson, json_response

if TYPE_CHECKING:
    from webapi.access import Gatekeeper
    from webapi.context import GatewayRequest

log = get_logger("webapi.errors")


@dataclass(frozen=True)
class ErrorLogs:
    """The budgets of a gateway app's error lines (its `ctx.error_logs`, module docstring),
    made with the app (refusals come before the server starts too)."""

    refusals: LogBudgets  # `request refused` (a 4xx), per client address block
    failures: LogBudgets  # `gateway error` (the proxy's 5xx), per service, status and code
    rpc_failures: LogBudgets  # `rpc error` (an RPC call's 5xx), per service, status and code
    cuts: LogBudgets  # `upstream body failed` (a response cut after its head), per service

    def flush(self) -> None:
        """Log every count not logged yet (the app stops)."""
        self.refusals.flush()
        self.failures.flush()
        self.rpc_failures.flush()
        self.cuts.flush()


def error_logs(refusals_per_client: int) -> ErrorLogs:
    """A gateway app's `ErrorLogs`: `refusals_per_client` refusals a minute per client (its
    `LOG_REFUSALS_PER_CLIENT`), and the default 10 failures a minute per kind."""
    failures = LogBudgets(log, "gateway errors not logged", logging.WARNING, "failure")
    rpc_failures = LogBudgets(log, "rpc errors not logged", logging.WARNING, "failure")
    cuts = LogBudgets(log, "upstream body failures not logged", logging.WARNING,
                      "target_service")  # fmt: skip
    return ErrorLogs(refusal_budgets(log, refusals_per_client), failures, rpc_failures, cuts)


def log_cut(logs: ErrorLogs, service: str, exc: BaseException) -> None:
    """Log a response of `service` whose body failed after its head was written (only
    closing the client's connection can tell the client) as an `upstream body failed`
    warning, within `service`'s budget (`logs.cuts`, module docstring)."""
    if logs.cuts.spend(service):
        error = shortened(str(exc) or type(exc).__name__, MAX_LOGGED_MESSAGE)
        log.warning("upstream body failed", extra={"fields": {"target_service": service,
                                                               "error": error}})  # fmt: skip


class ApiError(SanicException):
    """An error the gateway raises itself; `code` is the stable machine-readable name."""

    code = "error"
    # Expected, never a traceback: a 5xx of ours (502, 503, 504) is logged as a warning
    # (`error_response`), as Sanic's own log would take it (`quiet`).
    quiet = True
    # The service a 5xx of ours is about (`UpstreamUnavailable`): its log budget's key.
    service = ""


class MalformedJson(ApiError):
    """The request body is not valid JSON (or not the JSON shape the route takes)."""

    status_code = 400
    code = "malformed_json"


class MalformedHeader(ApiError):
    """A header field that HTTP does not allow (a name that is not a token, a control
    character in a value): refused, never forwarded."""

    status_code = 400
    code = "malformed_header"


class InvalidQuery(ApiError):
    """A query parameter or path part is not valid."""

    status_code = 422
    code = "invalid_params"


class InvalidHeartbeat(ApiError):
    """The heartbeat body names no valid instance."""

    status_code = 422
    code = "invalid_heartbeat"


class HeartbeatConflict(ApiError):
    """The heartbeat names an RPC worker's instance, or a service RPC workers serve:
    an HTTP backend may not replace, remove or join them."""

    status_code = 409
    code = "conflict"


class UnknownService(ApiError):
    """No instance of this name was ever registered (proxy routes)."""

    status_code = 404
    code = "unknown_service"


class NotAnHttpService(UnknownService):
    """The service is served by RPC workers: it has no HTTP instance to proxy to, and
    never will (`RegistryView.is_rpc_service`). A 404, as an unknown service: the URL
    names nothing that exists, and retrying will not change that (a 503 would invite
    retries and paging while the service is up)."""

    code = "rpc_service"


class NoRoute(ApiError):
    """No route of the gateway or of the live policy matches the path."""

    status_code = 404
    code = "not_found"


class BodyTooLarge(ApiError):
    """The request body is larger than the service takes (`max_body`, PROXY_MAX_BODY)."""

    status_code = 413
    code = "payload_too_large"  # (the code Sanic's own `PayloadTooLarge` renders as)


class ProxyLoop(ApiError):
    """The request has come through the gateway too often: a registered instance sends
    it back (`common.forwarding.MAX_VIA_HOPS`)."""

    status_code = 508
    code = "proxy_loop"


class UpstreamUnavailable(ApiError):
    """`service` could not answer (the proxy's 502, 503, 504): its `gateway error` lines
    are bounded per service (module docstring)."""

    def __init__(self, message: str, *, service: str) -> None:
        super().__init__(message)
        self.service = service


class NoHealthyInstance(UpstreamUnavailable):
    """The service is known but no live, healthy instance can take the request."""

    status_code = 503
    code = "no_healthy_instance"


class UpstreamFailed(UpstreamUnavailable):
    """The chosen instance (and any retry) failed: connect error or broken response."""

    status_code = 502
    code = "upstream_failed"


class UpstreamTimedOut(UpstreamUnavailable):
    """The chosen instance did not answer within the proxy timeout."""

    status_code = 504
    code = "upstream_timeout"


class NotAuthenticated(ApiError):
    """No credential, or one that is invalid, expired or revoked."""

    status_code = 401
    code = "unauthorized"

    def __init__(self, message: str, *, invalid: bool = False) -> None:
        challenge = 'Bearer realm="switchboard"'
        if invalid:
            challenge += ', error="invalid_token"'
        super().__init__(message, headers={"WWW-Authenticate": challenge})


class NotAllowed(ApiError):
    """A valid credential whose scopes do not reach what the request asks for."""

    status_code = 403
    code = "forbidden"


class RateLimited(ApiError):
    """Over a rate limit: `Retry-After` says when the next request will pass."""

    status_code = 429
    code = "rate_limited"

    def __init__(self, decision: Decision) -> None:
        retry_after = max(1, math.ceil(decision.retry_after))
        headers = {
            "Retry-After": str(retry_after),
            "RateLimit-Limit": str(decision.limit),
            "RateLimit-Remaining": "0",
            "RateLimit-Reset": str(max(retry_after, math.ceil(decision.reset))),
        }
        super().__init__(f"rate limit exceeded: retry in {retry_after} s", headers=headers)


class JsonErrorHandler(ErrorHandler):
    """Renders every exception as the JSON error body with the right status."""

    def default(self, request: Request, exception: Exception) -> HTTPResponse:
        request_id = getattr(request.ctx, "request_id", None)
        logs = request.app.ctx.error_logs
        return error_response(exception, request.method, request.path, request_id, logs,
                              client=partial(client_of, request))  # fmt: skip


def client_of(request: Request[Any, Any]) -> str:
    """The client's address as the routes read it (`Gatekeeper.client_ip`); the peer's
    before the gateway is ready."""
    gate: Gatekeeper | None = getattr(request.app.ctx, "gate", None)
    if gate is not None:
        return gate.client_ip(cast("GatewayRequest", request))
    return peer_ip(request.conn_info)


def error_response(
    exception: Exception,
    method: str,
    path: str,
    request_id: str | None,
    logs: ErrorLogs,
    *,
    client: Callable[[], str],
    envelope: dict[str, Any] | None = None,
) -> HTTPResponse:
    """The JSON error response of `exception`, logged as the gateway logs every error
    (`JsonErrorHandler`; the proxy's fast path, which has no Sanic request, too), within
    the app's budgets (`logs`, module docstring): a refusal within its client's, a failure
    of the proxy's within its service's. `client`: the client's address, read only for a
    refusal (a failure's budget is not the client's). `envelope`: fields a route's own
    answer shape puts beside `error` (`/ai_server/`)."""
    headers: dict[str, str] = {}
    exception = translated(exception)
    if isinstance(exception, RequestCancelled):
        # The client left before its answer (Sanic cancels the handler): nothing failed
        # here and nothing can be sent. The status is nginx's "client closed request".
        log.info("client left before its answer", extra={"fields": {"method": method,
                                                                     "path": path}})  # fmt: skip
        return json_response(error_body("client_closed", "the client left"), status=499)
    if isinstance(exception, SwitchboardError):
        status = status_for(exception)
        body = {"error": public_error(exception)}
        if isinstance(exception, Overloaded):
            headers["Retry-After"] = "1"
        elif (seconds := retry_after(exception)) is not None:  # too_many_attempts
            headers["Retry-After"] = seconds
        if status >= 500:
            service = exception.service if isinstance(exception, RpcError) else ""
            _log_failure("rpc error", logs.rpc_failures, service, status, exception.code,
                         path, error_detail(exception))  # fmt: skip
    elif isinstance(exception, SanicException):
        status = exception.status_code
        code = error_code(exception)
        body = error_body(code, error_message(exception, code))
        headers.update(exception.headers or {})
        if status >= 500 and exception.quiet:  # ours (502, 503, 504): expected, no traceback
            service = exception.service if isinstance(exception, ApiError) else ""
            message = shortened(body["error"]["message"], MAX_LOGGED_MESSAGE)
            _log_failure("gateway error", logs.failures, service, status, code, path,
                         {"message": message})  # fmt: skip
        elif status >= 500:
            log.error("gateway error", exc_info=exception)
    else:
        status = 500
        body = error_body("internal_error", "internal error")
        log.error("unhandled error", exc_info=exception, extra={"fields": {"path": path}})
    if status < 500:  # design §10: logged once, here, bounded
        error = body["error"]
        log_refusal(log, method, path, status, error["code"], error["message"], client(),
                    logs.refusals)  # fmt: skip
    if request_id:
        headers["X-Request-Id"] = request_id
    if envelope:
        body = {**envelope, **body}
    try:
        return json_response(body, status=status, headers=headers)
    except NotJson:  # a service's error `details` holding NaN: the rest still says it all
        body["error"] = {k: v for k, v in body["error"].items() if k != "details"}
        return json_response(body, status=status, headers=headers)


def _log_failure(msg: str, budgets: LogBudgets, service: str, status: int, code: str,
                 path: str, detail: dict[str, str]) -> None:  # fmt: skip
    """Log a 5xx (`msg`: `gateway error`, the proxy's; `rpc error`, an RPC call's) as a
    warning, within `service`'s budget of `budgets` for `status` and `code` (module
    docstring), with `detail` (its message, its cause)."""
    kind: dict[str, Any] = {"target_service": service} if service else {}
    kind.update(status=status, code=code)
    if budgets.spend(f"{status} {code} {service}", kind):
        fields = {"path": shortened(path, MAX_LOGGED_MESSAGE), **kind, **detail}
        log.warning(msg, extra={"fields": fields})
