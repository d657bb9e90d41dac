"""`common.redis_pool.TrimmedPool` (through `connect()`), against a real redis-server: a
burst's connections are closed once idle, down to the floor; connections in use (a
pub/sub subscription, a blocking read) and one in steady use are not."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable

import pytest
import redis.asyncio as aioredis

from common.connection import as_text, connect, connect_configured
from common.settings import Settings
from tests.helpers import wait_for_async

pytestmark = pytest.mark.timeout(30)

# Short for the test; the default is 60 s.
IDLE = 0.3


Open = Callable[[int], tuple[str, aioredis.Redis]]


@pytest.fixture
async def open_client(redis_url: str) -> AsyncIterator[Open]:
    """Opens a client (`connect()`, idle timeout `IDLE`, the floor given) under a name
    of its own, closed after the test; returns the name and the client."""
    clients: list[aioredis.Redis] = []

    def open_(min_idle: int) -> tuple[str, aioredis.Redis]:
        name = f"pool-{uuid.uuid4().hex[:8]}"
        clients.append(connect(redis_url, name=name, idle_timeout=IDLE, min_idle=min_idle))
        return name, clients[-1]

    yield open_
    for client in clients:
        await client.aclose()


async def _connections(admin: aioredis.Redis, name: str) -> int:
    """How many connections Redis has from clients named `name`."""
    listing = as_text(await admin.execute_command("CLIENT", "LIST"))
    return sum(1 for line in listing.splitlines() if f" name={name} " in line)


async def _connections_are(admin: aioredis.Redis, name: str, n: int) -> bool:
    return await _connections(admin, name) == n


async def _burst(redis: aioredis.Redis, n: int) -> None:
    """`n` commands at once, each holding its connection a moment: `n` connections."""
    await asyncio.gather(*(redis.blpop([f"pool-test:none:{i}"], timeout=0.2) for i in range(n)))


async def test_a_bursts_connections_are_closed_down_to_the_floor(
    open_client: Open, redis_client: aioredis.Redis
) -> None:
    name, redis = open_client(1)
    await _burst(redis, 12)
    assert await _connections(redis_client, name) == 12

    # Idle past the timeout: Redis sees one connection left (the floor), not twelve.
    await wait_for_async(lambda: _connections_are(redis_client, name, 1), timeout=10)
    pool = redis.connection_pool
    assert len(pool._available_connections) == 1  # type: ignore[attr-defined]
    assert pool._trim_timer is None  # type: ignore[attr-defined]  # at rest: no check armed

    # Calls still work, on the connection kept and on new ones for another burst.
    await redis.set(f"pool-test:{name}", b"v")
    assert await redis.get(f"pool-test:{name}") == b"v"
    await _burst(redis, 5)
    assert await _connections(redis_client, name) == 5
    await wait_for_async(lambda: _connections_are(redis_client, name, 1), timeout=10)


async def test_connections_in_use_are_never_closed(
    open_client: Open, redis_client: aioredis.Redis
) -> None:
    """A subscription and a blocking read hold their connections past the idle timeout
    (no floor): the burst's idle connections go, those two stay and still work."""
    name, redis = open_client(0)
    channel, key = f"pool-test:{name}:channel", f"pool-test:{name}:list"
    pubsub = redis.pubsub()
    await pubsub.subscribe(channel)
    assert (await pubsub.get_message(timeout=5))["type"] == "subscribe"  # type: ignore[index]
    blocked = asyncio.create_task(redis.blpop([key], timeout=0))  # until something comes
    await _burst(redis, 6)
    assert await _connections(redis_client, name) == 8

    await wait_for_async(lambda: _connections_are(redis_client, name, 2), timeout=10)
    assert not blocked.done()
    await redis_client.lpush(key, b"item")
    assert await asyncio.wait_for(blocked, 5) == (key.encode(), b"item")
    await redis_client.publish(channel, b"hello")
    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=5)
    assert message is not None and message["data"] == b"hello"
    await pubsub.aclose()


async def test_a_connection_in_steady_use_is_kept(open_client: Open) -> None:
    """With no floor, commands one after the other keep their one connection open (its
    idle time is since its last reply) while the burst's others are closed."""
    name, redis = open_client(0)
    await _burst(redis, 6)
    pool = redis.connection_pool
    free = pool._available_connections  # type: ignore[attr-defined]
    busy = free[-1]  # the next one handed out: the pool is a stack
    used = []

    async def only_one_left() -> bool:
        count = await _connections(redis, name)  # a command of its own, on `busy`
        used.append(free[-1])  # the connection it used, back on top
        return count == 1

    await wait_for_async(only_one_left, timeout=10, interval=0.01)  # far under IDLE
    assert set(used) == {busy} and free == [busy]
    assert await redis.ping()


async def test_an_idle_timeout_of_0_never_closes(redis_url: str) -> None:
    redis = connect(redis_url, idle_timeout=0)
    try:
        await _burst(redis, 3)
        assert redis.connection_pool._trim_timer is None  # type: ignore[attr-defined]
    finally:
        await redis.aclose()


async def test_closing_the_client_closes_its_pool(
    redis_url: str, redis_client: aioredis.Redis
) -> None:
    """`aclose()` on a client `connect()` made closes every connection its pool opened,
    and the idle check with them (no timer left armed on the loop)."""
    name = f"pool-{uuid.uuid4().hex[:8]}"
    redis = connect(redis_url, name=name, idle_timeout=60)
    await _burst(redis, 4)
    pool = redis.connection_pool
    assert await _connections(redis_client, name) == 4
    await redis.aclose()
    await wait_for_async(lambda: _connections_are(redis_client, name, 0), timeout=10)
    assert pool._trim_timer is None  # type: ignore[attr-defined]


async def test_a_process_client_takes_its_pools_idle_timeout_from_its_settings(
    redis_url: str,
) -> None:
    """`connect_configured()`, which the gateway, the WebSocket service, workers and
    `RpcClient` build their clients with: REDIS_URL and REDIS_POOL_IDLE_TIMEOUT."""
    redis = connect_configured(Settings(redis_url=redis_url, redis_pool_idle_timeout=5.0))
    try:
        assert redis.connection_pool.idle_timeout == 5.0  # type: ignore[attr-defined]
        assert await redis.ping()
    finally:
        await redis.aclose()
