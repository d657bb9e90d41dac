"""The upstream HTTP/1.1 pool: stale-connection retries, timeouts, protocol errors.

Runs against the scripted servers of `tests.webapi.upstream_servers`.
"""

from __future__ import annotations

import asyncio
import socket

import pytest

from tests.helpers import free_port, wait_for_async
from tests.webapi.upstream_servers import (
    CHUNK,
    Handler,
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
    UpstreamConnectError,
    UpstreamError,
    UpstreamHeadTooLarge,
    UpstreamPool,
    UpstreamProtocolError,
    UpstreamTimeout,
)

pytestmark = pytest.mark.timeout(30)


# Stale connections and retries.


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


# Errors.


async def test_connect_refused_is_a_connect_error_caused_by_the_refusal(pool: UpstreamPool) -> None:
    # The refusal itself, not a connect timeout waited out (nor retried into one).
    with pytest.raises(UpstreamConnectError, match="cannot connect") as info:
        await pool.request(f"127.0.0.1:{free_port()}", "GET", "/", [])
    assert isinstance(info.value.__cause__, ConnectionRefusedError)


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
            try:
                resp = await pool.request(f"127.0.0.1:{port}", "GET", "/", [], timeout=5)
            except UpstreamConnectError as exc:
                # The connect timeout's error: the request's 5 s would be an UpstreamTimeout.
                assert "timed out after 0.2 s" in str(exc)
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
        # The read timeout's own error (no other bound is set: without it, a hang).
        with pytest.raises(UpstreamTimeout, match=r"no progress from .* for 0\.2 s"):
            await pool.request(up.address, "GET", "/", [])


async def test_trickling_server_hits_the_total_timeout() -> None:
    async def handler(peer: Peer) -> None:
        await peer.request()
        for byte in b"HTTP/1.1 200 OK\r\nX-Slow: " + b"y" * 1000:
            await peer.send(bytes([byte]))
            await asyncio.sleep(0.02)  # the server is slow on purpose

    async with Upstream(handler) as up, UpstreamPool(read_timeout=1.0) as pool:
        # The head's deadline (`timeout`) is the only bound that says so: a trickle never
        # lets the read timeout fire, and the head would not end before the server does.
        with pytest.raises(UpstreamTimeout, match="no response head"):
            await pool.request(up.address, "GET", "/", [], timeout=0.3)


async def test_trickling_body_is_cut_at_the_total_timeout() -> None:
    """No silence ever reaches the read timeout, but the whole exchange is bounded."""

    async def handler(peer: Peer) -> None:
        await peer.request()
        await peer.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        for _ in range(200):  # 10 s in all, a chunk every 50 ms
            await peer.send(b"1\r\nx\r\n")
            await asyncio.sleep(0.05)
        await peer.send(b"0\r\n\r\n")

    async with Upstream(handler) as up, UpstreamPool(read_timeout=1.0) as pool:
        resp = await pool.request(up.address, "GET", "/", [], timeout=5, total=0.5)
        got = b""
        with pytest.raises(UpstreamTimeout, match="not over in time"):
            async for chunk in resp.stream():
                got += chunk
        await resp.aclose()
        assert 0 < len(got) < 200  # cut before the end
        await wait_for_async(_no_open(pool, up.address), timeout=5)


async def test_total_timeout_bounds_the_wait_for_the_head_too() -> None:
    async def handler(peer: Peer) -> None:
        await peer.request()
        await asyncio.sleep(0.8)  # within `timeout`, beyond `total`
        await peer.send(ok())

    async with Upstream(handler) as up, UpstreamPool(read_timeout=5.0) as pool:
        with pytest.raises(UpstreamTimeout, match="no response head"):
            await pool.request(up.address, "GET", "/", [], timeout=5, total=0.2)
        # Without a total timeout the same wait is answered.
        resp = await pool.request(up.address, "GET", "/", [], timeout=5)
        assert await resp.read() == b"hello world"


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
        # A coding the proxy would strip (Transfer-Encoding is hop-by-hop) undecoded.
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nhi",
    ],
    ids=["garbage", "status", "cl-and-te", "two-cl", "header", "upgrade", "gzip-chunked", "gzip"],
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


def _endless(start: bytes, repeated: bytes) -> Handler:
    """A server that answers a request with `start`, then `repeated` without end."""

    async def handler(peer: Peer) -> None:
        await peer.request()
        await peer.send_endless(start, repeated)

    return handler


@pytest.mark.parametrize(
    ("start", "repeated"),
    [
        (b"HTTP/1.1 200 OK\r\nX-Endless: ", b"a"),
        (b"HTTP/1.1 200 OK\r\n", b"X-One-More: header\r\n"),
        (b"", b"HTTP/1.1 100 Continue\r\n\r\n"),
        (b"HTTP/1.1 200 ", b"reason "),
    ],
    ids=["one endless field", "endless fields", "endless 100 continue", "endless reason"],
)
async def test_a_response_head_over_the_limit_is_a_protocol_error(
    pool: UpstreamPool, start: bytes, repeated: bytes
) -> None:
    # As nginx's "upstream sent too big header" (proxy_buffer_size): a head that never
    # ends must not hold the exchange, or grow the gateway's memory, until a timeout.
    async with Upstream(_endless(start, repeated)) as up:
        with pytest.raises(UpstreamHeadTooLarge, match="response head over 65536 bytes"):
            await pool.request(up.address, "GET", "/", [])
        await wait_for_async(_no_open(pool, up.address), timeout=5)


async def test_a_large_head_within_the_limit_is_answered(pool: UpstreamPool) -> None:
    fields = [f"X-Field-{i}: {'v' * 100}" for i in range(300)]  # 34 KB

    async def handler(peer: Peer) -> None:
        await peer.request()
        await peer.send(ok(b"fine", *fields))
        await peer.reader.read()

    async with Upstream(handler) as up:
        resp = await pool.request(up.address, "GET", "/", [])
        assert await resp.read() == b"fine"
        assert len(resp.raw_headers) >= 300


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
