"""The iptv worker's background loops against Redis refusing writes (maxmemory reached,
noeviction: the OOM error), on a private redis-server: each loop says so once, goes
on, and says when it works again (before: the first refusal ended it, silently)."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Iterator

import pytest
import redis.asyncio as aioredis

from common import Service
from common.aio import cancel_and_wait
from common.embedded_redis import EmbeddedRedis
from common.settings import Settings
from microservices.iptv.catalog import Catalog, Keys
from microservices.iptv.now_playing import NowPlaying
from microservices.iptv.seed import default_guide_start, ensure_seeded
from microservices.iptv.service import keep_seeded
from tests.helpers import serve_until_live, wait_for_async

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def server() -> Iterator[EmbeddedRedis]:
    with EmbeddedRedis() as private:
        yield private


@pytest.fixture
async def redis(server: EmbeddedRedis) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(server.url)
    try:
        yield client
    finally:
        await client.aclose()


async def full(redis: aioredis.Redis, on: bool) -> None:
    """Redis refusing every write (`on`), or taking them again."""
    await redis.config_set("maxmemory-policy", "noeviction")
    await redis.config_set("maxmemory", "1" if on else "0")


async def error_replies(redis: aioredis.Redis) -> int:
    """How many error replies Redis has sent: the refused attempts, counted by Redis."""
    return int((await redis.info("stats"))["total_error_replies"])


def lines(caplog: pytest.LogCaptureFixture, message: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.getMessage() == message]


async def test_now_playing_says_once_that_redis_refuses_and_goes_on(
    redis: aioredis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="iptv.now_playing")
    await ensure_seeded(redis, 3, default_guide_start())
    await full(redis, True)  # nothing announced yet: every check has to write
    before = await error_replies(redis)
    announcer = NowPlaying(redis, Catalog(redis), interval=0.02)
    task = asyncio.create_task(announcer.run())
    try:
        # Several checks refused (three channels each), the loop still running.
        await wait_for_async(lambda: _more(redis, before, 12))
        assert not task.done(), task.exception()
        (failed,) = lines(caplog, "now playing check failed")  # once, not per check
        assert "OOM" in getattr(failed, "fields", {})["error"]
        await full(redis, False)
        await wait_for_async(lambda: lines(caplog, "now playing changed"))
        assert len(lines(caplog, "now playing checks again")) == 1
    finally:
        await cancel_and_wait(task)


async def test_keep_seeded_says_once_that_redis_refuses_and_seeds_later(
    server: EmbeddedRedis, redis: aioredis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="iptv")
    svc = Service(f"iptvt_{uuid.uuid4().hex[:8]}", settings=Settings(iptv_channels=3))
    serving = await serve_until_live(svc, server.url)
    await full(redis, True)  # the catalog is gone and cannot be written again yet
    before = await error_replies(redis)
    task = asyncio.create_task(keep_seeded(svc, interval=0.02))
    try:
        await wait_for_async(lambda: _more(redis, before, 5))
        assert not task.done(), task.exception()
        assert len(lines(caplog, "catalog check failed")) == 1
        await full(redis, False)
        await wait_for_async(lambda: lines(caplog, "catalog was gone from Redis: seeded it again"))
        assert await redis.hlen(Keys.channels) == 3
        assert len(lines(caplog, "catalog checks again")) == 1
    finally:
        await cancel_and_wait(task)
        svc.request_stop()
        await asyncio.wait_for(serving, 20)


async def _more(redis: aioredis.Redis, before: int, n: int) -> bool:
    return await error_replies(redis) >= before + n
