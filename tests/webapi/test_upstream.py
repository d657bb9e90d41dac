"""The upstream HTTP/1.1 pool against real, scripted servers on 127.0.0.1.

Each test starts a small asyncio server whose handler plays one upstream behaviour
(keep-alive, chunked, closing, stalling, malformed...). Requests are parsed with
httptools on the server side too, so request bodies are counted as they stream.
"""

from __future__ import annotations

import asyncio
import socket
import time
import tracemalloc
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import httptools
import pytest

import webapi.proxy
from tests.helpers import free_port, wait_for_async
from webapi.proxy import (
    UpstreamBodyTooLarge,
    UpstreamConnectError,
    UpstreamError,
    UpstreamPool,
    UpstreamProtocolError,
    UpstreamTimeout,
    strip_hop_by_hop,
)

pytestmark = pytest.mark.timeout(30)

MB = 1024 * 1024
CHUNK = bytes(range(256)) * 256  # 64 KiB


# A scripted upstream server.


@dataclass
class Req:
    method: str = ""
    target: str = ""
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""
    size: int = 0
    crc: int = 0

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k.lower() == name.lower()), None)


class _ReqParser:
    """httptools callbacks collecting requests; bodies over 1 MiB are only counted."""

    def __init__(self) -> None:
        self.parser = httptools.HttpRequestParser(self)
        self.current = Req()
        self.done: list[Req] = []

    def on_url(self, url: bytes) -> None:
        self.current.target += url.decode()

    def on_header(self, name: bytes, value: bytes) -> None:
        self.current.headers.append((name.decode(), value.decode()))

    def on_headers_complete(self) -> None:
        self.current.method = self.parser.get_method().decode()

    def on_body(self, body: bytes) -> None:
        req = self.current
        req.size += len(body)
        req.crc = zlib.crc32(body, req.crc)
        if len(req.body) < MB:
            req.body += body

    def on_message_complete(self) -> None:
        self.done.append(self.current)
        self.current = Req()


class Peer:
    """One accepted connection, as the handler sees it."""

    def __init__(
        self, server: Upstream, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ):
        self.server = server
        self.reader = reader
        self.writer = writer
        self.index = server.connections  # 1 for the first connection, 2 for the next...
        self._parser = _ReqParser()

    async def request(self) -> Req | None:
        """The next request, or None if the client closed the connection first."""
        while not self._parser.done:
            data = await self.reader.read(256 * 1024)
            if not data:
                return None
            self._parser.parser.feed_data(data)
        req = self._parser.done.pop(0)
        self.server.requests.append(req)
        return req

    async def requests(self) -> AsyncIterator[Req]:
        while (req := await self.request()) is not None:
            yield req

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    def close(self) -> None:
        self.writer.close()

    def reset(self) -> None:
        sock = self.writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        self.writer.transport.abort()


Handler = Callable[[Peer], Awaitable[None]]


class Upstream:
    """`async with Upstream(handler) as up:` serves `handler` on `up.address`."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.requests: list[Req] = []
        self.address = ""
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: list[asyncio.StreamWriter] = []

    async def __aenter__(self) -> Upstream:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.address = f"127.0.0.1:{self._server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._server.close()
        for task in self._tasks:
            task.cancel()
        for writer in self._writers:
            writer.close()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.append(writer)
        self.connections += 1
        try:
            await self.handler(Peer(self, reader, writer))
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()


def ok(body: bytes = b"hello world", *extra: str) -> bytes:
    head = "".join(f"{h}\r\n" for h in extra)
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%s\r\n%s" % (len(body), head.encode(), body)


async def keep_alive(peer: Peer) -> None:
    """Answers every request with its own target as the body."""
    async for req in peer.requests():
        await peer.send(ok(req.target.encode()))


async def chunks(count: int, chunk: bytes = CHUNK) -> AsyncIterator[bytes]:
    for _ in range(count):
        yield chunk


@pytest.fixture
async def pool() -> AsyncIterator[UpstreamPool]:
    p = UpstreamPool(connect_timeout=2.0, read_timeout=5.0)
    try:
        yield p
    finally:
        await p.close()


# Responses.


async def test_get_with_content_length(pool: UpstreamPool) -> None:
    async def handler(peer: Peer) -> None:
        async for _ in peer.requests():
            await peer.send(ok(b"hello world", "X-Thing: a", "X-Thing: b"))

    async with Upstream(handler) as up:
        headers = [("Accept", "text/plain"), ("X-Forwarded-For", "10.0.0.1")]
        resp = await pool.request(up.address, "GET", "/a/b?c=1&d=%20", headers)
        assert (resp.status, resp.reason) == (200, "OK")
        assert resp.headers == [("Content-Length", "11"), ("X-Thing", "a"), ("X-Thing", "b")]
        assert await resp.read() == b"hello world"
        await resp.aclose()
    req = up.requests[0]
    assert (req.method, req.target) == ("GET", "/a/b?c=1&d=%20")
    assert req.headers == [*headers, ("Host", up.address)]


async def test_chunked_response_streams_chunk_by_chunk(pool: UpstreamPool) -> None:
    first_seen = asyncio.Event()

    async def handler(peer: Peer) -> None:
        async for _ in peer.requests():
            await peer.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
            await first_seen.wait()  # the client has the first chunk before the rest exists
            await peer.send(b"6\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n")

    async with Upstream(handler) as up:
        resp = await pool.request(up.address, "GET", "/", [])
        got = []
        async for chunk in resp.stream():
            got.append(chunk)
            first_seen.set()
        assert got == [b"hello", b" world"]
        assert ("X-Trailer", "t") not in resp.headers
        await resp.aclose()
        resp = await pool.request(up.address, "GET", "/", [])  # same connection again
        assert await resp.read() == b"hello world"
        await resp.aclose()
    assert up.connections == 1


async def test_read_until_close_response(pool: UpstreamPool) -> None:
    async def handler(peer: Peer) -> None:
        await peer.request()
        await peer.send(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nall of this")
        await peer.send(b" until the end")
        peer.close()

    async with Upstream(handler) as up:
        resp = await pool.request(up.address, "GET", "/", [])
        assert await resp.read() == b"all of this until the end"
        await resp.aclose()
        assert pool.stats()[up.address]["open"] == 0


async def test_head_and_204_and_304_have_no_body_and_keep_the_connection(
    pool: UpstreamPool,
) -> None:
    async def handler(peer: Peer) -> None:
        async for req in peer.requests():
            if req.method == "HEAD":
                await peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")
            elif req.target == "/204":
                await peer.send(b"HTTP/1.1 204 No Content\r\n\r\n")
            elif req.target == "/304":
                await peer.send(b"HTTP/1.1 304 Not Modified\r\nContent-Length: 7\r\n\r\n")
            else:
                await peer.send(ok(b"body"))

    async with Upstream(handler) as up:
        for method, target, status in [
            ("HEAD", "/", 200),
            ("GET", "/", 200),
            ("GET", "/204", 204),
            ("HEAD", "/", 200),
            ("GET", "/304", 304),
            ("GET", "/", 200),
        ]:
            resp = await pool.request(up.address, method, target, [])
            assert resp.status == status
            expected = b"body" if status == 200 and method == "GET" else b""
            assert await resp.read() == expected
            await resp.aclose()
        async with await pool.request(up.address, "HEAD", "/", []) as resp:
            assert ("Content-Length", "1000") in resp.headers
    assert up.connections == 1


async def test_interim_100_continue_is_skipped(pool: UpstreamPool) -> None:
    async def handler(peer: Peer) -> None:
        async for _ in peer.requests():
            await peer.send(b"HTTP/1.1 100 Continue\r\n\r\n" + ok(b"final"))

    async with Upstream(handler) as up:
        resp = await pool.request(
            up.address, "POST", "/", [("Expect", "100-continue")], body=b"payload"
        )
        assert resp.status == 200 and await resp.read() == b"final"
        await resp.aclose()
    assert up.requests[0].body == b"payload"


async def test_connection_close_response_closes_the_connection(pool: UpstreamPool) -> None:
    async def handler(peer: Peer) -> None:
        async for _ in peer.requests():
            await peer.send(ok(b"bye", "Connection: close"))

    async with Upstream(handler) as up:
        for _ in range(3):
            resp = await pool.request(up.address, "GET", "/", [])
            assert await resp.read() == b"bye"
            await resp.aclose()
        await wait_for_async(_no_open(pool, up.address), timeout=5)
    assert up.connections == 3


def _no_open(pool: UpstreamPool, address: str) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return pool.stats()[address]["open"] == 0

    return check


# Keep-alive and stale connections.


async def test_keep_alive_reuses_one_connection(pool: UpstreamPool) -> None:
    async with Upstream(keep_alive) as up:
        for i in range(50):
            resp = await pool.request(up.address, "GET", f"/{i}", [])
            assert await resp.read() == f"/{i}".encode()
            await resp.aclose()
        stats = pool.stats()[up.address]
    assert up.connections == 1
    assert stats == {
        "open": 1,
        "idle": 1,
        "active": 0,
        "connects": 1,
        "reuses": 49,
        "retries": 0,
    }


def _stale_after_first(reset: bool) -> Handler:
    """The first connection answers one request, then reads the next one and closes
    without answering (a server closing an idle connection as the request arrives)."""

    async def handler(peer: Peer) -> None:
        if peer.index == 1:
            req = await peer.request()
            assert req is not None
            await peer.send(ok(b"first"))
            await peer.request()
            peer.reset() if reset else peer.close()
        else:
            await keep_alive(peer)

    return handler


@pytest.mark.parametrize("reset", [False, True], ids=["eof", "reset"])
async def test_stale_connection_is_retried_for_idempotent_requests(
    pool: UpstreamPool, reset: bool
) -> None:
    async with Upstream(_stale_after_first(reset)) as up:
        resp = await pool.request(up.address, "GET", "/1", [])
        assert await resp.read() == b"first"
        await resp.aclose()
        resp = await pool.request(up.address, "PUT", "/2", [], body=b"replayable")
        assert resp.status == 200 and await resp.read() == b"/2"
        await resp.aclose()
        assert pool.stats()[up.address]["retries"] == 1
    assert up.connections == 2
    assert [r.target for r in up.requests] == ["/1", "/2", "/2"]


@pytest.mark.parametrize("method", ["POST", "PATCH"])
async def test_stale_connection_is_not_retried_for_non_idempotent_requests(
    pool: UpstreamPool, method: str
) -> None:
    async with Upstream(_stale_after_first(reset=False)) as up:
        resp = await pool.request(up.address, "GET", "/1", [])
        await resp.read()
        await resp.aclose()
        with pytest.raises(UpstreamProtocolError, match="closed"):
            await pool.request(up.address, method, "/2", [], body=b"once only")
        assert pool.stats()[up.address]["retries"] == 0
    assert up.connections == 1


async def test_stale_connection_is_not_retried_with_a_streamed_body(pool: UpstreamPool) -> None:
    async with Upstream(_stale_after_first(reset=False)) as up:
        resp = await pool.request(up.address, "GET", "/1", [])
        await resp.read()
        await resp.aclose()
        with pytest.raises(UpstreamProtocolError):
            await pool.request(up.address, "PUT", "/2", [], body=chunks(2, b"x"))
    assert up.connections == 1


async def test_idle_connection_closed_by_server_is_not_reused(pool: UpstreamPool) -> None:
    async def handler(peer: Peer) -> None:
        req = await peer.request()
        assert req is not None
        await peer.send(ok(req.target.encode()))
        peer.close()  # keep-alive timeout on the server side

    async with Upstream(handler) as up:
        resp = await pool.request(up.address, "GET", "/1", [])
        assert await resp.read() == b"/1"
        await resp.aclose()
        await wait_for_async(_no_open(pool, up.address), timeout=5)
        resp = await pool.request(up.address, "POST", "/2", [], body=b"x")
        assert await resp.read() == b"/2"
        await resp.aclose()
        assert pool.stats()[up.address]["retries"] == 0
    assert up.connections == 2


async def test_idle_connections_expire(pool: UpstreamPool) -> None:
    pool.idle_timeout = 0.0
    async with Upstream(keep_alive) as up:
        for i in range(3):
            resp = await pool.request(up.address, "GET", f"/{i}", [])
            await resp.read()
            await resp.aclose()
    assert up.connections == 3


async def test_bytes_after_the_response_make_the_connection_unusable(pool: UpstreamPool) -> None:
    async def handler(peer: Peer) -> None:
        async for _ in peer.requests():
            await peer.send(ok(b"one") + b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\ntwo")

    async with Upstream(handler) as up:
        for _ in range(2):
            resp = await pool.request(up.address, "GET", "/", [])
            assert await resp.read() == b"one"
            await resp.aclose()
    assert up.connections == 2


# Errors.


async def test_connect_refused_is_a_fast_connect_error(pool: UpstreamPool) -> None:
    started = time.monotonic()
    with pytest.raises(UpstreamConnectError):
        await pool.request(f"127.0.0.1:{free_port()}", "GET", "/", [])
    assert time.monotonic() - started < 1.0


async def test_connect_timeout_is_a_connect_error() -> None:
    # A listener with a full accept queue drops new SYNs, so connect() hangs.
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    try:
        for _ in range(4):
            filler = socket.socket()
            filler.setblocking(False)
            filler.connect_ex(("127.0.0.1", port))
            fillers.append(filler)
        async with UpstreamPool(connect_timeout=0.2) as pool:
            started = time.monotonic()
            try:
                resp = await pool.request(f"127.0.0.1:{port}", "GET", "/", [], timeout=5)
            except UpstreamConnectError as exc:
                assert "timed out" in str(exc)
                assert time.monotonic() - started < 2.0
            else:
                await resp.aclose()
                pytest.skip("this kernel accepted a connection over a full backlog")
    finally:
        for sock in [*fillers, listener]:
            sock.close()


async def test_silent_server_is_a_read_timeout() -> None:
    async def handler(peer: Peer) -> None:
        await peer.request()
        await peer.reader.read()  # never answers

    async with Upstream(handler) as up, UpstreamPool(read_timeout=0.2) as pool:
        started = time.monotonic()
        with pytest.raises(UpstreamTimeout, match="no progress"):
            await pool.request(up.address, "GET", "/", [])
        assert time.monotonic() - started < 2.0


async def test_trickling_server_hits_the_total_timeout() -> None:
    async def handler(peer: Peer) -> None:
        await peer.request()
        for byte in b"HTTP/1.1 200 OK\r\nX-Slow: " + b"y" * 1000:
            await peer.send(bytes([byte]))
            await asyncio.sleep(0.02)  # the server is slow on purpose

    async with Upstream(handler) as up, UpstreamPool(read_timeout=1.0) as pool:
        started = time.monotonic()
        with pytest.raises(UpstreamTimeout, match="no response head"):
            await pool.request(up.address, "GET", "/", [], timeout=0.3)
        assert time.monotonic() - started < 1.0


async def test_stalled_body_is_a_read_timeout_while_streaming() -> None:
    async def handler(peer: Peer) -> None:
        await peer.request()
        await peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial")
        await peer.reader.read()

    async with Upstream(handler) as up, UpstreamPool(read_timeout=0.2) as pool:
        resp = await pool.request(up.address, "GET", "/", [])
        got = []
        with pytest.raises(UpstreamTimeout):
            async for chunk in resp.stream():
                got.append(chunk)
        assert got == [b"partial"]
        await resp.aclose()
        assert pool.stats()[up.address]["open"] <= 1
        await wait_for_async(_no_open(pool, up.address), timeout=5)


@pytest.mark.parametrize(
    "reply",
    [
        b"garbage\r\n\r\n",
        b"HTTP/1.1 2000 OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"2\r\nhi\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nhi",
        b"HTTP/1.1 200 OK\r\nBad Header\r\n\r\n",
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",
    ],
    ids=["garbage", "status", "cl-and-te", "two-cl", "header", "upgrade"],
)
async def test_malformed_response_is_a_protocol_error(pool: UpstreamPool, reply: bytes) -> None:
    async def handler(peer: Peer) -> None:
        await peer.request()
        await peer.send(reply)
        await peer.reader.read()

    async with Upstream(handler) as up:
        with pytest.raises(UpstreamProtocolError):
            await pool.request(up.address, "GET", "/", [])
        await wait_for_async(_no_open(pool, up.address), timeout=5)


async def test_close_before_the_head_is_a_protocol_error(pool: UpstreamPool) -> None:
    async def handler(peer: Peer) -> None:
        await peer.request()
        peer.close()

    async with Upstream(handler) as up:
        with pytest.raises(UpstreamProtocolError, match="before the response head"):
            await pool.request(up.address, "GET", "/", [])
    assert up.connections == 1  # a fresh connection is never retried


@pytest.mark.parametrize(
    "reply",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\nonly this",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n9\r\nonly this\r\n",
    ],
    ids=["content-length", "chunked"],
)
async def test_truncated_body_is_a_protocol_error_while_streaming(
    pool: UpstreamPool, reply: bytes
) -> None:
    async def handler(peer: Peer) -> None:
        await peer.request()
        await peer.send(reply)
        peer.close()

    async with Upstream(handler) as up:
        resp = await pool.request(up.address, "GET", "/", [])
        assert resp.status == 200
        got = []
        with pytest.raises(UpstreamProtocolError, match="before the end of the body"):
            async for chunk in resp.stream():
                got.append(chunk)
        assert b"".join(got) == b"only this"
        await resp.aclose()


async def test_body_over_max_body_is_refused() -> None:
    async def handler(peer: Peer) -> None:
        async for req in peer.requests():
            if req.target == "/declared":
                await peer.send(ok(b"x" * 2000))
            else:
                await peer.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
                await peer.send(b"400\r\n" + b"x" * 1024 + b"\r\n" + b"400\r\n" + b"x" * 1024)

    async with Upstream(handler) as up, UpstreamPool(max_body=1500) as pool:
        with pytest.raises(UpstreamBodyTooLarge):
            await pool.request(up.address, "GET", "/declared", [])
        resp = await pool.request(up.address, "GET", "/chunked", [])
        with pytest.raises(UpstreamBodyTooLarge):
            await resp.read()
        await resp.aclose()


async def test_closing_a_response_early_closes_its_connection(pool: UpstreamPool) -> None:
    async def handler(peer: Peer) -> None:
        async for _ in peer.requests():
            await peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n" + CHUNK)
            await peer.reader.read()

    async with Upstream(handler) as up:
        resp = await pool.request(up.address, "GET", "/", [])
        async for _ in resp.stream():
            break
        await resp.aclose()
        await wait_for_async(_no_open(pool, up.address), timeout=5)


async def test_cancelled_request_closes_its_connection(pool: UpstreamPool) -> None:
    got_request = asyncio.Event()

    async def handler(peer: Peer) -> None:
        await peer.request()
        got_request.set()
        await peer.reader.read()

    async with Upstream(handler) as up:
        task = asyncio.create_task(pool.request(up.address, "GET", "/", []))
        await got_request.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await wait_for_async(_no_open(pool, up.address), timeout=5)


async def test_closed_pool_refuses_requests() -> None:
    pool = UpstreamPool()
    await pool.close()
    with pytest.raises(UpstreamError, match="closed"):
        await pool.request("127.0.0.1:1", "GET", "/", [])


# Request bodies and heads.


async def test_request_framing(pool: UpstreamPool) -> None:
    async with Upstream(keep_alive) as up:
        for method, headers, body in [
            ("POST", [], None),
            ("POST", [], b"abc"),
            ("PUT", [("Content-Length", "6")], chunks(2, b"xyz")),
            ("PUT", [("Transfer-Encoding", "chunked")], chunks(3, b"12")),
            ("GET", [("Host", "example.test")], None),
        ]:
            resp = await pool.request(up.address, method, "/", headers, body=body)
            await resp.read()
            await resp.aclose()
    no_body, small, sized, chunked, host = up.requests
    assert no_body.header("Content-Length") == "0"
    assert (small.header("Content-Length"), small.body) == ("3", b"abc")
    assert (sized.header("Content-Length"), sized.body) == ("6", b"xyzxyz")
    assert sized.header("Transfer-Encoding") is None
    assert (chunked.header("Transfer-Encoding"), chunked.body) == ("chunked", b"121212")
    assert host.header("Host") == "example.test" and host.header("Content-Length") is None
    assert up.connections == 1


@pytest.mark.parametrize(
    ("target", "headers"),
    [
        ("/ HTTP/1.1\r\nX-Evil: 1", []),
        ("/", [("X-Evil", "a\r\nX-Injected: b")]),
        ("/", [("X-Evil", "a\nX-Injected: b")]),
        ("/", [("X-Evil\r\nX-Injected", "b")]),
    ],
)
async def test_split_heads_are_refused(
    pool: UpstreamPool, target: str, headers: list[tuple[str, str]]
) -> None:
    with pytest.raises(ValueError):
        await pool.request("127.0.0.1:1", "GET", target, headers)


async def test_streamed_body_shorter_than_its_content_length_fails(pool: UpstreamPool) -> None:
    async def handler(peer: Peer) -> None:
        await peer.request()

    async with Upstream(handler) as up:
        with pytest.raises(ValueError, match="Content-Length"):
            await pool.request(
                up.address, "PUT", "/", [("Content-Length", "10")], body=chunks(1, b"short")
            )


async def test_body_iterator_errors_reach_the_caller(pool: UpstreamPool) -> None:
    class ClientGone(Exception):
        pass

    async def failing() -> AsyncIterator[bytes]:
        yield b"part"
        raise ClientGone

    async with Upstream(keep_alive) as up:
        with pytest.raises(ClientGone):
            await pool.request(up.address, "POST", "/", [], body=failing())
        await wait_for_async(_no_open(pool, up.address), timeout=5)


async def test_early_response_stops_the_upload_and_closes(pool: UpstreamPool) -> None:
    async def handler(peer: Peer) -> None:
        await peer.reader.readuntil(b"\r\n\r\n")  # the head only, then refuse the body
        await peer.send(b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 8\r\n\r\ntoo big!")
        while await peer.reader.read(256 * 1024):
            pass

    pulled = 0

    async def endless() -> AsyncIterator[bytes]:
        nonlocal pulled
        while True:
            pulled += 1
            yield CHUNK

    async with Upstream(handler) as up:
        resp = await pool.request(up.address, "POST", "/", [], body=endless())
        assert resp.status == 413 and await resp.read() == b"too big!"
        await resp.aclose()
        await wait_for_async(_no_open(pool, up.address), timeout=5)
    assert 0 < pulled < 10_000


def _traced_peak(started: int) -> int:
    return tracemalloc.get_traced_memory()[1] - started


@pytest.mark.parametrize("declared", [False, True], ids=["chunked", "content-length"])
async def test_100mb_streaming_upload_in_bounded_memory(pool: UpstreamPool, declared: bool) -> None:
    count = 100 * MB // len(CHUNK)
    expected_crc = 0
    for _ in range(count):
        expected_crc = zlib.crc32(CHUNK, expected_crc)

    async with Upstream(keep_alive) as up:
        headers = [("Content-Length", str(count * len(CHUNK)))] if declared else []
        tracemalloc.start()
        try:
            base = tracemalloc.get_traced_memory()[0]
            resp = await pool.request(up.address, "POST", "/upload", headers, body=chunks(count))
            assert await resp.read() == b"/upload"
            await resp.aclose()
            peak = _traced_peak(base)
        finally:
            tracemalloc.stop()
    req = up.requests[0]
    assert (req.size, req.crc) == (100 * MB, expected_crc)
    assert peak < 8 * MB, f"peak {peak / MB:.1f} MiB"


async def test_100mb_streaming_download_in_bounded_memory(pool: UpstreamPool) -> None:
    total = 100 * MB

    async def handler(peer: Peer) -> None:
        async for _ in peer.requests():
            await peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % total)
            for _ in range(total // len(CHUNK)):
                await peer.send(CHUNK)

    async with Upstream(handler) as up:
        tracemalloc.start()
        try:
            base = tracemalloc.get_traced_memory()[0]
            resp = await pool.request(up.address, "GET", "/download", [])
            size, crc, expected_crc = 0, 0, 0
            async for chunk in resp.stream():
                size += len(chunk)
                crc = zlib.crc32(chunk, crc)
                await asyncio.sleep(0)  # a consumer slower than the socket
            await resp.aclose()
            peak = _traced_peak(base)
        finally:
            tracemalloc.stop()
        for _ in range(total // len(CHUNK)):
            expected_crc = zlib.crc32(CHUNK, expected_crc)
        assert (size, crc) == (total, expected_crc)
        assert peak < 8 * MB, f"peak {peak / MB:.1f} MiB"
        assert pool.stats()[up.address]["idle"] == 1


# Concurrency, stats, exports.


async def test_64_concurrent_requests_through_one_pool(pool: UpstreamPool) -> None:
    async def one(i: int) -> bytes:
        resp = await pool.request(up.address, "GET", f"/{i}", [])
        try:
            return await resp.read()
        finally:
            await resp.aclose()

    async with Upstream(keep_alive) as up:
        for _ in range(3):
            bodies = await asyncio.gather(*(one(i) for i in range(64)))
            assert bodies == [f"/{i}".encode() for i in range(64)]
        stats = pool.stats()[up.address]
        assert stats["idle"] <= pool.max_idle_per_host
        assert stats["connects"] <= 64 * 3
        assert stats["reuses"] > 0
        await wait_for_async(_settled(pool, up.address), timeout=5)


def _settled(pool: UpstreamPool, address: str) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        stats = pool.stats()[address]
        return stats["open"] == stats["idle"] <= pool.max_idle_per_host

    return check


async def test_close_closes_every_connection() -> None:
    async with Upstream(keep_alive) as up:
        pool = UpstreamPool()
        resps = await asyncio.gather(*(pool.request(up.address, "GET", "/", []) for _ in range(4)))
        for resp in resps[:2]:
            await resp.read()
            await resp.aclose()
        await pool.close()
        assert pool.stats()[up.address]["open"] == 0


def test_strip_hop_by_hop() -> None:
    headers = [
        ("Content-Type", "text/plain"),
        ("Connection", "keep-alive, X-Private"),
        ("Keep-Alive", "timeout=5"),
        ("Proxy-Authenticate", "Basic"),
        ("Proxy-Connection", "keep-alive"),
        ("TE", "trailers"),
        ("Trailer", "X-T"),
        ("Transfer-Encoding", "chunked"),
        ("Upgrade", "h2c"),
        ("x-private", "secret"),
        ("Set-Cookie", "a=1"),
        ("Set-Cookie", "b=2"),
    ]
    assert strip_hop_by_hop(headers) == [
        ("Content-Type", "text/plain"),
        ("Set-Cookie", "a=1"),
        ("Set-Cookie", "b=2"),
    ]


def test_public_names() -> None:
    assert sorted(webapi.proxy.__all__) == [
        "IDEMPOTENT_METHODS",
        "UpstreamBodyTooLarge",
        "UpstreamConnectError",
        "UpstreamError",
        "UpstreamPool",
        "UpstreamProtocolError",
        "UpstreamResponse",
        "UpstreamTimeout",
        "strip_hop_by_hop",
    ]
    assert issubclass(UpstreamTimeout, TimeoutError)
    assert issubclass(UpstreamBodyTooLarge, UpstreamProtocolError)
