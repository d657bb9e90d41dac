"""`POST /rpc/<service>/<method>`: the unified entry to any RPC method.

The JSON body is the keyword arguments; the answer is `{"result": ...}` or the
JSON error body with the status of `common.http_errors.status_for`. The call
carries the credential's caller (`common.caller`), never one the body names.
"""

from __future__ import annotations

import re

from sanic import Blueprint, HTTPResponse

from common.errors import MethodNotFound, shortened
from webapi.access import FROM_PATH, call_rpc
from webapi.context import GatewayRequest
from webapi.requests import json_object
from webapi.responses import json_response

bp = Blueprint("rpc", url_prefix="/rpc")

_NAME = re.compile(r"^[a-z][a-z0-9_]{0,62}$")


@bp.post("/<service:str>/<method:str>", ctx_access=FROM_PATH)
async def call(request: GatewayRequest, service: str, method: str) -> HTTPResponse:
    """Hot path: parse the body, one RPC call, serialise the result."""
    if not (_NAME.fullmatch(service) and _NAME.fullmatch(method)):
        raise MethodNotFound(f"no method {shortened(f'{service}.{method}')}")
    kwargs = json_object(request)
    target = f"{service}.{method}"
    result = await call_rpc(request, target, kwargs)
    return json_response({"result": result})
