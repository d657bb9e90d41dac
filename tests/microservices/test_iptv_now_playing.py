"""The iptv "now playing" announcer against a real Redis: one message per change, once."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest
import redis.asyncio as aioredis

from common import constants
from microservices.iptv.catalog import Catalog
from microservices.iptv.now_playing import NowPlaying
from microservices.iptv.seed import default_guide_start, ensure_seeded
from tests.helpers import wait_for_async

pytestmark = pytest.mark.timeout(60)

NOW = default_guide_start() + timedelta(days=1, hours=3, minutes=1)


async def test_changes_are_announced_once_per_change(redis_url: str) -> None:
    client = aioredis.Redis.from_url(redis_url.rsplit("/", 1)[0] + "/7")
    await client.flushdb()
    await ensure_seeded(client, 3, default_guide_start())
    clock = {"now": NOW}
    catalog = Catalog(client, clock=lambda: clock["now"])
    channel_id = (await catalog.list_channels(page_size=1))["items"][0]["id"]
    pubsub = client.pubsub(ignore_subscribe_messages=True)
    await pubsub.subscribe(constants.push_channel(constants.iptv_now_channel(channel_id)))
    try:
        first, second = NowPlaying(client, catalog, 1.0), NowPlaying(client, catalog, 1.0)
        assert await first.check() == 3  # first run: every channel is announced
        assert await second.check() == 0  # another instance: nothing changed since
        message = await _next(pubsub)
        on_air = await catalog.now_playing(channel_id)
        assert on_air is not None
        assert message["channel_id"] == channel_id
        assert message["programme"]["id"] == on_air["id"]
        clock["now"] = on_air["end"] + timedelta(seconds=1)  # the next programme starts
        assert await second.check() >= 1
        following = await _next(pubsub)
        assert following["programme"]["start"] == on_air["end"].isoformat()
    finally:
        await pubsub.aclose()
        await client.flushdb()
        await client.aclose()


async def _next(pubsub) -> dict:
    async def get():
        return await pubsub.get_message(timeout=0.5)

    message = await wait_for_async(get, timeout=10)
    return json.loads(message["data"])
