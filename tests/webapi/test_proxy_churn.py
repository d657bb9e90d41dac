"""Instances that came, took requests and left leave nothing behind in the gateway.

The gateway's own objects (`Proxy` with its `RegistryView`, live policy and health
book, on the test Redis) route requests to instances registered and retired as their
heartbeats register and retire them: some leave gracefully (an event), the others stop
heartbeating (their lease ends), some after failing requests (an ejection). Then the
balancing state of every strategy and the health book hold only live instances, and a
service that left altogether has neither a strategy nor a retry budget any more.
"""

from __future__ import annotations

import uuid

import pytest
import redis.asyncio as aioredis

from common.balancing import STRATEGIES, Endpoint
from common.instance_record import InstanceRecord
from common.policy import PolicyWatcher
from common.registry import Registry
from common.registry_view import RegistryView
from tests.helpers import wait_for_async
from tests.support.policy import update_service
from tests.support.registry import quick_view_fixture  # noqa: F401 (a fixture)
from webapi.errors import ApiError
from webapi.proxy import UpstreamConnectError, UpstreamPool
from webapi.proxy.forward import Proxy

pytestmark = pytest.mark.timeout(30)

WAVES = 6  # of instances that come, take requests and go
PER_WAVE = 8  # per service and wave
STAYING = 2  # per service, for the whole test
LEASE = 1.0  # seconds: the lease of the instances that stop heartbeating


def _record(service: str, name: str, port: int) -> InstanceRecord:
    # (Nothing listens there: these tests report each try's outcome themselves.)
    return InstanceRecord(service, name, kind="http", address=f"127.0.0.1:{port}")


def _live_ids(view: RegistryView, service: str) -> set[str]:
    return {r.instance_id for r in view.instances(service)}


async def _until_live(view: RegistryView, names: dict[str, set[str]]) -> None:
    """Until `view` has every instance of `names` (service -> instance ids) live."""
    await wait_for_async(
        lambda: all(ids <= _live_ids(view, s) for s, ids in names.items()), timeout=5
    )


async def _route(proxy: Proxy, service: str, requests: int, *, failing: set[str]) -> None:
    """`requests` requests to `service` as the proxy routes them (each with its own sticky
    key, for `hash`), without the exchange: a try at an instance in `failing` fails to
    connect (it is ejected, and retried elsewhere), any other is answered 200."""
    for n in range(requests):
        attempts = proxy.attempts(service, "GET", key=f"user-{n}", replayable=True)
        try:
            endpoint = attempts.next()
            while endpoint.instance_id in failing:
                attempts.failed(UpstreamConnectError("refused"))
                endpoint = attempts.next()
        except ApiError:
            continue  # no instance left for this one: answered 502/503
        attempts.answered(200)


async def test_state_of_departed_instances_and_services_is_dropped(
    redis_client: aioredis.Redis, redis_url: str, view: RegistryView
) -> None:
    tag = uuid.uuid4().hex[:6]
    services = {name: f"churn{tag}-{name.replace('_', '-')}" for name in STRATEGIES}
    gone = f"churn{tag}-gone"  # every instance of it leaves: the service too
    for name, service in services.items():
        await update_service(redis_url, service, strategy=name)
    await update_service(redis_url, gone, strategy="hash")
    watcher = PolicyWatcher(redis_client)
    await watcher.start()  # (loads the policy just written; no changes follow)
    proxy = Proxy(view, UpstreamPool(), watcher)
    staying, short = Registry(redis_client, ttl=60), Registry(redis_client, ttl=LEASE)
    port = iter(range(20000, 30000))
    for service in services.values():
        for i in range(STAYING):
            await staying.heartbeat(_record(service, f"stays-{i}", next(port)))

    for wave in range(WAVES):
        batch = {s: [_record(s, f"w{wave}-{i}", next(port)) for i in range(PER_WAVE)]
                 for s in [*services.values(), gone]}  # fmt: skip
        for records in batch.values():
            for i, record in enumerate(records):
                await (staying if i % 2 else short).heartbeat(record)
        await _until_live(view, {s: {r.instance_id for r in rs} for s, rs in batch.items()})
        for service, records in batch.items():
            dying = {r.instance_id for r in records[::4]}  # down before they leave
            await _route(proxy, service, 4 * PER_WAVE, failing=dying)
        for records in batch.values():
            for record in records[1::2]:  # the others' leases end
                await staying.deregister(record.service, record.instance_id)

    live = {s: {f"stays-{i}" for i in range(STAYING)} for s in services.values()}
    await wait_for_async(
        lambda: (
            all(_live_ids(view, s) == ids for s, ids in live.items())
            and gone not in view.services()
        ),
        timeout=10,
    )
    # The view's listeners learn of an ended lease at its next resync.
    await wait_for_async(lambda: _bounded(proxy, services), timeout=5)
    for service in services.values():  # the sets of live instances only, from now on
        await _route(proxy, service, 4, failing=set())
    assert _bounded(proxy, services)
    for name in ("round_robin", "weighted", "hash", "random"):
        assert proxy.policy.strategy(services[name]).tracked() > 0  # (the live set's)
    assert set(proxy.policy.retry_budgets()) == set(services.values())
    await watcher.close()


def _bounded(proxy: Proxy, services: dict[str, str]) -> bool:
    """Whether the health book keeps nothing (no live instance failed) and each strategy
    keeps no more than its live instances call for."""
    for name, service in services.items():
        kept = proxy.policy.strategy(service).tracked()
        if name == "least_conn":
            limit = 0  # (nothing in flight)
        elif name == "least_time":
            limit = STAYING
        else:  # candidate sets: of the live instances alone, 3 at most
            limit = 2**STAYING - 1
        if kept > limit:
            return False
    return proxy.book.tracked() == 0


async def test_an_endpoint_stays_the_same_object_while_its_record_is_unchanged(
    redis_client: aioredis.Redis, view: RegistryView
) -> None:
    # Each resync notices every service; the strategies find an unchanged candidate set
    # by identity, so an endpoint made anew for an unchanged record would cost every
    # later pick a field-by-field comparison (`common.balancing.Pools`).
    service = f"churn{uuid.uuid4().hex[:6]}-same"
    registry = Registry(redis_client, ttl=60)
    for i in range(3):
        await registry.heartbeat(_record(service, f"i{i}", 20000 + i))
    watcher = PolicyWatcher(redis_client)
    await watcher.start()
    proxy = Proxy(view, UpstreamPool(), watcher)
    await _until_live(view, {service: {"i0", "i1", "i2"}})

    def endpoints() -> dict[str, Endpoint]:
        return {
            ep.instance_id: ep for ep in proxy.policy.endpoints(service, view.instances(service))
        }

    before = endpoints()
    await view.refresh()  # a resync: the service is noticed, its records unchanged
    assert all(ep is before[i] for i, ep in endpoints().items())

    await registry.heartbeat(
        InstanceRecord(service, "i1", kind="http", address="127.0.0.1:20001", weight=5)
    )
    await registry.deregister(service, "i2")
    await wait_for_async(lambda: {r.instance_id: r.weight for r in view.instances(service)}
                         == {"i0": 1, "i1": 5}, timeout=5)  # fmt: skip
    after = endpoints()
    assert after["i0"] is before["i0"]
    assert after["i1"].weight == 5 and after["i1"] is not before["i1"]
    assert set(after) == {"i0", "i1"}
    await watcher.close()
