"""`RateLimiter`: GCRA in one Redis script, batched, with a fallback when Redis is down.

The same semantics are checked against Redis and against the in-process
fallback ("local" mode, Redis unreachable), so the two cannot drift apart.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from common.connection import connect
from common.embedded_redis import EmbeddedRedis, free_port
from common.errors import ConfigError, ServiceUnavailable
from common.ratelimit import KEY_PREFIX, NO_LIMIT, Limit, RateLimiter
from tests.helpers import wait_for_async

pytestmark = pytest.mark.timeout(60)

LOGGER = "switchboard.ratelimit"


def _key() -> str:
    return f"test:{uuid.uuid4().hex[:12]}"


def _nowhere() -> str:
    """A Redis URL nothing listens on."""
    return f"redis://127.0.0.1:{free_port()}/0"


@pytest.fixture(params=["redis", "local"])
async def limiter(request: pytest.FixtureRequest, redis_url: str) -> AsyncIterator[RateLimiter]:
    """A limiter on the test Redis, or one whose Redis is unreachable (mode "local")."""
    client = connect(redis_url if request.param == "redis" else _nowhere())
    rate_limiter = RateLimiter(client, on_redis_down="local")
    try:
        yield rate_limiter
    finally:
        await rate_limiter.close()
        await client.aclose()


async def test_fresh_key_allows_exactly_the_burst(
    limiter: RateLimiter, request: pytest.FixtureRequest
) -> None:
    limit, key = Limit(rate=1, period=3600, burst=5), _key()
    decisions = [await limiter.check([(key, limit)]) for _ in range(6)]
    assert [d.allowed for d in decisions] == [True] * 5 + [False]
    assert [d.remaining for d in decisions] == [4, 3, 2, 1, 0, 0]
    assert all(d.limit == 5 for d in decisions)
    assert all(d.retry_after == 0 for d in decisions[:5])
    # The next request is one emission interval (3600 s) away.
    assert 3500 < decisions[5].retry_after <= 3600
    # The fixture's "local" variant really answered without Redis.
    assert limiter.degraded == (request.node.callspec.params["limiter"] == "local")


async def test_remaining_and_reset(limiter: RateLimiter) -> None:
    limit, key = Limit(rate=10, period=60, burst=5), _key()  # one request every 6 s
    first = await limiter.check([(key, limit)])
    assert (first.allowed, first.limit, first.remaining, first.retry_after) == (True, 5, 4, 0)
    assert 5 < first.reset <= 6  # full again one interval after the first request
    for _ in range(4):
        last = await limiter.check([(key, limit)])
    assert (last.allowed, last.remaining) == (True, 0)
    assert 29 < last.reset <= 30
    denied = await limiter.check([(key, limit)])
    assert (denied.allowed, denied.limit, denied.remaining) == (False, 5, 0)
    assert 5 < denied.retry_after <= 6
    assert 29 < denied.reset <= 30


async def test_all_or_nothing_with_two_limits(limiter: RateLimiter) -> None:
    tight, loose = Limit(rate=1, period=3600, burst=2), Limit(rate=1, period=3600, burst=5)
    key_a, key_b = _key(), _key()
    both = [(key_a, tight), (key_b, loose)]
    first, second, third = [await limiter.check(both) for _ in range(3)]
    # The most restrictive check answers: the tight one.
    assert (first.allowed, first.limit, first.remaining) == (True, 2, 1)
    assert (second.allowed, second.limit, second.remaining) == (True, 2, 0)
    assert (third.allowed, third.limit, third.remaining) == (False, 2, 0)
    # The refused request consumed nothing from the loose limit: 2 used of 5.
    alone = await limiter.check([(key_b, loose)])
    assert (alone.allowed, alone.limit, alone.remaining) == (True, 5, 2)


async def test_the_same_key_twice_in_one_request_counts_twice(limiter: RateLimiter) -> None:
    limit, key = Limit(rate=1, period=3600, burst=3), _key()
    assert (await limiter.check([(key, limit), (key, limit)])).remaining == 1
    refused = await limiter.check([(key, limit), (key, limit)])
    assert not refused.allowed
    # Nothing consumed by the refusal: one request is still allowed.
    assert (await limiter.check([(key, limit)])).allowed


async def test_no_checks_is_no_limit(limiter: RateLimiter) -> None:
    assert await limiter.check([]) == NO_LIMIT


async def test_keys_are_hash_tagged_and_expire_when_full(redis_client: aioredis.Redis) -> None:
    key, limit = _key(), Limit(rate=10, period=60, burst=5)
    limiter = RateLimiter(redis_client)
    try:
        for _ in range(3):
            await limiter.check([(key, limit)])
        assert KEY_PREFIX == "sb:{ratelimit}:"
        ttl = await redis_client.pttl(KEY_PREFIX + key)
        assert 17_000 < ttl <= 18_000  # three intervals of 6 s: full again then
    finally:
        await limiter.close()


async def test_concurrent_checks_are_batched_and_exact() -> None:
    with EmbeddedRedis() as server:
        client = connect(server.url)
        limiter = RateLimiter(client)
        try:
            await client.config_resetstat()
            key, limit = _key(), Limit(rate=1, period=3600, burst=37)
            decisions = await asyncio.gather(*(limiter.check([(key, limit)]) for _ in range(200)))
            assert sum(d.allowed for d in decisions) == 37
            assert sorted(d.remaining for d in decisions if d.allowed) == list(range(37))
            stats = await client.info("commandstats")
            evalsha = stats["cmdstat_evalsha"]["calls"]
            # One lone check, then the 199 that queued meanwhile in one batch (plus
            # the retry after NOSCRIPT on this fresh server); far fewer than 200 anyway.
            assert 1 <= evalsha < 10, evalsha
        finally:
            await limiter.close()
            await client.aclose()


async def test_two_limiters_on_two_connections_share_one_limit(redis_url: str) -> None:
    client_a, client_b = connect(redis_url), connect(redis_url)
    limiter_a, limiter_b = RateLimiter(client_a), RateLimiter(client_b)
    try:
        key, limit = _key(), Limit(rate=5, period=3600, burst=40)
        checks = [(limiter_a if i % 2 else limiter_b).check([(key, limit)]) for i in range(300)]
        decisions = await asyncio.gather(*checks)
        assert sum(d.allowed for d in decisions) == 40
        assert not (await limiter_a.check([(key, limit)])).allowed
        assert not (await limiter_b.check([(key, limit)])).allowed
    finally:
        for lim in (limiter_a, limiter_b):
            await lim.close()
        for client in (client_a, client_b):
            await client.aclose()


async def test_survives_a_script_cache_flush(redis_client: aioredis.Redis) -> None:
    limiter = RateLimiter(redis_client)
    try:
        key, limit = _key(), Limit(rate=1, period=3600, burst=2)
        assert (await limiter.check([(key, limit)])).remaining == 1
        await redis_client.script_flush()
        assert (await limiter.check([(key, limit)])).remaining == 0
        assert not limiter.degraded
    finally:
        await limiter.close()


def test_limit_validation() -> None:
    for rate, period, burst in ((0, 1, 1), (1, 0, 1), (1, -1, 1), (1, 1, 0), (1, float("inf"), 1)):
        with pytest.raises(ValueError):
            Limit(rate, period, burst)
    assert Limit(3, 1, 1).interval == pytest.approx(1 / 3)
    with pytest.raises(ConfigError):
        RateLimiter(connect(_nowhere()), on_redis_down="maybe")


async def test_redis_down_local_enforces_the_same_limits(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    client = connect(_nowhere())
    limiter = RateLimiter(client, on_redis_down="local")
    try:
        key, limit = _key(), Limit(rate=1, period=3600, burst=3)
        decisions = [await limiter.check([(key, limit)]) for _ in range(5)]
        assert [d.allowed for d in decisions] == [True, True, True, False, False]
        assert limiter.degraded
        warnings = [r for r in caplog.records if r.name == LOGGER and r.levelno == logging.WARNING]
        assert len(warnings) == 1  # once per outage, not once per check
    finally:
        await limiter.close()
        await client.aclose()


async def test_local_fallback_keeps_a_bounded_number_of_keys() -> None:
    client = connect(_nowhere())
    limiter = RateLimiter(client, on_redis_down="local", local_max_keys=10)
    try:
        limit, first = Limit(rate=1, period=3600, burst=1), _key()
        assert (await limiter.check([(first, limit)])).allowed
        assert not (await limiter.check([(first, limit)])).allowed
        others = [_key() for _ in range(20)]
        for key in others:
            assert (await limiter.check([(key, limit)])).allowed
        # The oldest key was dropped to stay within the bound: it starts afresh...
        assert (await limiter.check([(first, limit)])).allowed
        # ...while the most recent ones are still remembered.
        assert not (await limiter.check([(others[-1], limit)])).allowed
    finally:
        await limiter.close()
        await client.aclose()


async def test_redis_down_open_allows_everything() -> None:
    client = connect(_nowhere())
    limiter = RateLimiter(client, on_redis_down="open")
    try:
        key, limits = _key(), (Limit(rate=1, period=3600, burst=3), Limit(1, 60, 2))
        for _ in range(10):
            decision = await limiter.check([(key, limits[0]), (key + "b", limits[1])])
            assert decision.allowed
            assert decision.limit == decision.remaining == 2
            assert decision.retry_after == 0
    finally:
        await limiter.close()
        await client.aclose()


async def test_redis_down_closed_refuses() -> None:
    client = connect(_nowhere())
    limiter = RateLimiter(client, on_redis_down="closed")
    try:
        for _ in range(3):
            with pytest.raises(ServiceUnavailable):
                await limiter.check([(_key(), Limit(1, 1, 1))])
        assert limiter.degraded
    finally:
        await limiter.close()
        await client.aclose()


async def test_outage_and_recovery(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    server = EmbeddedRedis().start()
    client = connect(server.url)
    limiter = RateLimiter(client, on_redis_down="local")
    key, limit = _key(), Limit(rate=1, period=3600, burst=10)
    try:
        assert (await limiter.check([(key, limit)])).remaining == 9
        server.stop()
        # During the outage: answered locally (a fresh local bucket), logged once.
        during = [await limiter.check([(key, limit)]) for _ in range(3)]
        assert [d.remaining for d in during] == [9, 8, 7]
        assert limiter.degraded

        server = EmbeddedRedis(port=server.port).start()

        async def recovered() -> bool:
            return not limiter.degraded

        await wait_for_async(recovered, timeout=20)
        # Back on Redis (an empty one: the old server kept nothing).
        assert (await limiter.check([(key, limit)])).remaining == 9
        assert await client.exists(KEY_PREFIX + key) == 1
        messages = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == LOGGER]
        assert [level for level, _msg in messages] == [logging.WARNING, logging.INFO]
    finally:
        await limiter.close()
        await client.aclose()
        server.stop()
