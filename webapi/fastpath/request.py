"""Framing and reading one request for the fast path: whole, plainly framed, `/svc/`.

httptools parses it (strict: no bare LF, no folding, no duplicate Content-Length),
and the head must end where httptools says it does, so the fast path and Sanic can
never frame the same bytes differently.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass

from httptools import HttpParserError, HttpParserUpgrade, HttpRequestParser

from webapi.errors import InvalidProxyPath
from webapi.heartbeats import SERVICE_NAME
from webapi.proxy.paths import upstream_target

MAX_FAST_BODY = 64 * 1024
MAX_FAST_HEAD = 16 * 1024
_METHODS = frozenset({b"GET", b"HEAD", b"POST", b"PUT", b"PATCH", b"DELETE", b"OPTIONS"})
# `/svc/<service>/` and a first path character the route's `<path:path>` accepts.
_SVC_PATH = re.compile(rb"/svc/(" + SERVICE_NAME.pattern.strip("^$").encode() + rb")/[^/?]")
_NONE: list[bytes] = []  # shared, never mutated: `connection = [*connection, value]`
_REFUSED = frozenset({b"transfer-encoding", b"upgrade", b"expect"})
# Headers whose first value the fast path reads (as Sanic's `headers.get` would).
_READ = frozenset({b"authorization", b"x-api-key", b"x-request-id", b"x-service-version",
                   b"x-balance-key", b"host"})  # fmt: skip


class _Callbacks:
    """httptools callbacks for one request."""

    __slots__ = ("begun", "body", "done", "head_done", "headers", "url")

    def __init__(self) -> None:
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.body: list[bytes] = []
        self.begun = 0
        self.head_done = self.done = False

    def on_message_begin(self) -> None:
        self.begun += 1

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.head_done = True

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        self.done = True


@dataclass(slots=True)
class Parsed:
    """A complete request the fast path may take, before the access checks."""

    size: int  # bytes it takes at the start of the buffer
    method: str
    url: bytes
    service: str
    target: str
    headers: list[tuple[bytes, bytes]]  # as received, names in lower case
    first: dict[bytes, str]  # the first value of the `_READ` headers, as Sanic reads it
    connection: list[bytes]  # the values of `Connection` fields (empty list: none)
    body: bytes | None
    keep_alive: bool
    received: float  # `time.perf_counter()` when it was parsed


class Incomplete:
    """`parse_request`'s answer for a request whose head qualifies and whose body has
    not arrived whole yet (clients often write the head and the body separately)."""


INCOMPLETE = Incomplete()


def parse_request(buf: bytes | bytearray) -> Parsed | Incomplete | None:
    """The request at the start of `buf` if it is whole and plainly framed and its path
    is a `/svc/` one (see the module docstring), `INCOMPLETE` if only its body is
    missing yet, else None. Hot path."""
    end = buf.find(b"\r\n\r\n", 0, MAX_FAST_HEAD)
    space = buf.find(b" ", 0, 8)
    if end < 0 or space < 0 or buf[space : space + 6] != b" /svc/":
        return None
    size = end + 4
    calls = _Callbacks()
    parser = HttpRequestParser(calls)
    try:
        parser.feed_data(bytes(buf[:size]))
    except (HttpParserError, HttpParserUpgrade):
        return None
    # One message whose head ends where ours does (else the parser framed it otherwise).
    if not calls.head_done or calls.begun != 1 or calls.body:
        return None
    method = parser.get_method()
    if parser.get_http_version() != "1.1" or method not in _METHODS:
        return None
    headers: list[tuple[bytes, bytes]] = []
    first: dict[bytes, str] = {}
    connection: list[bytes] = _NONE
    length, keep_alive = 0, True
    for raw_name, value in calls.headers:
        name = raw_name.lower()
        if name in _REFUSED or (name == b"host" and b"host" in first):
            return None
        if name == b"content-length":
            length = int(value)  # httptools allows digits only, and one of them
        elif name == b"connection":
            keep_alive = value.lower() == b"keep-alive"  # Sanic's reading: the last one
            connection = [*connection, value]
        if name in _READ and name not in first:
            first[name] = value.decode("utf-8", "surrogateescape")
        headers.append((name, value))
    url = calls.url
    matched = _SVC_PATH.match(url)
    if matched is None or length > MAX_FAST_BODY:
        return None
    service = matched.group(1).decode("ascii")
    try:
        target = upstream_target(url, f"/svc/{service}")
    except InvalidProxyPath:
        return None
    if len(buf) < size + length:
        return INCOMPLETE
    body = None
    if length:
        try:
            parser.feed_data(bytes(buf[size : size + length]))
        except (HttpParserError, HttpParserUpgrade):
            return None
        body = b"".join(calls.body)
    if not calls.done or calls.begun != 1 or (body is not None and len(body) != length):
        return None
    return Parsed(size + length, method.decode("ascii"), url, service, target, headers,
                  first, connection, body, keep_alive, time.perf_counter())  # fmt: skip
