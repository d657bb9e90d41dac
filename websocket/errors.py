"""The websocket service's refusals, answered and logged the platform's way.

HTTP: its own refusals of an upgrade, and Sanic's answers to a request it could not
parse or route (which would otherwise have Sanic's own shape), get the platform's
JSON error body (`common.http_errors`) and one log line each, as the gateway's do. A
relayed upgrade its upstream refused gets the upstream's answer (`websocket.refusals`),
logged the same way. As at the gateway, those lines are bounded per client address
block (`common.http_errors.refusal_budgets`: `LOG_REFUSALS_PER_CLIENT` a minute, then
one `request refusals not logged` line with the count): a client retrying a refused
upgrade in a loop (a bad token, a full service) would otherwise write a line per attempt.

WebSocket: a message refused with an error frame (`RefusalLog.refused`), a
JSON-RPC call that failed (`log_failed_call`: refused, or a service's failure) and
a connection the service closes other than normally (`log_close`: 1002, 1007,
1008, 1009, 1011 for a missing pong, 1013, 1014) are logged once too; a normal
closing (1000, 1001) is not, nor a close code the relay passes on from an upstream,
nor a client that goes away (mid-request, or by resetting its connection).

Refused messages are logged through their connection's `RefusalLog`, which bounds
them (`common.log_budget`): at most `LOGGED_PER_WINDOW` (10) lines a connection per
`WINDOW` (60 s), then one `message refusals not logged` line with how many were not
(when the next refusal comes after the window, or when the connection ends). A client sending
mistakes in a loop (5,000 bad messages wrote 5,000 lines in 0.4 s) so costs the log
a dozen lines a minute, and the connection is still served as before: a mistake
never closes a session (`websocket.session`), and answering one costs no more than
answering a ping, which is not logged at all. (Closing such a client with 1008
would bound the log too, but would end a buggy client's good work with its bad,
and the client would reconnect and start again.)

The warnings for messages the service failed to serve (`RefusalLog.failed`: a
JSON-RPC call that failed in or on the way to its service, `rpc error`; a message
that needs Redis while Redis is down, `message failed`) are bounded the same way, on
a budget of their own (a client's mistakes do not silence them), then counted by one
`message failures not logged` warning: a client calling a dead service, or
subscribing while Redis is down, in a loop wrote one warning per message.
"""

from __future__ import annotations

import logging
from typing import Any

from sanic import HTTPResponse, Request
from sanic.exceptions import RequestCancelled, SanicException
from sanic.handlers import ErrorHandler
from sanic.response import json as json_response

from common.errors import RpcError, SwitchboardError, shortened
from common.http_errors import (
    MAX_LOGGED_MESSAGE,
    error_body,
    error_code,
    error_detail,
    error_message,
    log_refusal,
    public_error,
    refusal_budgets,
    status_for,
    translated,
)
from common.log import get_logger
from common.log_budget import LogBudget, LogBudgets
from websocket.connections import GOING_AWAY, NORMAL_CLOSURE
from websocket.handshake import client_address
from websocket.refusals import refused_answer
from websocket.upstreams import UpstreamRefused

log = get_logger("websocket.errors")


def http_refusals(limit: int) -> LogBudgets:
    """The budgets of this service's `request refused` lines (module docstring)."""
    return refusal_budgets(log, limit)


def refusal(request: Request[Any, Any], status: int, code: str, message: str) -> HTTPResponse:
    """An HTTP answer refusing `request` (an upgrade, most often), logged."""
    _log_refusal(request, status, code, message)
    return json_response(error_body(code, message), status)


def _log_refusal(request: Request[Any, Any], status: int, code: str, message: str) -> None:
    """Log a refusal of `request`, within its client's budget (module docstring). The
    address is read as the routes read it: `TRUSTED_PROXIES` decide whether
    `X-Forwarded-For` is believed."""
    client, budgets = client_address(request), request.app.ctx.refusals
    log_refusal(log, request.method, request.path, status, code, message, client, budgets)


class RefusalLog:
    """The refused messages of one connection, and those it failed to serve, logged with
    a bound each (module docstring)."""

    __slots__ = ("failures", "path", "refusals")

    def __init__(self, path: str) -> None:
        self.path = path
        fields = {"path": path}
        self.refusals = LogBudget(log, "message refusals not logged", logging.INFO, fields)
        self.failures = LogBudget(log, "message failures not logged", logging.WARNING, fields)

    def refused(self, code: str | int, message: str) -> None:
        """Log a client's message answered with an error instead of being served (its
        message cut to `MAX_LOGGED_MESSAGE`, as the HTTP refusals'), unless this window's
        lines are spent: then count it."""
        if self.refusals.spend():
            shown = shortened(message, MAX_LOGGED_MESSAGE)
            fields = {"path": self.path, "code": code, "message": shown}
            log.info("message refused", extra={"fields": fields})

    def failed(self, what: str, fields: dict[str, Any]) -> None:
        """Log the warning `what` (with the path and `fields`) for a message the service
        failed to serve, unless this window's lines are spent: then count it."""
        if self.failures.spend():
            log.warning(what, extra={"fields": {"path": self.path, **fields}})

    def flush(self) -> None:
        """Log how many lines went unwritten, if any (the window ended, or the connection)."""
        self.refusals.flush()
        self.failures.flush()


def log_failed_call(refusals: RefusalLog, method: str, exc: RpcError) -> None:
    """Log a JSON-RPC call that failed: a caller's mistake (what the gateway answers
    with a 4xx: an unknown method, invalid params, `not_found`...) as a refused
    message, a service's failure as a warning, as the gateway logs them; both within
    the connection's bounds (`refusals`)."""
    if status_for(exc) < 500:
        refusals.refused(exc.code, exc.message or exc.code)
    else:
        refusals.failed("rpc error", {"method": method, "code": exc.code, **error_detail(exc)})


def log_close(path: str, code: int, reason: str) -> None:
    """Log a connection the service closed with `code` (unless a normal closing)."""
    if code not in (NORMAL_CLOSURE, GOING_AWAY):
        log.info("connection closed", extra={"fields": {"path": path, "code": code,
                                                        "reason": reason}})  # fmt: skip


class JsonErrorHandler(ErrorHandler):
    """Renders every exception as the JSON error body: its status for Sanic's own
    (logged as a refusal), the gateway's status for the platform's errors (a credential
    that cannot be checked while Redis is down is a 503, as there), a logged 500
    `internal_error` for anything else."""

    def default(self, request: Request[Any, Any], exception: Exception) -> HTTPResponse:
        exception = translated(exception)
        if isinstance(exception, RequestCancelled):
            # The client left mid-request (a head cut short, say): nothing failed here and
            # nothing can be sent; a client going away is no error (the gateway's 499).
            log.debug("client left before its answer", extra={"fields": {"path": request.path}})
            return json_response(error_body("client_closed", "the client left"), 499)
        if isinstance(exception, UpstreamRefused):  # the instance's answer, passed on
            _log_refusal(request, exception.status_code, exception.code, str(exception))
            return refused_answer(exception)
        if isinstance(exception, SanicException) and exception.status_code < 500:
            code = error_code(exception)
            response = refusal(request, exception.status_code, code, error_message(exception, code))
            response.headers.update(exception.headers or {})
            return response
        if isinstance(exception, SwitchboardError):
            status = status_for(exception)
            if status < 500:
                return refusal(
                    request, status, exception.code, error_message(exception, exception.code)
                )
            fields = {"path": request.path, "status": status, "code": exception.code,
                      **error_detail(exception)}  # fmt: skip
            log.warning("request failed", extra={"fields": fields})
            return json_response({"error": public_error(exception)}, status)
        log.error("unhandled error", exc_info=exception, extra={"fields": {"path": request.path}})
        return json_response(error_body("internal_error", "internal error"), 500)
