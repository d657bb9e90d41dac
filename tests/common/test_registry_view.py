"""The local registry view: current from events at once, and from leases without them."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from common import constants
from common.embedded_redis import EmbeddedRedis
from common.instance_record import InstanceRecord
from common.registry import Registry
from common.registry_view import RegistryView
from tests.helpers import wait_for_async

_SERVICE_KEYS = (constants.instances_key, constants.leases_key, constants.instance_record_key)


@pytest.fixture
async def view(redis_client: aioredis.Redis) -> AsyncIterator[RegistryView]:
    # A long resync interval: these tests see what events alone (and leases) do.
    v = RegistryView(redis_client, resync_interval=60)
    await v.start()
    yield v
    await v.close()


def _record(service: str, n: int) -> InstanceRecord:
    return InstanceRecord(service, f"{service}@127.0.0.1:{9000 + n}", kind="http",
                          address=f"127.0.0.1:{9000 + n}")  # fmt: skip


async def _ids(view: RegistryView, service: str) -> set[str]:
    return {r.instance_id for r in view.instances(service)}


async def test_up_and_down_events_update_the_view_quickly(
    view: RegistryView, redis_client: aioredis.Redis
) -> None:
    service = f"web_{uuid.uuid4().hex[:6]}"
    registry = Registry(redis_client, ttl=3.0)
    a, b = _record(service, 1), _record(service, 2)
    synced = view._last_sync
    await registry.heartbeat(a)
    await registry.heartbeat(b)
    await wait_for_async(lambda: _has(view, service, {a.instance_id, b.instance_id}), timeout=5)
    assert view._last_sync == synced  # events: no full resync (60 s away) ran meanwhile
    await registry.deregister(service, a.instance_id)
    await wait_for_async(lambda: _has(view, service, {b.instance_id}), timeout=5)


async def _has(view: RegistryView, service: str, ids: set[str]) -> bool:
    return await _ids(view, service) == ids


async def test_instance_that_stops_heartbeating_disappears_within_the_ttl(
    view: RegistryView, redis_client: aioredis.Redis
) -> None:
    service = f"web_{uuid.uuid4().hex[:6]}"
    registry = Registry(redis_client, ttl=1.0)
    record = _record(service, 1)
    await registry.heartbeat(record)
    await wait_for_async(lambda: _has(view, service, {record.instance_id}), timeout=5)
    synced = view._last_sync
    await wait_for_async(lambda: _has(view, service, set()), timeout=5)
    # Gone by lease expiry alone: no event was sent, no resync ran (60 s away), and the
    # view still holds it, left out for its lease's end, which Redis has seen pass too.
    assert view._last_sync == synced
    assert view._view[service][record.instance_id][0] == record
    assert await registry.live_ids(service) == []


async def test_resync_repairs_what_events_missed(redis_client: aioredis.Redis) -> None:
    service = f"web_{uuid.uuid4().hex[:6]}"
    record = _record(service, 1)
    # Written behind the view's back: no event at all.
    await redis_client.zadd(
        constants.instances_key(service), {record.instance_id: (time.time() + 30) * 1000}
    )
    await redis_client.hset(
        constants.instance_record_key(service), record.instance_id, record.to_json()
    )
    await redis_client.sadd(constants.SERVICES, service)
    v = RegistryView(redis_client, resync_interval=0.2)
    await v.start()
    try:
        assert [r.instance_id for r in v.instances(service)] == [record.instance_id]
        assert v.instances(service, kind="rpc") == []
    finally:
        await v.close()
    await asyncio.sleep(0)


async def test_a_redis_outage_keeps_the_instances_last_seen(tmp_path: Path) -> None:
    # No heartbeat can renew a lease while Redis is down: the view must not empty
    # itself on account of Redis alone (routing would stop with every instance up).
    server = EmbeddedRedis(appendonly=True, data_dir=tmp_path).start()
    port, service = server.port, f"web_{uuid.uuid4().hex[:6]}"
    client = aioredis.Redis.from_url(server.url)
    view = RegistryView(client, resync_interval=0.2)
    try:
        await view.start()
        record = _record(service, 1)
        await Registry(client, ttl=1.0).heartbeat(record)
        await wait_for_async(lambda: _has(view, service, {record.instance_id}), timeout=5)
        server.stop(keep_data=True)
        await asyncio.sleep(2.5)  # the lease (1 s) has long ended
        assert await _ids(view, service) == {record.instance_id}

        # Back in touch: the lease in Redis has ended, but the instance is kept for a
        # grace, time for its next heartbeat (routing answered 503 until then)...
        server = EmbeddedRedis(port=port, appendonly=True, data_dir=tmp_path).start()
        await wait_for_async(lambda: view._outage.since is None, timeout=10)
        assert await _ids(view, service) == {record.instance_id}
        # ...and nobody renews it: gone once the grace ends.
        await wait_for_async(lambda: _has(view, service, set()), timeout=10)
    finally:
        await view.close()
        await client.aclose()
        server.stop()


async def test_departed_instances_and_services_are_pruned(redis_client: aioredis.Redis) -> None:
    # Many services, each heartbeated once, then never again: their records, keys and
    # names must go, or every resync of every gateway reads them forever.
    tag = uuid.uuid4().hex[:6]
    names = {f"gone{tag}_{n}" for n in range(300)}
    registry = Registry(redis_client, ttl=0.2)
    for name in names:
        await registry.heartbeat(_record(name, 1))
    keys = [key(name) for name in names for key in _SERVICE_KEYS]
    assert await redis_client.exists(*keys) == 3 * len(names)
    view = RegistryView(redis_client, resync_interval=0.1, prune_after=0.3)
    await view.start()
    try:

        async def pruned() -> bool:
            members = {m.decode() for m in await redis_client.smembers(constants.SERVICES)}
            left = await redis_client.exists(*keys)
            return not names & members and left == 0 and not names & set(view.services())

        await wait_for_async(pruned, timeout=10)
        # A service that heartbeats again afterwards is routed to again.
        back = _record(min(names), 2)
        await Registry(redis_client, ttl=30).heartbeat(back)
        await wait_for_async(lambda: _has(view, back.service, {back.instance_id}), timeout=5)
        assert await redis_client.sismember(constants.SERVICES, back.service)
    finally:
        await view.close()


async def test_a_service_forgotten_while_an_instance_registers_is_kept(
    redis_client: aioredis.Redis,
) -> None:
    # The resync found the service empty, and an instance registered before the name was
    # removed from sb:services (its heartbeat added the name before the removal): the
    # second look puts it back, so the registration is not lost.
    service = f"back_{uuid.uuid4().hex[:6]}"
    registry = Registry(redis_client, ttl=30)
    await registry.heartbeat(_record(service, 1))
    await registry.forget_services([service, f"{service}_empty"])
    assert await redis_client.sismember(constants.SERVICES, service)


async def test_rpc_services_are_told_apart_without_a_round_trip(
    view: RegistryView, redis_client: aioredis.Redis
) -> None:
    """The catalog, read at each resync, and the kind of the live instances say which
    services RPC workers serve (the gateway's proxy routes answer those 404, not 503)."""
    registry = Registry(redis_client, ttl=3.0)
    cataloged, running, web = (f"{kind}_{uuid.uuid4().hex[:6]}" for kind in ("cat", "rpc", "web"))
    await registry.publish_catalog(cataloged, {"hello": {}})
    await registry.heartbeat(InstanceRecord(running, f"{running}-1", kind="rpc"))
    await registry.heartbeat(_record(web, 1))
    await view.refresh()
    assert view.is_rpc_service(cataloged) and not view.instances(cataloged)
    assert view.is_rpc_service(running)
    assert not view.is_rpc_service(web) and not view.is_rpc_service("nobody")
    await redis_client.hdel(constants.CATALOG, cataloged)
    await registry.deregister(running, f"{running}-1")
    await registry.deregister(web, f"{web}@127.0.0.1:9001", kind="http")
