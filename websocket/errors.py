"""The websocket service's HTTP errors as the platform's JSON error body
(`common.http_errors`): its own refusals of an upgrade, and Sanic's answers to a
request it could not parse or route (which would otherwise have Sanic's own shape)."""

from __future__ import annotations

from typing import Any

from sanic import HTTPResponse, Request
from sanic.exceptions import SanicException
from sanic.handlers import ErrorHandler
from sanic.response import json as json_response

from common.http_errors import error_body, error_code
from common.log import get_logger

log = get_logger("websocket.errors")


def refusal(status: int, code: str, message: str) -> HTTPResponse:
    """An HTTP answer refusing a request (an upgrade, most often)."""
    return json_response(error_body(code, message), status)


class JsonErrorHandler(ErrorHandler):
    """Renders every exception as the JSON error body: its status for Sanic's own, a
    logged 500 `internal_error` for anything else."""

    def default(self, request: Request[Any, Any], exception: Exception) -> HTTPResponse:
        if isinstance(exception, SanicException):
            code = error_code(exception)
            response = refusal(exception.status_code, code, str(exception) or code)
            response.headers.update(exception.headers or {})
            return response
        log.error("unhandled error", exc_info=exception, extra={"fields": {"path": request.path}})
        return refusal(500, "internal_error", "internal error")
