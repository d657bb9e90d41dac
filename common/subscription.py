"""Following one Redis pub/sub channel for ever: the push half of every local view.

The registry view, the revocation view and the policy watcher each keep a
local copy of something in Redis, current from change events plus a periodic
resync. `follow` is the event half they share: subscribe, hand each message to
a callback, and when Redis goes away re-subscribe after a pause. Messages
published while unsubscribed are lost, which is why each caller also resyncs.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import redis.asyncio as aioredis

from common.aio import cancelling
from common.connection import REDIS_DOWN_ERRORS
from common.log import get_logger
from common.outage import Outage

log = get_logger("switchboard.subscription")


async def follow(
    redis: aioredis.Redis,
    channel: str,
    on_message: Callable[[bytes | str], Awaitable[None]],
    *,
    lost: tuple[str, str] | None = None,
    on_subscribed: Callable[[], None] | None = None,
    retry_delay: float = 0.5,
) -> None:
    """Call `on_message(data)` for each message of `channel` until cancelled.

    `lost`: the warning logged when the subscription drops and the info line when it
    is made again, once per outage (None: stay quiet, when the caller's resync
    already reports the outage); `on_subscribed` runs each time the subscription is
    (re)made.
    """
    outage = Outage(log, *lost, channel=channel) if lost is not None else None
    # Not an outage the caller's resync sees: logged even when `lost` is None.
    broken = Outage(log, "subscription failed", "subscription working again", channel=channel)
    while not cancelling():
        pubsub = redis.pubsub(ignore_subscribe_messages=True)
        try:
            await pubsub.subscribe(channel)
            if outage is not None:
                outage.recovered()
            if on_subscribed is not None:
                on_subscribed()
            while not cancelling():
                message = await pubsub.get_message(timeout=1.0)
                if message is not None:
                    await on_message(message["data"])
                broken.recovered()
        except REDIS_DOWN_ERRORS as exc:
            if outage is not None:
                outage.failed(exc)
            await asyncio.sleep(retry_delay)
        except Exception as exc:  # Redis refusing, or the callback failing: subscribe again
            broken.failed(exc)
            await asyncio.sleep(retry_delay)
        finally:
            await pubsub.aclose()  # type: ignore[no-untyped-call]
