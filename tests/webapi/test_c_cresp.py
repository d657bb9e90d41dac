"""`webapi.proxy._cresp`, the C read of a whole upstream response (issue 4), against its
reference: the same `Connection` reading the same bytes with httptools
(`tests.webapi.cresp_fixtures` runs both and compares them): responses the backends
send, which the C must answer; what it must decline; the connection's limits and a
receiver's errors; seeded mutations; reference counts and memory.
"""

from __future__ import annotations

import asyncio
import random
import resource
import sys
from types import ModuleType

import pytest

from tests.webapi.cresp_fixtures import (
    CORPUS,
    ECHO,
    NGINX,
    NGINX_204,
    NGINX_404_CLOSE,
    NGINX_HEAD,
    clock_loop,  # noqa: F401  (the `loop` fixture)
    cresp_module,  # noqa: F401  (the `cresp` fixture)
    differential,
    ok,
)
from webapi.proxy.response import HIGH_WATER

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize(("head_request", "response"), CORPUS)
def test_the_c_answers_ordinary_responses_as_httptools_reads_them(
    loop: asyncio.AbstractEventLoop, cresp: ModuleType, head_request: bool, response: bytes
) -> None:
    # Then an ordinary response whole, and one in two reads (httptools' path), while
    # the connection is kept alive.
    exchanges = [(head_request, [response]), (False, [NGINX]), (False, [ECHO[:30], ECHO[30:]])]
    log, answered = differential(loop, cresp, exchanges)
    assert answered
    assert log[0][0] == "head"
    closing = b"close" in response.lower()
    assert log.count("release") == (0 if closing else 3)  # back to the pool after each


def test_a_response_the_c_reads_is_recorded_as_the_callbacks_record_it(cresp: ModuleType) -> None:
    whole = cresp.parse_response(NGINX_404_CLOSE, False)
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
        NGINX_404_CLOSE[-153:],
    )
    assert whole[3] is whole[2][3][1]  # the field's value itself
    assert cresp.parse_response(NGINX_HEAD, True) == (
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
    assert cresp.parse_response(NGINX_204, False)[3:] == (None, True, b"")


# What the C declines (httptools then reads it, as without the C).
DECLINED: list[tuple[bool, bytes]] = [
    (False, NGINX_HEAD),  # the body has not arrived
    (False, NGINX[:-1]),
    (False, NGINX + b"H"),  # bytes after the response
    (False, NGINX + NGINX),  # a second response
    (True, NGINX),  # a body after a HEAD's head
    (False, NGINX.replace(b"HTTP/1.1", b"HTTP/1.0")),
    (False, NGINX.replace(b"200 OK", b"100 Continue", 1)),
    (False, b"HTTP/1.1 100 Continue\r\n\r\n" + NGINX),
    (False, b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n" + NGINX),
    (
        False,
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",
    ),
    (False, ok(b"x", status=b"099 Low")),
    (False, ok(b"x", status=b"600 High")),
    (False, ok(b"x", status=b"2000 OK")),
    (False, b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n"),
    (False, ok(b"hi", b"Transfer-Encoding: gzip")),
    (False, ok(b"hi", b"Upgrade: h2c")),
    (False, ok(b"hi", b"Proxy-Connection: close")),
    (False, ok(b"hi", b"Connection: upgrade")),
    (False, ok(b"hi", b"Connection: close, x")),
    (False, ok(b"hi", b"Connection: close ")),
    (False, b"HTTP/1.1 200 OK\r\nServer: x\r\n\r\n"),  # delimited by the connection's end
    (True, b"HTTP/1.1 200 OK\r\nServer: x\r\n\r\n"),
    (False, ok(b"hi", b"Content-Length: 2")),  # two Content-Length fields
    (False, ok(b"hi").replace(b"Length: 2", b"Length: 2 ")),
    (False, ok(b"hi").replace(b"Length: 2", b"Length: +2")),
    (False, ok(b"hi").replace(b"Length: 2", b"Length:")),
    (False, ok(b"hi", b"X-Fold: a", b" b")),  # obs-fold
    (False, ok(b"hi", b"X-Bad : a")),
    (False, ok(b"hi", b"X-Ctl: a\x01b")),
    (False, ok(b"hi", b"X-Del: a\x7f")),
    (False, ok(b"hi", b"X-Nul: \x00")),
    (False, ok(b"hi", status=b"200 O\x01K")),
    (False, ok(b"hi").replace(b"\r\nContent", b"\nContent")),  # bare LF
    (False, ok(b"hi").replace(b"OK\r\n", b"OK\n")),
    (False, ok(b"hi").replace(b"OK\r\n", b"OK\r\r\n")),
    (False, ok(b"hi").replace(b"\r\n\r\n", b"\r\n\n")),
    (False, ok(b"hi", b"X-\xe9: a")),  # a name that is not a token
    (False, b"HTTP/1.1 200 OK\r\nContent-Length: 1234567890123456\r\n\r\n"),
    (False, b""),
    (False, b"HTTP/1.1 200 OK\r\n"),
]


@pytest.mark.parametrize(("head_request", "response"), DECLINED)
def test_the_c_declines_what_it_does_not_read(
    loop: asyncio.AbstractEventLoop, cresp: ModuleType, head_request: bool, response: bytes
) -> None:
    assert cresp.parse_response(response, head_request) is None
    differential(loop, cresp, [(head_request, [response]), (False, [NGINX])])
    assert cresp.parse_response(bytearray(NGINX), False) is None  # bytes only


def test_the_c_path_keeps_the_connections_limits_and_errors(
    loop: asyncio.AbstractEventLoop, cresp: ModuleType
) -> None:
    # Over the body limit: the head fails it, as in httptools' path.
    log, answered = differential(loop, cresp, [(False, [NGINX])], max_body=26)
    assert answered and log[0][0] == "fail" and log[0][1] == "UpstreamBodyTooLarge"
    differential(loop, cresp, [(True, [NGINX_HEAD])], max_body=26)  # as the head says
    log, _ = differential(loop, cresp, [(False, [NGINX])], max_body=27)
    assert log[1][0] == "feed"
    # A body over the high-water mark pauses reading, then the end resumes it.
    big = ok(b"b" * (HIGH_WATER + 1))
    log, answered = differential(loop, cresp, [(False, [big]), (False, [NGINX])])
    assert answered and log[2:5] == ["pause_reading", "resume_reading", "release"]
    # A receiver's error stops the read, as in httptools' callbacks.
    for raising in ("_head", "_feed"):
        log, answered = differential(loop, cresp, [(False, [NGINX])], raising=raising)
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
            data += NGINX[12:]
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
        _, c_answered = differential(loop, cresp, [(head_request, [mutated]), (False, [ECHO])])
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
