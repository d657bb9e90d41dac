"""The response head the fast path writes to its client, as bytes.

The upstream's status and fields minus hop-by-hop ones, then the gateway's own:
`X-Upstream-Latency`, `X-Gateway-Latency` (ms), `X-Upstream-Instance`, `X-Request-Id`
(replacing the upstream's, as the `/svc/` route's middleware does), the body framing
and `Connection`. A HEAD answer keeps the upstream's `Content-Length` (the GET's length).

With the compiled build (unless `SWITCHBOARD_C=0`: `common.compiled.c_module`),
`_cheads.c` builds the same head in C from this module's constants (`init_c`); when it
declines (None: an upstream `Connection` that names fields, say), the Python below
runs: it is the reference (`tests/webapi/test_c_heads.py` compares the two).
"""

from __future__ import annotations

from collections.abc import Callable
from time import perf_counter
from types import ModuleType

from sanic.headers import format_http1_response
from sanic.helpers import STATUS_CODES

from common.compiled import c_module
from common.forwarding import HOP_BY_HOP_RAW, strip_hop_by_hop_raw
from webapi.errors import ErrorLogs, error_response
from webapi.proxy.forward import latencies_ms

_PROXY = b"proxy-"  # `Proxy-*` fields are hop-by-hop too
# Upstream fields replaced by the gateway's own.
_REPLACED = frozenset({b"content-length", b"x-request-id"})
_REPLACED_HEAD = frozenset({b"x-request-id"})

# How the body is framed to the client.
WHOLE = 0  # it follows whole: Content-Length is its length
CHUNKED = 1  # it is streamed chunked
KEPT = 2  # the upstream's Content-Length is kept (a streamed body of that length, a HEAD's)
NONE = 3  # no body (1xx, 204, 304): no framing field at all


def client_head(
    status: int,
    raw_headers: list[tuple[bytes, bytes]],
    *,
    framing: int,
    length: int,
    upstream_seconds: float,
    received: float,
    instance_id: str,
    request_id: str,
    keep_alive: bool,
) -> bytes:
    """The response head; `received` is when the request arrived (`perf_counter`), and
    `length` the body's length for `WHOLE`. Hot path: one pass over the upstream's
    fields, a second only when its `Connection` names some (`strip_hop_by_hop_raw`)."""
    if _C is not None:
        # (`now`: passed, as to `latencies_ms`, so the C reads no clock.)
        head: bytes | None = _C.client_head(
            status, raw_headers, framing, length, upstream_seconds, received, perf_counter(),
            instance_id, request_id, keep_alive,
        )  # fmt: skip
        if head is not None:
            return head
    replaced = _REPLACED_HEAD if framing == KEPT else _REPLACED
    lines = [
        _STATUS_LINES.get(status)
        or b"HTTP/1.1 %d %b" % (status, STATUS_CODES.get(status, b"UNKNOWN"))
    ]
    for name, value in raw_headers:
        lower = name.lower()
        if lower in HOP_BY_HOP_RAW or lower in replaced or lower.startswith(_PROXY):
            if lower == b"connection" and value.lower() not in _PLAIN_CONNECTION:
                # It names fields to drop too: the general (slower) filter.
                kept = strip_hop_by_hop_raw(raw_headers, replaced)
                lines = lines[:1] + [b"%b: %b" % field for field in kept]
                break
            continue
        lines.append(name + b": " + value)
    upstream_ms, gateway_ms = latencies_ms(upstream_seconds, received, perf_counter())
    lines.append(b"X-Upstream-Latency: %.3f" % upstream_ms)
    lines.append(b"X-Gateway-Latency: %.3f" % gateway_ms)
    lines.append(b"X-Upstream-Instance: " + instance_id.encode())
    lines.append(b"X-Request-Id: " + request_id.encode())
    if framing == WHOLE:
        lines.append(b"content-length: %d" % length)
    elif framing == CHUNKED:
        lines.append(b"transfer-encoding: chunked")
    lines.append(b"connection: keep-alive" if keep_alive else b"connection: close")
    lines.append(b"\r\n")
    return b"\r\n".join(lines)


def error_bytes(
    exc: Exception,
    method: str,
    url: bytes,
    request_id: str,
    keep_alive: bool,
    client: Callable[[], str],
    logs: ErrorLogs,
) -> bytes:
    """`exc` as the JSON error response Sanic's error handler would write, logged within
    the app's budgets (`logs`; `client`: the client's address, read for a refusal only)."""
    path = url.partition(b"?")[0].decode("latin-1")
    response = error_response(exc, method, path, request_id, logs, client=client)
    body = response.body or b""
    response.headers["content-length"] = str(len(body))
    response.headers["connection"] = "keep-alive" if keep_alive else "close"
    head = format_http1_response(response.status, response.processed_headers)
    return head if method == "HEAD" else head + body


def bodiless_framing(method: str, status: int) -> int | None:
    """The framing of a response without a body (`KEPT` for a HEAD's, `NONE` for a 1xx,
    204 or 304), None for a response with one."""
    if method == "HEAD":
        return KEPT
    if status in (204, 304) or 100 <= status < 200:  # Sanic's `has_message_body`, inline
        return NONE
    return None


# `Connection` values that name no other field.
_PLAIN_CONNECTION = frozenset({b"keep-alive", b"close", b""})
_STATUS_LINES = {status: b"HTTP/1.1 %d %b" % (status, reason)
                 for status, reason in STATUS_CODES.items()}  # fmt: skip


def init_c(module: ModuleType) -> ModuleType:
    """`module` (`webapi.fastpath._cheads`) given what `client_head` drops and adds: the
    C reads these objects, it has no copy of them."""
    module.init_client(HOP_BY_HOP_RAW, _REPLACED, _REPLACED_HEAD, _PROXY, _PLAIN_CONNECTION,
                       _STATUS_LINES, WHOLE, CHUNKED, KEPT)  # fmt: skip
    return module


_C_HEADS = c_module("webapi.fastpath._cheads")
# The C `client_head`, when used (`c_module`); read at each call (tests set it).
_C: ModuleType | None = None if _C_HEADS is None else init_c(_C_HEADS)
