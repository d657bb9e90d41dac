"""Reading request input strictly: malformed input is a 4xx, never a 500."""

from __future__ import annotations

from typing import Any

from sanic import Request

from common.codec import json_type, parse_json
from common.forwarding import PROXY_LOOP, headers_credential_fault, via_loop
from common.http_head import head_fault
from common.request_ids import request_id_of
from webapi.errors import MalformedHeader, MalformedJson, ProxyLoop


def check_head(request: Request[Any, Any]) -> None:
    """Raise `MalformedHeader` (400) when the request's head has what HTTP forbids
    (`common.http_head`) or ambiguous credential fields (`common.forwarding.
    credential_fault`: the credential forwarded must be the one checked)."""
    fault = head_fault(request.head)
    if fault is not None:
        request.stream.keep_alive = False  # type: ignore[union-attr]  # its framing is suspect
        raise MalformedHeader(fault)
    fault = headers_credential_fault(request.headers)
    if fault is not None:
        raise MalformedHeader(fault)


def refuse_loop(request: Request[Any, Any]) -> None:
    """Raise `ProxyLoop` (508) when a request about to be forwarded to an instance has
    come through the gateway `MAX_VIA_HOPS` times already (its `Via` fields say so).
    Only there: another route answers as it would without the field."""
    if via_loop(request.headers.getall("via", None)):
        raise ProxyLoop(PROXY_LOOP)


def json_object(request: Request[Any, Any], *, empty_ok: bool = True) -> dict[str, Any]:
    """The body as a JSON object; an empty body is `{}` when `empty_ok`."""
    raw = request.body
    if not raw or not raw.strip():
        if empty_ok:
            return {}
        raise MalformedJson("a JSON object body is required")
    try:
        value = parse_json(raw)
    except ValueError as exc:
        raise MalformedJson(f"body is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise MalformedJson(f"body must be a JSON object, not {json_type(value)}")
    return value


def request_id_from(request: Request[Any, Any]) -> str:
    """The caller's `X-Request-Id` when it is well formed, else a new one."""
    return request_id_of(request.headers.get("x-request-id"))
