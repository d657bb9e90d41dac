"""For tests of what the RPC client makes of Redis closing its connections
(`common.lost_touch`): Redis's uptime, a client's connections closed by Redis (and seen
closed), and a client whose INFO answer a test can hold back or replace.
"""

from __future__ import annotations

import asyncio
from typing import Any

import redis.asyncio as aioredis

from common import RpcClient
from common.connection import connect
from tests.helpers import wait_for_async


async def uptime_at_least(admin: aioredis.Redis, seconds: int) -> bool:
    """Redis has been up for `seconds` (its own count, in whole seconds)."""
    return int((await admin.info("server"))["uptime_in_seconds"]) >= seconds


def closed(client: RpcClient) -> bool:
    """Every connection of `client`'s own has seen Redis close it (or was never made).
    (Private state: RpcClient has no public handle on its connections.)"""
    conns = (client._enqueuer, client._receiver)
    return all(c._proto is None or c._proto.lost is not None for c in conns)


async def kill_connections(url: str, client: RpcClient) -> None:
    """Redis closes every connection of `client`'s (a client kill: Redis stays up);
    returns once the client has seen its own connections closed."""
    admin = aioredis.Redis.from_url(url)
    try:
        await admin.client_kill_filter(_type="normal", skipme=True)
    finally:
        await admin.aclose()
    await wait_for_async(lambda: closed(client))


class HeldInfo(aioredis.Redis):
    """A client of a real Redis (as `common.connection.connect` makes them) whose next
    INFO a test can hold back, or answer otherwise, once Redis has answered it.

    `hold()`: the next INFO waits for `release()` before it returns Redis's answer
    (`asked` is set meanwhile), so that the test lands an event (a restart, a close)
    between Redis answering and the caller reading the answer. `answer_next(value)`:
    the next INFO returns `value` instead, or raises it if it is an exception: what a
    proxy or a Redis-like server before Redis might answer.
    """

    @classmethod
    def connect(cls, url: str) -> HeldInfo:
        held = cls.from_pool(connect(url).connection_pool)  # aclose() closes the pool
        assert isinstance(held, HeldInfo)
        return held

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.asked = asyncio.Event()
        self._gate: asyncio.Event | None = None
        self._instead: Any = None

    def hold(self) -> None:
        self.asked.clear()
        self._gate = asyncio.Event()

    def release(self) -> None:
        gate, self._gate = self._gate, None
        if gate is not None:
            gate.set()

    def answer_next(self, value: Any) -> None:
        self._instead = value

    async def info(self, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        answer = await super().info(*args, **kwargs)
        gate = self._gate
        if gate is not None:
            self.asked.set()
            await gate.wait()
        instead, self._instead = self._instead, None
        if isinstance(instead, BaseException):
            raise instead
        return answer if instead is None else instead
