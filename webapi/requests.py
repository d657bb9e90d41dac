"""Reading request input strictly: malformed input is a 4xx, never a 500."""

from __future__ import annotations

import itertools
import os
import re
from typing import Any

from sanic import Request

from common.codec import json_type, parse_json
from common.http_head import head_fault
from webapi.errors import MalformedHeader, MalformedJson, ProxyLoop
from webapi.proxy.headers import MAX_VIA_HOPS, VIA_MARK

_VIA_MARK = VIA_MARK.decode()

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


def check_head(request: Request[Any, Any]) -> None:
    """Raise `MalformedHeader` (400) when the request's head has what HTTP forbids
    (`common.http_head`), `ProxyLoop` (508) when it has come through the gateway
    `MAX_VIA_HOPS` times already (its `Via` fields say so)."""
    fault = head_fault(request.head)
    if fault is not None:
        request.stream.keep_alive = False  # type: ignore[union-attr]  # its framing is suspect
        raise MalformedHeader(fault)
    vias = request.headers.getall("via", None)
    if vias and sum(via.count(_VIA_MARK) for via in vias) >= MAX_VIA_HOPS:
        raise ProxyLoop("the request has come through the gateway too often: a proxy loop")


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


def request_id_of(incoming: str | None) -> str:
    """`incoming` (an `X-Request-Id` value) when it is well formed, else a new id: 32 hex
    digits, a random 64-bit prefix drawn once per process and a 64-bit counter. Unique
    without a `getrandom` system call per request (hot path); request ids need not be
    unguessable (they are echoed to the caller and logged, never trusted)."""
    if incoming and _REQUEST_ID.fullmatch(incoming):
        return incoming
    return f"{_id_prefix}{next(_id_counter):016x}"


def _new_id_prefix() -> None:
    global _id_prefix, _id_counter
    _id_prefix, _id_counter = os.urandom(8).hex(), itertools.count()


_id_prefix, _id_counter = "", itertools.count()
_new_id_prefix()
os.register_at_fork(after_in_child=_new_id_prefix)  # a forked worker draws its own prefix
