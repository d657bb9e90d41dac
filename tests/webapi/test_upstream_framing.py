"""The upstream HTTP/1.1 pool: response kinds, keep-alive, request heads, exports.

Runs against the scripted servers of `tests.webapi.upstream_servers`.
"""

from __future__ import annotations

import asyncio

import pytest

import webapi.proxy
from tests.helpers import wait_for_async
from tests.webapi.upstream_servers import (
    Peer,
    Upstream,
    _no_open,
    chunks,
    keep_alive,
    ok,
    upstream_pool,  # noqa: F401  (the `pool` fixture)
)
from webapi.proxy import (
    UpstreamBodyTooLarge,
    UpstreamPool,
    UpstreamProtocolError,
    UpstreamTimeout,
    strip_hop_by_hop,
)

pytestmark = pytest.mark.timeout(30)


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


# Keep-alive.


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


# Request heads.


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


# Headers and exports.


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
        "UpstreamHeadTooLarge",
        "UpstreamPool",
        "UpstreamProtocolError",
        "UpstreamResponse",
        "UpstreamTimeout",
        "strip_hop_by_hop",
    ]
    assert issubclass(UpstreamTimeout, TimeoutError)
    assert issubclass(UpstreamBodyTooLarge, UpstreamProtocolError)
