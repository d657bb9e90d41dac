"""The response head the fast path writes to its client, as bytes.

The upstream's status and fields minus hop-by-hop ones, then the gateway's own:
`X-Upstream-Latency`, `X-Gateway-Latency` (ms), `X-Upstream-Instance`, `X-Request-Id`
(replacing the upstream's, as the `/svc/` route's middleware does), the body framing
and `Connection`. A HEAD answer keeps the upstream's `Content-Length` (the GET's length).
"""

from __future__ import annotations

import time

from sanic.headers import format_http1_response

from webapi.proxy.headers import strip_hop_by_hop_raw

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
    `length` the body's length for `WHOLE`. Hot path."""
    kept = strip_hop_by_hop_raw(raw_headers, _REPLACED_HEAD if framing == KEPT else _REPLACED)
    gateway_ms = max(time.perf_counter() - received - upstream_seconds, 0.0) * 1000
    kept.append((b"X-Upstream-Latency", b"%.3f" % (upstream_seconds * 1000)))
    kept.append((b"X-Gateway-Latency", b"%.3f" % gateway_ms))
    kept.append((b"X-Upstream-Instance", instance_id.encode()))
    kept.append((b"X-Request-Id", request_id.encode()))
    if framing == WHOLE:
        kept.append((b"content-length", b"%d" % length))
    elif framing == CHUNKED:
        kept.append((b"transfer-encoding", b"chunked"))
    kept.append((b"connection", b"keep-alive" if keep_alive else b"close"))
    return format_http1_response(status, kept)
