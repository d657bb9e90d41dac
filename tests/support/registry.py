"""Instances registered straight into the registry, for tests that need them to stay."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import redis.asyncio as aioredis

from common.registry import InstanceRecord, Registry
from tests.helpers import free_port

# Every registry view resyncs each second: after this, every view knows what was registered.
VIEWS_RESYNCED = 2.0


@asynccontextmanager
async def dead_instances(
    redis_url: str, service: str, count: int, *, kind: str = "http"
) -> AsyncIterator[list[str]]:
    """`count` instances of `service` where nothing listens (a 60 s lease, no heartbeat
    needed), known to every process's registry view when this yields; deregistered after."""
    client = aioredis.Redis.from_url(redis_url)
    registry = Registry(client, ttl=60)
    names = [f"{service}-dead{i}" for i in range(count)]
    try:
        for name in names:
            address = f"127.0.0.1:{free_port()}"
            await registry.heartbeat(InstanceRecord(service, name, kind=kind, address=address))
        await asyncio.sleep(VIEWS_RESYNCED)
        yield names
    finally:
        for name in names:
            await registry.deregister(service, name)
        await client.aclose()
