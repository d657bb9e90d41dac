"""Instances registered straight into the registry, for tests that need them to stay."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import redis.asyncio as aioredis

from common.instance_record import InstanceRecord
from common.registry import Registry
from common.registry_view import RegistryView
from tests.helpers import free_port

# Every registry view resyncs each second: after this, every view knows what was registered.
VIEWS_RESYNCED = 2.0


async def register(
    redis_url: str, service: str, addresses: dict[str, str], *, kind: str = "http"
) -> None:
    """Instances of `service` (instance id -> address) with a 60 s lease: one heartbeat
    each, as the instance's own would be. Registry views learn of them from the events."""
    client = aioredis.Redis.from_url(redis_url)
    registry = Registry(client, ttl=60)
    try:
        for name, address in addresses.items():
            await registry.heartbeat(InstanceRecord(service, name, kind=kind, address=address))
    finally:
        await client.aclose()


async def deregister(redis_url: str, service: str, *names: str) -> None:
    """Instances of `service` (by instance id) gone from the registry at once, as their
    own leaving would do. Registry views learn of it from the events."""
    client = aioredis.Redis.from_url(redis_url)
    registry = Registry(client, ttl=60)
    try:
        for name in names:
            await registry.deregister(service, name)
    finally:
        await client.aclose()


@asynccontextmanager
async def registered(
    redis_url: str, service: str, addresses: dict[str, str], *, kind: str = "http"
) -> AsyncIterator[None]:
    """`register`ed instances, no heartbeat needed; deregistered after."""
    await register(redis_url, service, addresses, kind=kind)
    try:
        yield
    finally:
        await deregister(redis_url, service, *addresses)


@asynccontextmanager
async def dead_instances(
    redis_url: str, service: str, count: int, *, kind: str = "http"
) -> AsyncIterator[list[str]]:
    """`count` instances of `service` where nothing listens (`registered`), known to
    every process's registry view when this yields."""
    names = [f"{service}-dead{i}" for i in range(count)]
    addresses = {name: f"127.0.0.1:{free_port()}" for name in names}
    async with registered(redis_url, service, addresses, kind=kind):
        await asyncio.sleep(VIEWS_RESYNCED)
        yield names


@pytest.fixture(name="view")
async def quick_view_fixture(redis_client: aioredis.Redis) -> AsyncIterator[RegistryView]:
    """A registry view that resyncs and prunes soon: leases that ended and services
    that left show quickly."""
    v = RegistryView(redis_client, resync_interval=0.1, prune_after=0.3)
    await v.start()
    yield v
    await v.close()
