"""The websocket service's `Upstreams` forgets instances that left: their ejections
and balancing state go with them (it runs no active health checks that would)."""

from __future__ import annotations

import uuid

import pytest
import redis.asyncio as aioredis

from common.instance_record import InstanceRecord
from common.policy import PolicyWatcher
from common.registry import Registry
from common.registry_view import RegistryView
from tests.helpers import free_port, wait_for_async
from tests.support.policy import update_service
from tests.support.registry import quick_view_fixture  # noqa: F401 (a fixture)
from websocket.upstreams import NoUpstream, Upstreams

pytestmark = pytest.mark.timeout(30)


def _record(service: str, name: str) -> InstanceRecord:
    return InstanceRecord(service, name, kind="ws", address=f"127.0.0.1:{free_port()}")


async def _until_live(view: RegistryView, service: str, names: set[str]) -> None:
    await wait_for_async(
        lambda: {r.instance_id for r in view.instances(service)} == names, timeout=5
    )


async def test_instances_that_left_leave_no_ejection_or_balancing_state_behind(
    redis_client: aioredis.Redis, redis_url: str, view: RegistryView
) -> None:
    service = f"wsgone{uuid.uuid4().hex[:6]}"
    await update_service(redis_url, service, strategy="least_time")
    watcher = PolicyWatcher(redis_client)
    await watcher.start()
    upstreams = Upstreams(view, watcher, connect_timeout=1.0, max_size=2**16, max_attempts=8)
    registry = Registry(redis_client, ttl=60)
    for wave in range(5):
        # Instances where nothing listens: each connect fails, and ejects its instance.
        records = [_record(service, f"w{wave}-{i}") for i in range(4)]
        for record in records:
            await registry.heartbeat(record)
        await _until_live(view, service, {r.instance_id for r in records})
        with pytest.raises(NoUpstream):
            await upstreams.connect(service, "/ws")
        assert upstreams.book.tracked() == len(records)
        assert upstreams.policy.strategy(service).tracked() == len(records)
        for record in records:
            await registry.deregister(service, record.instance_id)
        await wait_for_async(lambda: upstreams.book.tracked() == 0, timeout=5)
        assert upstreams.policy.strategy(service).tracked() == 0
    await watcher.close()
