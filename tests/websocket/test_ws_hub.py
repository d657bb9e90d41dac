"""The push hub (`websocket.hub.ChannelHub`) on a real Redis: one subscriber never stops
delivery to the others, and what it sends is JSON."""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from common import constants
from websocket.hub import ChannelHub

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
async def hub(redis_url: str) -> AsyncIterator[ChannelHub]:
    redis = aioredis.Redis.from_url(redis_url)
    hub = ChannelHub(redis)
    try:
        yield hub
    finally:
        await hub.close()
        await redis.aclose()


async def test_a_subscriber_that_raises_is_dropped_and_the_others_still_receive(
    hub: ChannelHub, redis_client: aioredis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    channel = f"hub:{uuid.uuid4().hex[:8]}"
    received: asyncio.Queue[str] = asyncio.Queue()
    calls: list[str] = []

    def broken(frame: str) -> None:  # what a write to a closed uvloop transport raised
        calls.append(frame)
        raise RuntimeError("unable to perform operation on <TCPTransport closed=True>")

    await hub.subscribe(channel, broken)
    await hub.subscribe(channel, received.put_nowait)
    with caplog.at_level(logging.ERROR, logger="websocket.hub"):
        for n in range(3):
            await redis_client.publish(constants.push_channel(channel), str(n))
            assert json.loads(await asyncio.wait_for(received.get(), 5))["data"] == n
    assert len(calls) == 1  # dropped at its first failure
    failures = [r for r in caplog.records if r.getMessage() == "push delivery failed"]
    assert len(failures) == 1 and failures[0].exc_info is not None
    late: asyncio.Queue[str] = asyncio.Queue()  # a subscriber added afterwards receives too
    await hub.subscribe(channel, late.put_nowait)
    await redis_client.publish(constants.push_channel(channel), "4")
    assert json.loads(await asyncio.wait_for(late.get(), 5))["data"] == 4


async def test_a_payload_json_cannot_carry_is_delivered_as_a_string(
    hub: ChannelHub, redis_client: aioredis.Redis
) -> None:
    channel = f"hub:{uuid.uuid4().hex[:8]}"
    received: asyncio.Queue[str] = asyncio.Queue()
    await hub.subscribe(channel, received.put_nowait)
    for payload in ("1e400", "NaN", '{"x": -1e400}'):
        await redis_client.publish(constants.push_channel(channel), payload)
        frame = await asyncio.wait_for(received.get(), 5)
        message = json.loads(frame, parse_constant=_not_json)  # never Infinity or NaN
        assert message == {"type": "message", "channel": channel, "data": payload}


def _not_json(constant: str) -> None:
    raise AssertionError(f"{constant} is not JSON")
