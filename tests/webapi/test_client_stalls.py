"""What the gateway does with clients that stall or frame oddly (`common.strict_http`,
`webapi.app`, the fast path): a body that stops coming gets a 408 and the connection
closes, and so does a head trickling in past its deadline (slowloris); a request
refused for its credential is refused before its body is waited for; oversized heads
get 431/414; chunked trailer fields are taken and dropped; a `Connection` header
listing other tokens keeps the connection.

The requests are raw bytes on a socket. The gateway's `REQUEST_TIMEOUT` is short
(`_STALL`): a test that waits for a stalled body waits that long, and the read's own
bound (`read_answers`, 10 s) is what an old gateway, which held such a connection
for minutes, fails on.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import socket
import threading
import time
import uuid
from collections.abc import Iterator

import pytest

from common.strict_http import HEAD_STALLED
from tests.support.policy import apply_routes
from tests.support.raw_http import Answer, closed_by_peer, connect, exchange, read_answers, trickle
from tests.support.registry import deregister, register
from tests.webapi.conftest import Backend, as_admin, fast_path, running_gateway
from tests.webapi.upstream_servers import Peer, ok, upstream_in_thread

pytestmark = pytest.mark.timeout(60)

_STALL = "0.5"  # the gateway's REQUEST_TIMEOUT (s)


@pytest.fixture(scope="module")
def gateway(redis_url: str) -> Iterator[str]:
    """The module's gateway (the `backend` fixture registers with it)."""
    with running_gateway(redis_url, REQUEST_TIMEOUT=_STALL) as base:
        yield base


def _code(answer: Answer) -> str:
    assert answer.headers.get("content-type", "").startswith("application/json"), answer
    return str(json.loads(answer.body)["error"]["code"])


def _cache_credential(gateway: str) -> None:
    """A request through Sanic's path with the admin key: the fast path then knows it."""
    assert as_admin.get(f"{gateway}/admin/proxy/stats", timeout=5).status_code == 200


# (method and path, framing and the body's first byte) of a request whose body stalls.
_STALLED = {
    "public login": ("POST /api/v1/auth/login", "Content-Length: 100\r\n\r\n{", False),
    "rpc": ("POST /rpc/iptv/search", "Content-Length: 100\r\n\r\n{", True),
    # The credential is in the cache: the fast path holds the request for its body.
    "svc, fast path": ("POST /svc/{s}/upload", "Content-Length: 100\r\n\r\n{", True),
    "svc, chunked": ("POST /svc/{s}/upload", "Transfer-Encoding: chunked\r\n\r\n64\r\n{", True),
}


@pytest.mark.parametrize("case", list(_STALLED))
def test_a_stalled_body_gets_a_408_and_the_connection_closes(backend: Backend, case: str) -> None:
    line, rest, credential = _STALLED[case]
    _cache_credential(backend.gateway)
    answered = fast_path(backend.gateway)["answered"]
    head = f"{line.format(s=backend.service)} HTTP/1.1\r\nHost: gateway.test\r\n"
    head += as_admin.field_lines() if credential else ""
    with connect(backend.gateway) as sock:
        sock.sendall((head + rest).encode())
        answer = read_answers(sock, 1)[0]
        assert (answer.status, _code(answer)) == (408, "request_timeout")
        assert answer.headers["connection"] == "close"
        assert closed_by_peer(sock)  # for real: Sanic kept the socket open for good
    assert fast_path(backend.gateway)["answered"] == answered  # (a 408 answers nothing)


@pytest.mark.parametrize("path", ["/health", "/svc/{s}/echo"])
def test_a_trickling_head_gets_a_408_and_the_connection_closes(backend: Backend, path: str) -> None:
    # A byte every 0.1 s: never silent for REQUEST_TIMEOUT (0.5 s), which Sanic counts
    # from the last byte, so a head that never ends held the connection for good. The
    # head's own deadline (REQUEST_HEAD_TIMEOUT, by default REQUEST_TIMEOUT) ends it.
    _cache_credential(backend.gateway)  # (the fast path hands a partial head to Sanic)
    head = f"GET {path.format(s=backend.service)} HTTP/1.1\r\n{as_admin.field_lines()}X-Slow: "
    with connect(backend.gateway) as sock:
        ended = trickle(sock, head.encode() + b"a" * 1000, every=0.1)
        _assert_head_stalled(read_answers(sock, 1)[0])
        assert closed_by_peer(sock)
    assert ended  # (by the gateway, not by the trickle's own limit)


@pytest.mark.parametrize("patient", [False, True], ids=["short timeouts", "head deadline alone"])
def test_a_trickling_head_on_a_passthrough_route_gets_a_408(
    backend: Backend, patient: bool
) -> None:
    # The request line comes whole (the splice starts on it), then the rest of the head
    # a byte at a time: the splice held it, bounded by the keep-alive timeout counted
    # from the last byte, and held a connection to the instance too. "head deadline
    # alone": a gateway of the default timeouts but a 1 s head deadline, which the
    # splice's check, run at half the least of the other timeouts (30 s), passed unseen.
    route = {"prefix": "/echo/", "service": backend.service, "public": True,
             "strip_prefix": False, "passthrough": True}  # fmt: skip
    with contextlib.ExitStack() as stack:
        gateway = backend.gateway
        if patient:  # (the registry and the policy are Redis's: it routes to `backend` too)
            gateway = stack.enter_context(
                running_gateway(backend.redis_url, REQUEST_TIMEOUT="60", REQUEST_HEAD_TIMEOUT="1")
            )
        stack.callback(apply_routes, gateway, backend.redis_url, [])
        apply_routes(gateway, backend.redis_url, [route])
        before = as_admin.get(f"{gateway}/admin/proxy/stats", timeout=5).json()
        with connect(gateway) as sock:
            # Idle a moment first: the connection's first timeout check then comes before
            # its first byte, and set the checks' pace to Sanic's (half the least of its
            # timeouts: 30 s), which the splice kept (it failed one run in five, when
            # the check came first by chance).
            time.sleep(0.3)
            sock.sendall(b"GET /echo/slow HTTP/1.1\r\n")
            ended = trickle(sock, b"Host: g\r\nX-Slow: " + b"a" * 1000, every=0.1)
            _assert_head_stalled(read_answers(sock, 1)[0])
            assert closed_by_peer(sock)
        assert ended  # (by the gateway, not by the trickle's own limit)
        after = as_admin.get(f"{gateway}/admin/proxy/stats", timeout=5).json()
        spliced = after["passthrough"]["connections"] - before["passthrough"]["connections"]
        assert spliced == 1  # (it was the splice's, not Sanic's)


def test_requests_before_a_head_not_whole_on_a_passthrough_route_are_forwarded_at_once(
    backend: Backend,
) -> None:
    # A pipelining client's read: whole route requests, then a head not whole yet. The
    # splice held them all until that head was whole; when it stalled, the first of them
    # got its 408 and none was forwarded. Each is forwarded and answered now, in order,
    # and the 408 answers the stalled head alone.
    route = {"prefix": "/echo/", "service": backend.service, "public": True,
             "strip_prefix": False, "passthrough": True}  # fmt: skip
    apply_routes(backend.gateway, backend.redis_url, [route])
    try:
        with connect(backend.gateway) as sock:
            sock.sendall(b"GET /echo/a HTTP/1.1\r\nHost: g\r\n\r\n")
            assert read_answers(sock, 1)[0].status == 200  # (spliced: the next reads are its)
            head = b"GET /echo/d HTTP/1.1\r\nHost: g\r\n"
            sock.sendall(b"GET /echo/b HTTP/1.1\r\nHost: g\r\n\r\n" * 2 + head)
            answers = read_answers(sock, 2)  # before the head is whole
            sock.sendall(b"\r\n" + head)  # the head's end; then another head, which stalls
            answers += read_answers(sock, 2)
            assert [json.loads(a.body)["path"] for a in answers[:3]] == ["/echo/b"] * 2 + [
                "/echo/d"
            ]
            _assert_head_stalled(answers[3])
            assert closed_by_peer(sock)
    finally:
        apply_routes(backend.gateway, backend.redis_url, [])


@contextlib.contextmanager
def _tunnel(backend: Backend, answer: bytes = b"") -> Iterator[threading.Event]:
    """A tunnel route `/tun/` (`webapi.tunnel`) to one scripted instance of its own, which
    answers each request a 200 echoing its body (`upstream_servers`), or, given `answer`,
    sends it once the first bytes have come and reads on; set once the gateway has closed
    the instance's connection."""
    closed = threading.Event()

    async def instance(peer: Peer) -> None:
        try:
            if answer:
                await peer.reader.read(1)
                await peer.send(answer)
                await peer.reader.read()  # (to the end)
            async for request in peer.requests():
                await peer.send(ok(request.body))
        finally:
            closed.set()

    service = f"tun{uuid.uuid4().hex[:6]}"
    route = {"prefix": "/tun/", "service": service, "public": True, "strip_prefix": False,
             "passthrough": True, "tunnel": True}  # fmt: skip
    with upstream_in_thread(instance) as server:
        asyncio.run(register(backend.redis_url, service, {f"{service}-a": server.address}))
        try:
            apply_routes(backend.gateway, backend.redis_url, [route])
            yield closed
        finally:
            apply_routes(backend.gateway, backend.redis_url, [])
            asyncio.run(deregister(backend.redis_url, service, f"{service}-a"))


@pytest.mark.parametrize("answered", [False, True], ids=["408", "instance answered: close"])
def test_a_trickling_first_head_on_a_tunnel_route_ends_it(backend: Backend, answered: bool) -> None:
    # A tunnel relays the first request's head as it comes, then reads nothing: a client
    # trickling that head a byte at a time (each restarting the idle timeout, Sanic's
    # response timeout) held both connections for good (12 s seen, a 1 s head deadline).
    # Its deadline ends it now: a 408 (the instance had no whole request to answer), or,
    # once the instance has written to the client, only the close can tell it.
    early = b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n" if answered else b""
    with _tunnel(backend, early) as instance_closed, connect(backend.gateway) as sock:
        sock.sendall(b"GET /tun/slow HTTP/1.1\r\n")
        ended = trickle(sock, b"Host: g\r\nX-Slow: " + b"a" * 1000, every=0.1)
        if answered:
            assert ended and read_answers(sock, 1)[0].status == 400  # the instance's
            ended = trickle(sock, b"a" * 1000, every=0.1)
            assert sock.recv(65536) == b""  # closed, with no 408 after the instance's answer
        else:
            _assert_head_stalled(read_answers(sock, 1)[0])
            assert closed_by_peer(sock)
        assert ended  # (by the gateway, not by the trickle's own limit)
        assert instance_closed.wait(5)  # the instance's connection too


def test_what_follows_a_tunnels_first_head_has_no_head_deadline(backend: Backend) -> None:
    # The deadline is the first head's: a body trickled past it (1 s, the deadline
    # 0.5 s), an upgraded connection's frames, later requests are the instance's.
    with _tunnel(backend) as instance_closed, connect(backend.gateway) as sock:
        sock.sendall(b"POST /tun/up HTTP/1.1\r\nHost: g\r\nContent-Length: 10\r\n\r\n")
        assert trickle(sock, b"0123456789", every=0.1)  # ended by the answer
        first = read_answers(sock, 1)[0]
        assert (first.status, first.body) == (200, b"0123456789")
        sock.sendall(b"GET /tun/next HTTP/1.1\r\nHost: g\r\n\r\n")
        assert read_answers(sock, 1)[0].status == 200
        assert not instance_closed.is_set()


@pytest.mark.parametrize("line", [b"\r\n", b"\r"], ids=["CRLF", "CR"])
def test_empty_lines_between_requests_do_not_keep_a_splice_open(
    backend: Backend, line: bytes
) -> None:
    # A client idle on a spliced connection sends an empty line every little while:
    # each restarted the keep-alive timeout (1 s here) and went to the instance, so
    # both connections stayed open for good (the instance, Sanic, ends one after two
    # CRLFs; a CR alone, or an instance that ignores them as RFC 9112 §2.2 lets it,
    # never). The keep-alive timeout counts from the last answer and closes it.
    route = {"prefix": "/echo/", "service": backend.service, "public": True,
             "strip_prefix": False, "passthrough": True}  # fmt: skip
    with running_gateway(backend.redis_url, SANIC_KEEP_ALIVE_TIMEOUT="1") as gateway:
        apply_routes(gateway, backend.redis_url, [route])
        try:
            with connect(gateway) as sock:
                sock.sendall(b"GET /echo/a HTTP/1.1\r\nHost: g\r\n\r\n")
                assert read_answers(sock, 1)[0].status == 200
                ended = trickle(sock, line * 100, every=0.2, limit=6)
                assert ended and sock.recv(65536) == b""  # closed, with no answer
            spliced = as_admin.get(f"{gateway}/admin/proxy/stats", timeout=5).json()
            assert spliced["passthrough"]["connections"] == 1
        finally:
            apply_routes(gateway, backend.redis_url, [])


def test_empty_lines_before_a_request_line_are_ignored(gateway: str) -> None:
    # RFC 9112 §2.2 (a client's CRLF after a body, say): Sanic took them for an empty
    # request line, a 400 that closed the connection. Dropped now, as nginx does.
    health = b"GET /health HTTP/1.1\r\nHost: g\r\n\r\n"
    with connect(gateway) as sock:
        sock.sendall(b"\r\n\r\n" + health + b"\r\n\n" + health)
        assert [answer.status for answer in read_answers(sock, 2)] == [200, 200]


@pytest.mark.parametrize("line", [b"\r\n", b"\r"], ids=["CRLF", "CR"])
def test_empty_lines_trickled_before_a_request_line_meet_its_deadline(
    gateway: str, line: bytes
) -> None:
    # They restart no timer: the head's deadline runs from the first (0.5 s here).
    with connect(gateway) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: g\r\n\r\n")
        assert read_answers(sock, 1)[0].status == 200
        ended = trickle(sock, line * 100, every=0.1, limit=6)
        _assert_head_stalled(read_answers(sock, 1)[0])
        assert ended and closed_by_peer(sock)


def _assert_head_stalled(answer: Answer) -> None:
    """`answer` is the head deadline's 408 (not the per-silence one: the same code)."""
    assert (answer.status, _code(answer)) == (408, "request_timeout")
    assert json.loads(answer.body)["error"]["message"] == HEAD_STALLED
    assert answer.headers["connection"] == "close"


@pytest.mark.parametrize(
    "line", ["POST /rpc/iptv/search", "POST /svc/{s}/upload", "POST /api/v1/auth/logout"]
)
def test_a_request_without_credentials_is_refused_before_its_body(
    backend: Backend, line: str
) -> None:
    head = f"{line.format(s=backend.service)} HTTP/1.1\r\nHost: gateway.test\r\n"
    with connect(backend.gateway) as sock:
        sock.sendall((head + "Content-Length: 100\r\n\r\n{").encode())
        answer = read_answers(sock, 1)[0]  # not the stalled body's 408
        assert (answer.status, _code(answer)) == (401, "unauthorized")
        # The body is unread: the connection closes, as the answer says.
        assert answer.headers["connection"] == "close"
        assert closed_by_peer(sock)


def test_a_refused_request_whose_body_has_arrived_keeps_its_connection(gateway: str) -> None:
    body = b'{"q": "news"}'
    first = f"POST /rpc/iptv/search HTTP/1.1\r\nHost: g\r\nContent-Length: {len(body)}\r\n\r\n"
    with connect(gateway) as sock:
        sock.sendall(first.encode() + body)
        answer = read_answers(sock, 1)[0]
        assert (answer.status, answer.headers["connection"]) == (401, "keep-alive")
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: g\r\n\r\n")
        assert read_answers(sock, 1)[0].status == 200


@pytest.mark.parametrize(
    ("head", "status", "code"),
    [
        ("GET /svc/x/a HTTP/1.1\r\nHost: g\r\nX-Big: " + "a" * 60_000 + "\r\n\r\n", 431,
         "request_header_fields_too_large"),
        ("GET /svc/x/a HTTP/1.1\r\nHost: g\r\n" + "".join(f"X{i}:v\r\n" for i in range(2000))
         + "\r\n", 431, "request_header_fields_too_large"),
        ("GET /svc/x/" + "a" * 100_000 + " HTTP/1.1\r\nHost: g\r\n\r\n", 414, "uri_too_long"),
    ],
    ids=["60 KB field", "2,000 fields", "100 KB request line"],
)  # fmt: skip
def test_an_oversized_head_gets_431_or_414(gateway: str, head: str, status: int, code: str) -> None:
    answer = exchange(gateway, head.encode())
    assert (answer.status, _code(answer)) == (status, code)


def test_a_head_under_16_kib_is_taken(gateway: str) -> None:
    # The documented bound is 16 KiB; Sanic's path held 8 KiB (its default, which it
    # sets for every app of the process as the least of several settings).
    cookie = "a" * 12_000
    head = f"GET /health HTTP/1.1\r\nHost: g\r\nCookie: c={cookie}\r\n\r\n"
    assert exchange(gateway, head.encode()).status == 200


def _chunked(line: str, trailer: str) -> bytes:
    """A chunked request carrying `{}` in two chunks, then trailer fields."""
    head = f"{line} HTTP/1.1\r\nHost: gateway.test\r\n{as_admin.field_lines()}"
    body = f"1\r\n{{\r\n1\r\n}}\r\n0\r\n{trailer}\r\n"
    return f"{head}Transfer-Encoding: chunked\r\n\r\n{body}".encode()


@pytest.mark.parametrize("trailer", ["X-Checksum: abc\r\n", "A: 1\r\nB:\r\nC:  x y \r\n"])
def test_trailer_fields_are_taken_and_not_passed_on(backend: Backend, trailer: str) -> None:
    with connect(backend.gateway) as sock:
        # The instance is Sanic, which refuses any trailer: a 200 says it got none.
        sock.sendall(_chunked(f"POST /svc/{backend.service}/upload", trailer))
        answer = read_answers(sock, 1)[0]
        assert answer.status == 200, answer.body
        assert json.loads(answer.body)["sha256"] == hashlib.sha256(b"{}").hexdigest()
        # The RPC route too (no such service: the body was read, then the 404).
        sock.sendall(_chunked("POST /rpc/nosuch/method", trailer))
        answer = read_answers(sock, 1)[0]
        assert (answer.status, _code(answer)) == (404, "method_not_found"), answer.body
        # Nothing of the trailer is read as a next request: this one is answered.
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: g\r\n\r\n")
        assert read_answers(sock, 1)[0].status == 200


def _exchange(sock: socket.socket, head: str) -> Answer:
    sock.sendall(head.encode())
    return read_answers(sock, 1)[0]


@pytest.mark.parametrize("connection", ["keep-alive, X-Foo", "X-Foo", "x-foo,  Keep-Alive"])
def test_a_connection_header_without_close_keeps_the_connection(
    backend: Backend, connection: str
) -> None:
    _cache_credential(backend.gateway)
    fast = f"GET /svc/{backend.service}/echo HTTP/1.1\r\nHost: g\r\n{as_admin.field_lines()}"
    sanic = "GET /health HTTP/1.1\r\nHost: g\r\n"
    answered = fast_path(backend.gateway)["answered"]
    with connect(backend.gateway) as sock:
        for head in (fast, sanic, fast):
            answer = _exchange(sock, f"{head}Connection: {connection}\r\n\r\n")
            assert (answer.status, answer.headers["connection"]) == (200, "keep-alive")
        assert _exchange(sock, sanic + "\r\n").status == 200  # still open
    assert fast_path(backend.gateway)["answered"] == answered + 2  # (the fast path's)


@pytest.mark.parametrize("path", ["/svc/{s}/echo", "/health"])
def test_a_close_token_among_others_closes_the_connection(backend: Backend, path: str) -> None:
    _cache_credential(backend.gateway)
    head = f"GET {path.format(s=backend.service)} HTTP/1.1\r\nHost: g\r\n{as_admin.field_lines()}"
    with connect(backend.gateway) as sock:
        answer = _exchange(sock, head + "Connection: X-Foo\r\nConnection: TE, Close\r\n\r\n")
        assert (answer.status, answer.headers["connection"]) == (200, "close")
        assert closed_by_peer(sock)
