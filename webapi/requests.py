"""Reading request input strictly: malformed input is a 4xx, never a 500."""

from __future__ import annotations

import itertools
import json
import os
import re
from typing import Any

from sanic import Request

from webapi.errors import MalformedHeader, MalformedJson

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
# A request head as HTTP/1.1 allows it (RFC 9110 §5.1, §5.5; RFC 9112 §2.2, §5.1): a
# request line with no control character, then lines `name:value` after CRLFs, the name
# a token directly followed by its colon, the value with no control character but tab.
# (No backtracking: a token holds no colon, a value no CR.)
_TOKEN = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_WELL_FORMED_HEAD = re.compile(
    rb"[^\x00-\x1f\x7f]*(?:\r\n" + _TOKEN + rb":[\t\x20-\x7e\x80-\xff]*)*"
)
_WELL_FORMED_FIELD = re.compile(_TOKEN + rb":[\t\x20-\x7e\x80-\xff]*")
_WELL_FORMED_NAME = re.compile(_TOKEN)


def check_head(request: Request[Any, Any]) -> None:
    """Raise `MalformedHeader` (400) when the request's head has what HTTP forbids.

    Sanic's own parser is lenient where a proxy must not be: it takes
    `Transfer-Encoding : chunked` (a space before the colon) as a field named
    `transfer-encoding ` and keeps a bare LF or a NUL inside a value. Forwarded, such a
    field could be read differently by the upstream (request smuggling), so the head
    of every request Sanic parses is checked here, as received (one regex match),
    before anything reads it. The fast path's httptools parser refuses such heads
    already and hands them to Sanic.
    """
    head = request.head
    if _WELL_FORMED_HEAD.fullmatch(head) is not None:
        return
    # Say what is wrong and where, never what a value holds: it may be a credential,
    # and the message is logged (design §10).
    _request_line, *fields = head.split(b"\r\n")
    for field in fields:
        if _WELL_FORMED_FIELD.fullmatch(field) is None:
            name, colon, _value = field.partition(b":")
            if not colon:
                raise MalformedHeader("a header line without a colon (folded lines are refused)")
            shown = name[:40].decode("latin-1")
            if _WELL_FORMED_NAME.fullmatch(name) is None:
                raise MalformedHeader(f"malformed header field name {shown!r}")
            raise MalformedHeader(f"control character in the value of header {shown!r}")
    raise MalformedHeader("control character in the request line")


def json_object(request: Request[Any, Any], *, empty_ok: bool = True) -> dict[str, Any]:
    """The body as a JSON object; an empty body is `{}` when `empty_ok`."""
    raw = request.body
    if not raw or not raw.strip():
        if empty_ok:
            return {}
        raise MalformedJson("a JSON object body is required")
    try:
        value = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise MalformedJson(f"body is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise MalformedJson(f"body must be a JSON object, not {type(value).__name__}")
    return value


def request_id_from(request: Request[Any, Any]) -> str:
    """The caller's `X-Request-Id` when it is well formed, else a new one."""
    return request_id_of(request.headers.get("x-request-id"))


def request_id_of(incoming: str | None) -> str:
    """`incoming` (an `X-Request-Id` value) when it is well formed, else a new id: 32 hex
    digits, a random 64-bit prefix drawn once per process and a 64-bit counter. Unique
    without a `getrandom` system call per request (hot path); request ids need not be
    unguessable (they are echoed to the caller and logged, never trusted)."""
    if incoming and _REQUEST_ID.match(incoming):
        return incoming
    return f"{_id_prefix}{next(_id_counter):016x}"


def _new_id_prefix() -> None:
    global _id_prefix, _id_counter
    _id_prefix, _id_counter = os.urandom(8).hex(), itertools.count()


_id_prefix, _id_counter = "", itertools.count()
_new_id_prefix()
os.register_at_fork(after_in_child=_new_id_prefix)  # a forked worker draws its own prefix
