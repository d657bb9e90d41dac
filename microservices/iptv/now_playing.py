"""Announcing "now playing" changes on a push channel per iptv channel.

Every `IPTV_NOW_INTERVAL` seconds the worker reads what is on air on every
channel and, for each channel whose programme changed, publishes
`{"channel_id": 7, "programme": {...} | null}` on the push channel
`iptv:now:<channel id>` (Redis channel `sb:push:iptv:now:<id>`), which browsers
receive through the websocket service's subscriptions. The last announced
programme per channel is kept in Redis and compared and replaced by one script,
so with several iptv instances each change is announced once.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import redis.asyncio as aioredis

from common import constants
from common.aio import cancelling
from common.codec import json_default
from common.log import get_logger
from common.outage import Outage
from microservices.iptv.catalog import Catalog, Keys

log = get_logger("iptv.now_playing")

# KEYS: the channel's "last announced" key. ARGV: programme id ("" for none),
# the Redis channel, the message. 1 if it was announced, 0 if it had been already.
_ANNOUNCE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[1])
redis.call('PUBLISH', ARGV[2], ARGV[3])
return 1
"""


class NowPlaying:
    """Publishes the changes of what is on air."""

    def __init__(self, redis: aioredis.Redis, catalog: Catalog, interval: float) -> None:
        self.redis = redis
        self.catalog = catalog
        self.interval = interval
        self._announce = redis.register_script(_ANNOUNCE)

    async def check(self) -> int:
        """Announce every channel whose programme changed since the last announcement; how many."""
        playing = await self.catalog.now_playing_all()
        async with self.redis.pipeline(transaction=False) as pipe:
            for channel_id, programme in playing.items():
                message = json.dumps(
                    {"channel_id": channel_id, "programme": programme}, default=json_default
                )
                channel = constants.push_channel(constants.iptv_now_channel(channel_id))
                marker = programme["id"] if programme else ""
                await self._announce(
                    keys=[Keys.now(channel_id)], args=[marker, channel, message], client=pipe
                )
            results: list[Any] = await pipe.execute()
        return sum(int(r) for r in results)

    async def run(self) -> None:
        """Check every `interval` until cancelled; a failure (Redis down or refusing
        writes, or anything else) is logged once per outage and the next check goes on."""
        outage = Outage(log, "now playing check failed", "now playing checks again")
        while not cancelling():
            try:
                announced = await self.check()
                outage.recovered()
                if announced:
                    log.info("now playing changed", extra={"fields": {"channels": announced}})
            except Exception as exc:
                outage.failed(exc)
            await asyncio.sleep(self.interval)
