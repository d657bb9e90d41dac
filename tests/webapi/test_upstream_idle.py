"""The upstream pool's sweep: idle connections past `idle_timeout` are closed, and the
entries of addresses with no connection left are dropped, with no further request to
those addresses (an instance that left the registry gets none).

Runs against the scripted servers of `tests.webapi.upstream_servers`.
"""

from __future__ import annotations

import asyncio

import pytest

from tests.helpers import wait_for_async
from tests.webapi.upstream_servers import (
    Peer,
    Upstream,
    ok,
    upstream_pool,  # noqa: F401  (the `pool` fixture)
)
from webapi.proxy import UpstreamConnectError, UpstreamPool

pytestmark = pytest.mark.timeout(30)

IDLE_TIMEOUT = 0.2


async def _get(pool: UpstreamPool, address: str, target: str = "/") -> bytes:
    resp = await pool.request(address, "GET", target, [])
    try:
        return await resp.read()
    finally:
        await resp.aclose()


async def test_an_idle_connection_the_upstream_never_closes_is_closed_by_the_pool(
    pool: UpstreamPool,
) -> None:
    pool.idle_timeout = IDLE_TIMEOUT
    closed_by_client = asyncio.Event()

    async def handler(peer: Peer) -> None:
        # Keeps its side open forever, as a host that vanished would.
        async for req in peer.requests():
            await peer.send(ok(req.target.encode()))
        closed_by_client.set()

    async with Upstream(handler) as up:
        assert await _get(pool, up.address, "/1") == b"/1"
        assert pool.stats()[up.address]["idle"] == 1
        await asyncio.wait_for(closed_by_client.wait(), timeout=5)
        await wait_for_async(lambda: up.address not in pool.stats(), timeout=5)
    assert up.connections == 1


async def test_entries_of_addresses_with_no_connection_left_are_dropped(
    pool: UpstreamPool,
) -> None:
    async def close_after_one(peer: Peer) -> None:
        req = await peer.request()
        if req is not None:
            await peer.send(ok(req.target.encode()))
        peer.close()

    ups = [Upstream(close_after_one) for _ in range(10)]
    for up in ups:
        await up.__aenter__()
    try:
        for up in ups:
            assert await _get(pool, up.address) == b"/"
        assert set(pool.stats()) == {up.address for up in ups}
    finally:
        for up in ups:
            await up.__aexit__(None, None, None)
    refused = ups[0].address  # nothing listens there any more
    with pytest.raises(UpstreamConnectError):
        await pool.request(refused, "GET", "/", [])
    await wait_for_async(lambda: pool.stats() == {}, timeout=5)

    # An address whose entry was dropped is served again, from a new entry.
    async with Upstream(close_after_one) as up:
        assert await _get(pool, up.address, "/again") == b"/again"
        assert pool.stats()[up.address]["connects"] == 1


async def test_a_connection_in_use_outlives_the_idle_timeout_and_keeps_its_entry(
    pool: UpstreamPool,
) -> None:
    pool.idle_timeout = IDLE_TIMEOUT
    answer = asyncio.Event()

    async def slow(peer: Peer) -> None:
        async for req in peer.requests():
            await answer.wait()
            await peer.send(ok(req.target.encode()))

    async def quick(peer: Peer) -> None:
        async for req in peer.requests():
            await peer.send(ok(req.target.encode()))

    async with Upstream(slow) as busy, Upstream(quick) as other:
        pending = asyncio.ensure_future(_get(pool, busy.address, "/slow"))
        await wait_for_async(lambda: busy.requests, timeout=5)
        assert await _get(pool, other.address) == b"/"
        # The other address's idle connection was swept: sweeps ran past the idle
        # timeout while the slow exchange was under way.
        await wait_for_async(lambda: other.address not in pool.stats(), timeout=5)
        assert pool.stats()[busy.address]["active"] == 1
        answer.set()
        assert await pending == b"/slow"
        # Back to idle, then swept in its turn.
        await wait_for_async(lambda: busy.address not in pool.stats(), timeout=5)
    assert busy.connections == 1
