"""Framing and reading one request for the fast path: whole, plainly framed, `/svc/`.

httptools parses it (strict: no bare LF, no folding, no duplicate Content-Length),
and the head must end where httptools says it does, so the fast path and Sanic can
never frame the same bytes differently.

With the compiled build (unless `SWITCHBOARD_C=0`), `parse_request` asks `_creq.c` first:
the same parse in C, for the plain case only (its docstring says what it declines),
and this Python, its reference, runs whenever it declines.
"""

from __future__ import annotations

import re
import time
from typing import Any

from httptools import HttpParserError, HttpParserUpgrade, HttpRequestParser

from common.compiled import c_module
from common.forwarding import MAX_VIA_HOPS, credential_fault, via_hops
from common.http_head import MAX_HEAD, connection_tokens_raw, valid_host
from common.proxy_paths import InvalidProxyPath, upstream_target
from webapi.heartbeats import SERVICE_NAME

MAX_FAST_BODY = 64 * 1024
MAX_FAST_HEAD = MAX_HEAD  # (as Sanic's path: `common.strict_http`)
_METHODS = frozenset({b"GET", b"HEAD", b"POST", b"PUT", b"PATCH", b"DELETE", b"OPTIONS"})
# `/svc/<service>/` and a first path character the route's `<path:path>` accepts.
_SVC_PATH = re.compile(rb"/svc/(" + SERVICE_NAME.pattern.strip("^$").encode() + rb")/[^/?]")
# The same parse in C (`_creq.c`, this module's `parse_request` its reference), or None:
# only with the compiled build, unless `SWITCHBOARD_C=0` (`common.compiled.c_module`).
# Not Final: the tests swap it (mypyc reads a module global from the module's dict).
_C = c_module("webapi.fastpath._creq")
_NONE: list[bytes] = []  # shared, never mutated: `connection = [*connection, value]`
_REFUSED = frozenset({b"transfer-encoding", b"upgrade", b"expect"})
# Headers whose first value the fast path reads (as Sanic's `headers.get` would).
_READ = frozenset({b"authorization", b"x-api-key", b"x-request-id", b"x-service-version",
                   b"x-balance-key", b"host"})  # fmt: skip


class Parsed:
    """A complete request the fast path may take, before the access checks. It is also
    httptools' callbacks object while the request is parsed (one object per request)."""

    __slots__ = ("begun", "body", "connection", "done", "first", "head_done", "headers",
                 "hops", "keep_alive", "length", "method", "received", "refused", "service",
                 "size", "target", "url")  # fmt: skip

    def __init__(self) -> None:
        self.size = 0  # bytes it takes at the start of the buffer
        self.method = ""
        self.url = b""
        self.service = ""
        self.target = ""
        self.headers: list[tuple[bytes, bytes]] = []  # as received, names in lower case
        # The first value of the `_READ` headers, as Sanic reads it.
        self.first: dict[bytes, str] = {}
        self.connection: list[bytes] = _NONE  # the values of `Connection` fields
        self.body: bytes | None = None
        self.keep_alive = True  # the connection stays open after it (`_start`: KEEP_ALIVE too)
        self.received = 0.0  # `time.perf_counter()` when it was parsed
        self.hops = 0  # the gateway's marks in its `Via` fields
        # While parsing.
        self.begun = 0
        self.length = 0
        self.head_done = self.done = self.refused = False

    def header(self, name: str) -> str | None:
        """The first value of header `name` (lower case), as Sanic's `headers.get` reads it."""
        wanted = name.encode("latin-1")
        for key, value in self.headers:
            if key == wanted:
                return value.decode("utf-8", "surrogateescape")
        return None

    def header_values(self, name: str) -> list[str]:
        """The values of every field line of header `name` (lower case), in order, as
        Sanic's `headers.get_all` reads them."""
        wanted = name.encode("latin-1")
        return [v.decode("utf-8", "surrogateescape") for k, v in self.headers if k == wanted]

    def body_length(self) -> int:
        return 0 if self.body is None else len(self.body)

    # httptools callbacks.

    def on_message_begin(self) -> None:
        self.begun += 1

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, raw_name: bytes, value: bytes) -> None:
        name = raw_name.lower()
        self.headers.append((name, value))
        if name in _SPECIAL:
            if name in _REFUSED or (
                name == b"host" and (b"host" in self.first or not valid_host(value))
            ):
                self.refused = True  # (Sanic's route refuses a bad Host: `common.http_head`)
            elif name == b"content-length":
                self.length = int(value)  # httptools allows digits only, and one of them
            elif name == b"connection":
                # A list of tokens (`common.strict_http` reads it so too): any `close`
                # in any of its fields ends the connection; other tokens do not.
                if b"close" in value.lower() and _CLOSE in connection_tokens_raw(value):
                    self.keep_alive = False
                self.connection = [*self.connection, value]
            elif name == b"via":
                self.hops += via_hops(value.decode("latin-1"))
            if name in _READ:
                if name not in self.first:
                    self.first[name] = value.decode("utf-8", "surrogateescape")
                elif name in _CREDENTIAL:  # a second one: Sanic's `check_head` refuses it
                    self.refused = True

    def on_headers_complete(self) -> None:
        self.head_done = True

    def on_body(self, body: bytes) -> None:
        self.body = body if self.body is None else self.body + body

    def on_message_complete(self) -> None:
        self.done = True


class Incomplete:
    """`parse_request`'s answer for a request whose head qualifies and whose body has
    not arrived whole yet (clients often write the head and the body separately):
    `needed`, the bytes the whole request takes, says when to parse it again; `head`,
    the request as far as parsed (its head: whether its credential may wait for it)."""

    __slots__ = ("head", "needed")

    def __init__(self, needed: int, head: Parsed) -> None:
        self.needed = needed
        self.head = head


def parse_request(buf: bytes | bytearray) -> Parsed | Incomplete | None:
    """The request at the start of `buf` if it is whole and plainly framed and its path
    is a `/svc/` one (see the module docstring), `Incomplete` if only its body is
    missing yet, else None. Hot path."""
    if _C is not None:
        read = _C.parse(buf)
        if read is not None:
            return _from_c(read)  # (else declined: unusual, read below)
    end = buf.find(b"\r\n\r\n", 0, MAX_FAST_HEAD)
    space = buf.find(b" ", 0, 8)
    if end < 0 or space < 0 or buf[space : space + 6] != b" /svc/":
        return None
    size = end + 4
    req = Parsed()
    parser = HttpRequestParser(req)
    try:
        parser.feed_data(bytes(buf[:size]))
    except (HttpParserError, HttpParserUpgrade):
        return None
    # One message whose head ends where ours does (else the parser framed it otherwise).
    if not req.head_done or req.begun != 1 or req.body is not None or req.refused:
        return None
    if req.hops >= MAX_VIA_HOPS:  # a loop: Sanic's route answers it (`refuse_loop`)
        return None
    first = req.first
    if (
        b"x-api-key" in first
        and b"authorization" in first
        and credential_fault([first[b"authorization"]], [first[b"x-api-key"]])
    ):
        return None  # two credentials: Sanic's `check_head` refuses them
    if b"host" not in req.first:
        return None
    method = parser.get_method()
    if method not in _METHODS or parser.get_http_version() != "1.1":
        return None
    url = req.url
    matched = _SVC_PATH.match(url)
    length = req.length
    if matched is None or length > MAX_FAST_BODY:
        return None
    service = req.service = matched.group(1).decode("ascii")
    try:
        req.target = upstream_target(url, f"/svc/{service}")
    except InvalidProxyPath:
        return None
    if len(buf) < size + length:
        return Incomplete(size + length, req)
    if length:
        try:
            parser.feed_data(bytes(buf[size : size + length]))
        except (HttpParserError, HttpParserUpgrade):
            return None
        if req.body_length() != length:
            return None
    if not req.done:  # (exactly `length` bytes were fed: no second message can begin)
        return None
    req.size = size + length
    req.method = method.decode("ascii")
    req.received = time.perf_counter()
    return req


def _from_c(read: tuple[Any, ...]) -> Parsed | Incomplete:
    """`parse_request`'s answer from the C parse's tuple (`_creq.c` says what it holds):
    every slot as the httptools callbacks above leave it."""
    (needed, whole, method, url, service, target, headers, first, connection, length,
     keep_alive, body) = read  # fmt: skip
    req = Parsed()
    req.url = url
    req.service = service
    req.target = target
    req.headers = headers
    req.first = first
    if connection is not None:
        req.connection = connection
    req.length = length
    req.keep_alive = keep_alive
    req.begun = 1
    req.head_done = True
    if not whole:
        return Incomplete(needed, req)
    req.body = body
    req.done = True
    req.size = needed
    req.method = method
    req.received = time.perf_counter()
    return req


def parse_head(buf: bytes | bytearray) -> Parsed | None:
    """The fields of the request head at the start of `buf`, when it is whole and httptools
    reads it (any path, method or framing), else None: for reading the fields of a request
    the fast path refuses (its client's address), not for forwarding it. Not on the hot
    path: only a refusal reads it."""
    end = buf.find(b"\r\n\r\n", 0, MAX_FAST_HEAD)
    if end < 0:
        return None
    req = Parsed()
    try:
        HttpRequestParser(req).feed_data(bytes(buf[: end + 4]))
    except HttpParserUpgrade:
        pass  # an upgrade's head: read whole all the same
    except HttpParserError:
        return None
    return req if req.head_done and req.begun == 1 else None


_CLOSE = b"close"
# The credential fields: a second one is refused (`common.forwarding.credential_fault`).
_CREDENTIAL = frozenset({b"authorization", b"x-api-key"})


# The header names `Parsed.on_header` looks at beyond collecting them.
_SPECIAL = _REFUSED | _READ | {b"content-length", b"connection", b"via"}
