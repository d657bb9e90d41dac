"""The upstream HTTP/1.1 pool: streamed request bodies, 100 MB bodies in bounded
memory, concurrency and closing.

Runs against the scripted servers of `tests.webapi.upstream_servers`.
"""

from __future__ import annotations

import asyncio
import tracemalloc
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from tests.helpers import wait_for_async
from tests.webapi.upstream_servers import (
    CHUNK,
    MB,
    Peer,
    Upstream,
    _no_open,
    chunks,
    keep_alive,
    upstream_pool,  # noqa: F401  (the `pool` fixture)
)
from webapi.proxy import UpstreamPool

pytestmark = pytest.mark.timeout(30)


# Request bodies.


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


# Big bodies in bounded memory.


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


# Concurrency and close.


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
