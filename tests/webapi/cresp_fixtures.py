"""The differential harness of the C read of a whole upstream response
(`webapi.proxy._cresp`, issue 4) and its corpus, for tests/webapi/test_c_cresp*.py.

Each case runs twice on a fresh `Connection` (the module under test, compiled when the
build is used), once with its `_C` off (httptools reads the bytes: the reference) and
once with the C behind a spy, and the two traces must be equal: every `Receiver`,
owner and transport call in order, with what the receiver holds at its head, and the
connection's state after each exchange. A case is a few exchanges on one connection
(the next ones only while it is kept alive), so the parser the C did not feed is
checked to read the next response as it should.
"""

from __future__ import annotations

import asyncio
import importlib
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import pytest

import webapi.proxy
import webapi.proxy.connection as connection
from common.compiled import build_state
from webapi.proxy.connection import Connection
from webapi.proxy.deadlines import Deadlines


@pytest.fixture(name="cresp", scope="module")
def cresp_module() -> ModuleType:
    """The C module, imported from the build; the test is skipped when it is not used."""
    state = build_state()
    if not state.used:
        pytest.skip(f"the compiled build is not used: {state.reason}")
    assert webapi.proxy.__path__[0].endswith(".compiled/webapi/proxy")  # prefer_compiled ran
    return importlib.import_module("webapi.proxy._cresp")


class Spy:
    """`_C` for the connection: the C module, its answers counted."""

    def __init__(self, module: ModuleType) -> None:
        self.module = module
        self.calls = 0
        self.answers = 0

    def parse_response(self, data: bytes, head_request: bool) -> Any:
        whole = self.module.parse_response(data, head_request)
        self.calls += 1
        self.answers += whole is not None
        return whole


# The connection's surroundings, recording what it does.


class Transport:
    def __init__(self, log: list[Any]) -> None:
        self.log = log
        self.closing = False

    def write(self, data: bytes) -> None:
        pass

    def is_closing(self) -> bool:
        return self.closing

    def abort(self) -> None:
        self.log.append("abort")
        self.closing = True

    def close(self) -> None:
        self.log.append("close")
        self.closing = True

    def pause_reading(self) -> None:
        self.log.append("pause_reading")

    def resume_reading(self) -> None:
        self.log.append("resume_reading")


class Owner:
    address = "upstream.test:80"

    def __init__(self, log: list[Any]) -> None:
        self.log = log

    def release(self, conn: Connection) -> None:
        self.log.append("release")

    def forget(self, conn: Connection) -> None:
        self.log.append("forget")


class Recorder:
    """A `Receiver` that logs its calls; `raising`: the call that raises ("_head" or
    "_feed"), as a buggy receiver would."""

    def __init__(self, log: list[Any], raising: str = "") -> None:
        self.log = log
        self.raising = raising
        self.status = 0
        self.reason = ""
        self.raw_headers: list[tuple[bytes, bytes]] = []
        self.buffered = 0

    def _head(self) -> None:
        self.log.append(("head", self.status, self.reason, list(self.raw_headers)))
        if self.raising == "_head":
            raise ValueError("head refused")

    def _feed(self, data: bytes) -> int:
        self.log.append(("feed", data))
        if self.raising == "_feed":
            raise ValueError("feed refused")
        self.buffered += len(data)
        return self.buffered  # as `UpstreamResponse`: nothing consumed yet

    def _flush(self) -> None:
        self.log.append("flush")

    def _complete(self) -> None:
        self.log.append(("complete", self.status, self.reason, list(self.raw_headers)))

    def _fail(self, exc: BaseException) -> None:
        cause = exc.__cause__
        self.log.append(
            (
                "fail",
                type(exc).__name__,
                str(exc),
                type(cause).__name__,
                str(cause),
                repr(cause.__context__) if cause else "",
            )
        )


_STATE = (
    "lost",
    "reading_paused",
    "_got_data",
    "_head_done",
    "_interim",
    "_message_done",
    "_keep_alive",
    "_framed",
    "_coded",
    "_broken",
    "_received",
    "_head_bytes",
    "_reason",
    "_raw_headers",
    "_content_length",
    "_upload_done",
)

# An exchange: whether the request was HEAD, and the reads its response arrives in.
Exchange = tuple[bool, list[bytes]]


@pytest.fixture(name="loop", scope="module")
def clock_loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()  # for its clock and timers; never run
    yield loop
    loop.close()


def trace(
    loop: asyncio.AbstractEventLoop,
    c: object,
    exchanges: list[Exchange],
    max_body: int | None = None,
    raising: str = "",
) -> list[Any]:
    """Everything one connection does with `exchanges`, with `_C` set to `c`."""
    log: list[Any] = []
    saved = connection._C
    connection._C = c
    try:
        conn = Connection(Owner(log), loop, 5.0, max_body, Deadlines(loop))
        transport = Transport(log)
        conn.connection_made(transport)
        for head_request, reads in exchanges:
            if transport.closing:
                break
            conn.send(b"GET / HTTP/1.1\r\n\r\n", Recorder(log, raising), head_request, None)
            for data in reads:
                if transport.closing:
                    break
                conn.data_received(data)
            ended = conn._resp is None
            log.append(
                {name: getattr(conn, name) for name in _STATE}
                | {"ended": ended, "parser": conn._parser is None, "timers": len(conn._deadlines)}
            )
            if not ended:
                break  # a response still arriving: the case is over
    finally:
        connection._C = saved
    return log


def differential(
    loop: asyncio.AbstractEventLoop,
    cresp: ModuleType,
    exchanges: list[Exchange],
    max_body: int | None = None,
    raising: str = "",
) -> tuple[list[Any], bool]:
    """The trace (equal with the C and without) and whether the C answered the first read."""
    spy = Spy(cresp)
    with_c = trace(loop, spy, exchanges, max_body, raising)
    reference = trace(loop, None, exchanges, max_body, raising)
    assert with_c == reference, exchanges
    first = Spy(cresp)
    first.parse_response(exchanges[0][1][0], exchanges[0][0])
    return reference, first.answers == 1


# The corpus: responses the backends send (their heads as they are on the wire).

NGINX_HEAD = (
    b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Mon, 23 Nov 2026 05:08:49 GMT"
    b"\r\nContent-Type: application/json\r\nContent-Length: 27\r\n"
    b"Connection: keep-alive\r\n\r\n"
)
NGINX = NGINX_HEAD + b'{"ok":true,"items":[1,2,3]}'
NGINX_FILE_HEAD = (
    b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Mon, 23 Nov 2026 05:08:51 "
    b"GMT\r\nContent-Type: text/plain\r\nContent-Length: 8\r\nLast-Modified: Mon, "
    b"23 Nov 2026 05:08:48 GMT\r\nConnection: keep-alive\r\n"
    b'ETag: "6b03ca60-8"\r\nAccept-Ranges: bytes\r\n\r\n'
)
NGINX_204 = (
    b"HTTP/1.1 204 No Content\r\nServer: nginx/1.22.1\r\nDate: Mon, 23 Nov 2026 "
    b"05:08:50 GMT\r\nConnection: keep-alive\r\n\r\n"
)
NGINX_304 = (
    b"HTTP/1.1 304 Not Modified\r\nServer: nginx/1.22.1\r\nDate: Mon, 23 Nov 2026 "
    b"05:08:56 GMT\r\nLast-Modified: Mon, 23 Nov 2026 05:08:48 GMT\r\n"
    b'Connection: keep-alive\r\nETag: "6b03ca60-8"\r\n\r\n'
)
NGINX_404_CLOSE = (
    b"HTTP/1.1 404 Not Found\r\nServer: nginx/1.22.1\r\nDate: Mon, 23 Nov 2026 "
    b"05:08:52 GMT\r\nContent-Type: text/html\r\nContent-Length: 153\r\n"
    b"Connection: close\r\n\r\n<html>\r\n<head><title>404 Not Found</title>"
    b"</head>\r\n<body>\r\n<center><h1>404 Not Found</h1></center>\r\n<hr>"
    b"<center>nginx/1.22.1</center>\r\n</body>\r\n</html>\r\n"
)
ECHO = (
    b"HTTP/1.1 200 OK\r\ncontent-length: 74\r\nconnection: keep-alive\r\ncontent-type: "
    b'application/json\r\n\r\n{"instance":"cresp-b","path":"/echo","query":"a=1",'
    b'"headers":{"host":"x"}}'
)
ECHO_405_HEAD = (
    b"HTTP/1.1 405 Method Not Allowed\r\nAllow: GET\r\ncontent-length: 101\r\n"
    b"connection: keep-alive\r\ncontent-type: text/plain; charset=utf-8\r\n\r\n"
)
ECHO_404_CLOSE = (
    b"HTTP/1.1 404 Not Found\r\ncontent-length: 35\r\nconnection: close\r\n"
    b'content-type: application/json\r\n\r\n{"instance":"cresp-b","status":404}'
)
BENCH = (
    b"HTTP/1.1 200 OK\r\nServer: bench\r\nContent-Type: application/json\r\n"
    b"Content-Length: 2\r\n\r\n{}"
)


def ok(body: bytes, *fields: bytes, status: bytes = b"200 OK") -> bytes:
    head = b"".join(field + b"\r\n" for field in fields)
    return b"HTTP/1.1 %s\r\n%sContent-Length: %d\r\n\r\n%s" % (status, head, len(body), body)


# (HEAD request, the response): each answered by the C, whole in one read.
CORPUS: list[tuple[bool, bytes]] = [
    (False, NGINX),
    (True, NGINX_HEAD),
    (False, NGINX_FILE_HEAD + b'{"a":1}\n'),
    (True, NGINX_FILE_HEAD.replace(b"keep-alive", b"close")),
    (False, NGINX_204),
    (True, NGINX_204),
    (False, NGINX_304),
    (False, NGINX_404_CLOSE),
    (False, ECHO),
    (True, ECHO_405_HEAD),
    (False, ECHO_404_CLOSE),
    (False, b"HTTP/1.1 204 No Content\r\nconnection: keep-alive\r\n\r\n"),
    (False, b"HTTP/1.1 304 Not Modified\r\nconnection: keep-alive\r\n\r\n"),
    (False, BENCH),
    (False, ok(b"")),  # an empty body
    (False, ok(b"", b"Connection: close")),
    (False, ok(b'{"answer": "\xc3\xa9t\xc3\xa9"}', b"Content-Type: application/json")),
    (False, ok(b"x", status=b"201 Created")),
    (False, ok(b"gone", status=b"503 Service Unavailable")),
    (False, ok(b"y", status=b"200")),  # no reason phrase
    (False, ok(b"y", status=b"200 ")),
    (False, ok(b"y", status=b"299 Very\tOdd  \xe9")),
    (False, ok(b"z", b"X-Empty:", b"X-Spaces: \t a b \t ", b"X-High: caf\xe9", b"x-lower: 1")),
    (False, ok(b"z", b"Set-Cookie: a=1", b"Set-Cookie: b=2", b"CONNECTION: Keep-Alive")),
    (False, ok(b"q", b"Connection: keep-alive", b"connection: CLOSE")),
    (False, ok(b"q", b"Connection: \tclose")),
    (False, ok(b"", b"Keep-Alive: timeout=5")),
    (False, ok(b"abc").replace(b"Length: 3", b"Length: 003")),
    (False, ok(b"abc").replace(b"Length: 3", b"Length:\t3")),
    (True, b"HTTP/1.1 204 No Content\r\nContent-Length: 12\r\n\r\n"),
    (False, b"HTTP/1.1 304 Not Modified\r\nContent-Length: 900\r\n\r\n"),
    (True, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"),
]
