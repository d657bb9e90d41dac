"""`webapi.proxy._cresp`, the C read of a whole upstream response (issue 4), against its
reference: the same `Connection` reading the same bytes with httptools.

Each case runs twice on a fresh `Connection` (the module under test, compiled when the
build is used), once with its `_C` off and once with the C behind a spy, and the two
traces must be equal: every `Receiver`, owner and transport call in order, with what
the receiver holds at its head, and the connection's state after each exchange. A case
is a few exchanges on one connection (the next ones only while it is kept alive), so
the parser the C did not feed is checked to read the next response as it should.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import random
import resource
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType
from typing import Any

import httpx
import pytest

import webapi.proxy
import webapi.proxy.connection as connection
from common.compiled import build_state
from tests.helpers import ServiceProcess, free_port, wait_for
from tests.webapi.conftest import Backend, as_admin, fast_path, running_backend, running_gateway
from tests.webapi.upstream_servers import Peer, Upstream
from webapi.proxy import UpstreamPool
from webapi.proxy.connection import Connection
from webapi.proxy.deadlines import Deadlines
from webapi.proxy.response import HIGH_WATER

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def cresp() -> ModuleType:
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


@pytest.fixture(scope="module")
def loop() -> Iterator[asyncio.AbstractEventLoop]:
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

_NGINX_HEAD = (
    b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Mon, 23 Nov 2026 05:08:49 GMT"
    b"\r\nContent-Type: application/json\r\nContent-Length: 27\r\n"
    b"Connection: keep-alive\r\n\r\n"
)
_NGINX = _NGINX_HEAD + b'{"ok":true,"items":[1,2,3]}'
_NGINX_FILE_HEAD = (
    b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Mon, 23 Nov 2026 05:08:51 "
    b"GMT\r\nContent-Type: text/plain\r\nContent-Length: 8\r\nLast-Modified: Mon, "
    b"23 Nov 2026 05:08:48 GMT\r\nConnection: keep-alive\r\n"
    b'ETag: "6b03ca60-8"\r\nAccept-Ranges: bytes\r\n\r\n'
)
_NGINX_204 = (
    b"HTTP/1.1 204 No Content\r\nServer: nginx/1.22.1\r\nDate: Mon, 23 Nov 2026 "
    b"05:08:50 GMT\r\nConnection: keep-alive\r\n\r\n"
)
_NGINX_304 = (
    b"HTTP/1.1 304 Not Modified\r\nServer: nginx/1.22.1\r\nDate: Mon, 23 Nov 2026 "
    b"05:08:56 GMT\r\nLast-Modified: Mon, 23 Nov 2026 05:08:48 GMT\r\n"
    b'Connection: keep-alive\r\nETag: "6b03ca60-8"\r\n\r\n'
)
_NGINX_404_CLOSE = (
    b"HTTP/1.1 404 Not Found\r\nServer: nginx/1.22.1\r\nDate: Mon, 23 Nov 2026 "
    b"05:08:52 GMT\r\nContent-Type: text/html\r\nContent-Length: 153\r\n"
    b"Connection: close\r\n\r\n<html>\r\n<head><title>404 Not Found</title>"
    b"</head>\r\n<body>\r\n<center><h1>404 Not Found</h1></center>\r\n<hr>"
    b"<center>nginx/1.22.1</center>\r\n</body>\r\n</html>\r\n"
)
_ECHO = (
    b"HTTP/1.1 200 OK\r\ncontent-length: 74\r\nconnection: keep-alive\r\ncontent-type: "
    b'application/json\r\n\r\n{"instance":"cresp-b","path":"/echo","query":"a=1",'
    b'"headers":{"host":"x"}}'
)
_ECHO_405_HEAD = (
    b"HTTP/1.1 405 Method Not Allowed\r\nAllow: GET\r\ncontent-length: 101\r\n"
    b"connection: keep-alive\r\ncontent-type: text/plain; charset=utf-8\r\n\r\n"
)
_ECHO_404_CLOSE = (
    b"HTTP/1.1 404 Not Found\r\ncontent-length: 35\r\nconnection: close\r\n"
    b'content-type: application/json\r\n\r\n{"instance":"cresp-b","status":404}'
)
_BENCH = (
    b"HTTP/1.1 200 OK\r\nServer: bench\r\nContent-Type: application/json\r\n"
    b"Content-Length: 2\r\n\r\n{}"
)


def _ok(body: bytes, *fields: bytes, status: bytes = b"200 OK") -> bytes:
    head = b"".join(field + b"\r\n" for field in fields)
    return b"HTTP/1.1 %s\r\n%sContent-Length: %d\r\n\r\n%s" % (status, head, len(body), body)


# (HEAD request, the response): each answered by the C, whole in one read.
CORPUS: list[tuple[bool, bytes]] = [
    (False, _NGINX),
    (True, _NGINX_HEAD),
    (False, _NGINX_FILE_HEAD + b'{"a":1}\n'),
    (True, _NGINX_FILE_HEAD.replace(b"keep-alive", b"close")),
    (False, _NGINX_204),
    (True, _NGINX_204),
    (False, _NGINX_304),
    (False, _NGINX_404_CLOSE),
    (False, _ECHO),
    (True, _ECHO_405_HEAD),
    (False, _ECHO_404_CLOSE),
    (False, b"HTTP/1.1 204 No Content\r\nconnection: keep-alive\r\n\r\n"),
    (False, b"HTTP/1.1 304 Not Modified\r\nconnection: keep-alive\r\n\r\n"),
    (False, _BENCH),
    (False, _ok(b"")),  # an empty body
    (False, _ok(b"", b"Connection: close")),
    (False, _ok(b'{"answer": "\xc3\xa9t\xc3\xa9"}', b"Content-Type: application/json")),
    (False, _ok(b"x", status=b"201 Created")),
    (False, _ok(b"gone", status=b"503 Service Unavailable")),
    (False, _ok(b"y", status=b"200")),  # no reason phrase
    (False, _ok(b"y", status=b"200 ")),
    (False, _ok(b"y", status=b"299 Very\tOdd  \xe9")),
    (False, _ok(b"z", b"X-Empty:", b"X-Spaces: \t a b \t ", b"X-High: caf\xe9", b"x-lower: 1")),
    (False, _ok(b"z", b"Set-Cookie: a=1", b"Set-Cookie: b=2", b"CONNECTION: Keep-Alive")),
    (False, _ok(b"q", b"Connection: keep-alive", b"connection: CLOSE")),
    (False, _ok(b"q", b"Connection: \tclose")),
    (False, _ok(b"", b"Keep-Alive: timeout=5")),
    (False, _ok(b"abc").replace(b"Length: 3", b"Length: 003")),
    (False, _ok(b"abc").replace(b"Length: 3", b"Length:\t3")),
    (True, b"HTTP/1.1 204 No Content\r\nContent-Length: 12\r\n\r\n"),
    (False, b"HTTP/1.1 304 Not Modified\r\nContent-Length: 900\r\n\r\n"),
    (True, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"),
]


@pytest.mark.parametrize(("head_request", "response"), CORPUS)
def test_the_c_answers_ordinary_responses_as_httptools_reads_them(
    loop: asyncio.AbstractEventLoop, cresp: ModuleType, head_request: bool, response: bytes
) -> None:
    # Then an ordinary response whole, and one in two reads (httptools' path), while
    # the connection is kept alive.
    exchanges = [(head_request, [response]), (False, [_NGINX]), (False, [_ECHO[:30], _ECHO[30:]])]
    log, answered = differential(loop, cresp, exchanges)
    assert answered
    assert log[0][0] == "head"
    closing = b"close" in response.lower()
    assert log.count("release") == (0 if closing else 3)  # back to the pool after each


def test_a_response_the_c_reads_is_recorded_as_the_callbacks_record_it(cresp: ModuleType) -> None:
    whole = cresp.parse_response(_NGINX_404_CLOSE, False)
    assert whole == (
        404,
        b"Not Found",
        [
            (b"Server", b"nginx/1.22.1"),
            (b"Date", b"Mon, 23 Nov 2026 05:08:52 GMT"),
            (b"Content-Type", b"text/html"),
            (b"Content-Length", b"153"),
            (b"Connection", b"close"),
        ],
        b"153",
        False,
        _NGINX_404_CLOSE[-153:],
    )
    assert whole[3] is whole[2][3][1]  # the field's value itself
    assert cresp.parse_response(_NGINX_HEAD, True) == (
        200,
        b"OK",
        [
            (b"Server", b"nginx/1.22.1"),
            (b"Date", b"Mon, 23 Nov 2026 05:08:49 GMT"),
            (b"Content-Type", b"application/json"),
            (b"Content-Length", b"27"),
            (b"Connection", b"keep-alive"),
        ],
        b"27",
        True,
        b"",
    )
    assert cresp.parse_response(_NGINX_204, False)[3:] == (None, True, b"")


# What the C declines (httptools then reads it, as without the C).
DECLINED: list[tuple[bool, bytes]] = [
    (False, _NGINX_HEAD),  # the body has not arrived
    (False, _NGINX[:-1]),
    (False, _NGINX + b"H"),  # bytes after the response
    (False, _NGINX + _NGINX),  # a second response
    (True, _NGINX),  # a body after a HEAD's head
    (False, _NGINX.replace(b"HTTP/1.1", b"HTTP/1.0")),
    (False, _NGINX.replace(b"200 OK", b"100 Continue", 1)),
    (False, b"HTTP/1.1 100 Continue\r\n\r\n" + _NGINX),
    (False, b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n" + _NGINX),
    (
        False,
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",
    ),
    (False, _ok(b"x", status=b"099 Low")),
    (False, _ok(b"x", status=b"600 High")),
    (False, _ok(b"x", status=b"2000 OK")),
    (False, b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n"),
    (False, _ok(b"hi", b"Transfer-Encoding: gzip")),
    (False, _ok(b"hi", b"Upgrade: h2c")),
    (False, _ok(b"hi", b"Proxy-Connection: close")),
    (False, _ok(b"hi", b"Connection: upgrade")),
    (False, _ok(b"hi", b"Connection: close, x")),
    (False, _ok(b"hi", b"Connection: close ")),
    (False, b"HTTP/1.1 200 OK\r\nServer: x\r\n\r\n"),  # delimited by the connection's end
    (True, b"HTTP/1.1 200 OK\r\nServer: x\r\n\r\n"),
    (False, _ok(b"hi", b"Content-Length: 2")),  # two Content-Length fields
    (False, _ok(b"hi").replace(b"Length: 2", b"Length: 2 ")),
    (False, _ok(b"hi").replace(b"Length: 2", b"Length: +2")),
    (False, _ok(b"hi").replace(b"Length: 2", b"Length:")),
    (False, _ok(b"hi", b"X-Fold: a", b" b")),  # obs-fold
    (False, _ok(b"hi", b"X-Bad : a")),
    (False, _ok(b"hi", b"X-Ctl: a\x01b")),
    (False, _ok(b"hi", b"X-Del: a\x7f")),
    (False, _ok(b"hi", b"X-Nul: \x00")),
    (False, _ok(b"hi", status=b"200 O\x01K")),
    (False, _ok(b"hi").replace(b"\r\nContent", b"\nContent")),  # bare LF
    (False, _ok(b"hi").replace(b"OK\r\n", b"OK\n")),
    (False, _ok(b"hi").replace(b"OK\r\n", b"OK\r\r\n")),
    (False, _ok(b"hi").replace(b"\r\n\r\n", b"\r\n\n")),
    (False, _ok(b"hi", b"X-\xe9: a")),  # a name that is not a token
    (False, b"HTTP/1.1 200 OK\r\nContent-Length: 1234567890123456\r\n\r\n"),
    (False, b""),
    (False, b"HTTP/1.1 200 OK\r\n"),
]


@pytest.mark.parametrize(("head_request", "response"), DECLINED)
def test_the_c_declines_what_it_does_not_read(
    loop: asyncio.AbstractEventLoop, cresp: ModuleType, head_request: bool, response: bytes
) -> None:
    assert cresp.parse_response(response, head_request) is None
    differential(loop, cresp, [(head_request, [response]), (False, [_NGINX])])
    assert cresp.parse_response(bytearray(_NGINX), False) is None  # bytes only


def test_the_c_path_keeps_the_connections_limits_and_errors(
    loop: asyncio.AbstractEventLoop, cresp: ModuleType
) -> None:
    # Over the body limit: the head fails it, as in httptools' path.
    log, answered = differential(loop, cresp, [(False, [_NGINX])], max_body=26)
    assert answered and log[0][0] == "fail" and log[0][1] == "UpstreamBodyTooLarge"
    differential(loop, cresp, [(True, [_NGINX_HEAD])], max_body=26)  # as the head says
    log, _ = differential(loop, cresp, [(False, [_NGINX])], max_body=27)
    assert log[1][0] == "feed"
    # A body over the high-water mark pauses reading, then the end resumes it.
    big = _ok(b"b" * (HIGH_WATER + 1))
    log, answered = differential(loop, cresp, [(False, [big]), (False, [_NGINX])])
    assert answered and log[2:5] == ["pause_reading", "resume_reading", "release"]
    # A receiver's error stops the read, as in httptools' callbacks.
    for raising in ("_head", "_feed"):
        log, answered = differential(loop, cresp, [(False, [_NGINX])], raising=raising)
        assert answered and any(entry[0] == "fail" for entry in log if isinstance(entry, tuple))


# The fuzz: ordinary responses mutated at random; wherever the C answers, the trace is
# httptools'.

_SPECIAL = [
    b"\r",
    b"\n",
    b"\x00",
    b" ",
    b"\t",
    b":",
    b"\x7f",
    b"\x80",
    b"\xff",
    b"0",
    b"9",
    b"\r\n",
    b"\r\n\r\n",
    b",",
    b"a",
    b"Z",
]
_FIELDS = [
    b"Content-Length: 0",
    b"Content-Length: 5",
    b"Transfer-Encoding: chunked",
    b"Connection: close",
    b"Connection: keep-alive",
    b"Upgrade: x",
    b"content-length:2",
    b"X-A: b",
    b"Proxy-Connection: keep-alive",
    b" folded",
]


def _mutate(rng: random.Random, data: bytes) -> bytes:
    for _ in range(rng.choice((1, 1, 1, 2, 3))):
        at = rng.randrange(len(data) + 1)
        kind = rng.randrange(8)
        if kind == 0 and data:  # flip a bit
            at = min(at, len(data) - 1)
            data = data[:at] + bytes([data[at] ^ (1 << rng.randrange(8))]) + data[at + 1 :]
        elif kind == 1:
            data = data[:at] + rng.choice(_SPECIAL) + data[at:]
        elif kind == 2:
            data = data[:at] + data[at + rng.randrange(1, 4) :]
        elif kind == 3:
            data = data[:at] + data[at:].swapcase()[:1] + data[at + 1 :]
        elif kind == 4:  # duplicate a line
            lines = data.split(b"\r\n")
            i = rng.randrange(len(lines))
            data = b"\r\n".join([*lines[: i + 1], lines[i], *lines[i + 1 :]])
        elif kind == 5:  # insert a field
            lines = data.split(b"\r\n")
            i = rng.randrange(1, max(2, len(lines)))
            data = b"\r\n".join([*lines[:i], rng.choice(_FIELDS), *lines[i:]])
        elif kind == 6:
            data = data[:at] if rng.random() < 0.5 else data + rng.choice(_SPECIAL)
        else:  # another status
            data = data[:9] + b"%03d" % rng.choice((100, 101, 199, 200, 204, 304, 404, 599, 600))
            data += _NGINX[12:]
    return data


def test_fuzzed_responses_never_get_another_answer_from_the_c(
    loop: asyncio.AbstractEventLoop, cresp: ModuleType
) -> None:
    rng = random.Random(20261123)
    cases = answered = 0
    for _ in range(3000):
        head_request, response = rng.choice(CORPUS)
        if rng.random() < 0.1:
            head_request = not head_request
        mutated = _mutate(rng, response)
        _, c_answered = differential(loop, cresp, [(head_request, [mutated]), (False, [_ECHO])])
        cases += 1
        answered += c_answered
    assert cases == 3000
    assert 300 < answered < 2700  # both sides of the line were tried


def test_the_c_keeps_reference_counts_and_memory_flat(cresp: ModuleType) -> None:
    # A leaked object per call would show: a million calls, half of them answered.
    inputs = [(response, head_request) for head_request, response in CORPUS + DECLINED] * 10
    for response, head_request in inputs:  # warm up: the allocator's pools
        cresp.parse_response(response, head_request)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB
    references = [sys.getrefcount(response) for response, _ in inputs]
    for _ in range(1_000_000 // len(inputs)):
        for response, head_request in inputs:
            cresp.parse_response(response, head_request)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 1024
    assert [sys.getrefcount(response) for response, _ in inputs] == references


# Through the pool's real sockets (`exchange()`: the coroutine path).


async def test_the_pool_reads_whole_responses_with_the_c_and_reuses_its_connection(
    cresp: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    responses = [response for head_request, response in CORPUS if not head_request]
    responses = [r for r in responses if b"close" not in r.lower()]

    async def handler(peer: Peer) -> None:
        for response in responses:
            if await peer.request() is None:
                return
            await peer.send(response)

    async def fetch_all(c: object) -> tuple[list[Any], int]:
        monkeypatch.setattr(connection, "_C", c)
        got = []
        async with Upstream(handler) as up, UpstreamPool(connect_timeout=2, read_timeout=5) as pool:
            for _ in responses:
                resp = await pool.request(up.address, "GET", "/", [])
                got.append((resp.status, resp.reason, resp.headers, await resp.read()))
                await resp.aclose()
        return got, up.connections

    spy = Spy(cresp)
    assert await fetch_all(spy) == await fetch_all(None)
    assert spy.answers == len(responses) > 20  # each read whole, by the C
    assert (await fetch_all(spy))[1] == 1  # one connection: each time back to the pool


# Through a real gateway: its fast path with the C (behind a spy) and without.

_SPY_GATEWAY = """
import json, runpy
import webapi.proxy.connection as connection
real = connection._C
assert real is not None, "SWITCHBOARD_C=1 with the build used: the C is on"
class Spy:
    def parse_response(self, data, head_request):
        whole = real.parse_response(data, head_request)
        print(json.dumps({"msg": "cresp", "answered": whole is not None}), flush=True)
        return whole
connection._C = Spy()
runpy.run_module("webapi", run_name="__main__", alter_sys=True)
"""


@contextmanager
def spied_gateway(redis_url: str) -> Iterator[tuple[str, ServiceProcess]]:
    """A gateway process as `running_gateway`'s, with the C on and behind a spy that
    logs each of its answers (`{"msg": "cresp"}`)."""
    port = free_port()
    env = {
        "REDIS_URL": redis_url,
        "WEBAPI_PORT": str(port),
        "HEARTBEAT_TTL": "1.5",
        "PROXY_TIMEOUT": "1",
        "SWITCHBOARD_C": "1",
    }
    proc = ServiceProcess(["python", "-c", _SPY_GATEWAY], env=env, name="webapi-cresp").start()
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: not proc.alive() or _up(base), timeout=30)
        assert proc.alive(), f"the gateway exited:\n{proc.log_tail()}"
        yield base, proc
    finally:
        proc.stop()


def _up(base: str) -> bool:
    try:
        return httpx.get(f"{base}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _answers(backend: Backend, requests: list[tuple[str, str, bytes]]) -> list[Any]:
    """Each answer's status, fields and body, but for what differs from one gateway to
    the other: the latencies, and the gateway's address (`X-Forwarded-Host`, echoed)."""
    got = []
    gateway = backend.gateway.removeprefix("http://").encode()
    with httpx.Client(headers=as_admin.headers, timeout=10) as client:
        for i, (method, path, body) in enumerate(requests):
            reply = client.request(
                method, f"{backend.base}{path}", content=body, headers={"X-Request-Id": f"r{i}"}
            )
            assert reply.headers["x-request-id"] == f"r{i}"
            skipped = ["x-upstream-latency", "x-gateway-latency"]
            if method != "HEAD":  # the body's length: it varies with the gateway's address
                assert int(reply.headers.get("content-length", 0)) == len(reply.content)
                skipped.append("content-length")
            fields = [(k, v) for k, v in reply.headers.multi_items() if k not in skipped]
            got.append((reply.status_code, fields, reply.content.replace(gateway, b"GATEWAY")))
    return got


def test_the_gateway_answers_the_same_with_the_c_and_reuses_upstream_connections(
    cresp: ModuleType, redis_url: str
) -> None:
    requests = [("GET", f"/echo?n={i}", b"") for i in range(12)]
    requests += [
        ("HEAD", "/echo", b""),
        ("GET", "/status/204", b""),
        ("GET", "/status/304", b""),
        ("GET", "/status/404", b""),
        ("POST", "/nlp", b'{"text": "bonjour"}'),
        ("GET", "/echo?last=1", b""),
    ]
    with spied_gateway(redis_url) as (on, proc), running_backend(on, redis_url) as backend:
        before, direct = len(proc.log_records("cresp")), fast_path(on)["direct"]
        with_c = _answers(backend, requests)
        records = proc.log_records("cresp")[before:]
        assert fast_path(on)["direct"] - direct == len(requests)  # each on an idle connection
        with running_gateway(redis_url, SWITCHBOARD_C="0") as off:
            off_backend = Backend(off, redis_url, backend.service)  # the same instance
            wait_for(lambda: as_admin.get(f"{off_backend.base}/echo").status_code == 200)
            assert _answers(off_backend, requests) == with_c
    assert with_c[0][0] == 200 and json.loads(with_c[0][2])["query"] == "n=0"
    assert [status for status, _, _ in with_c[12:16]] == [405, 204, 304, 404]
    assert len(records) == len(requests)
    assert all(record["answered"] for record in records)
