"""Issue 3, point 5: Redis stopped and restarted (AOF on) under load.

Every process reconnects by itself, calls during the outage fail promptly with a
clear error, and work accepted before the outage completes after it. An outage that
outlasts the workers' leases ends without a window of "no live instance" for
workers that never stopped, whether Redis comes back with its data or without it
(`common.rejoin`, and the worker's heartbeat retrying at once); a dead one is still
reported.
"""

from __future__ import annotations

import asyncio
import math
import signal
import time
import uuid
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from common import RpcClient, Service, constants
from common.embedded_redis import EmbeddedRedis
from common.errors import MethodNotFound, RpcTimeout, ServiceUnavailable
from common.settings import Settings
from tests.helpers import serve_until_live, wait_for_async
from tests.support.calc_service import start_worker
from tests.support.leases import ONE_SECOND_LEASES, THREE_SECOND_LEASES
from tests.support.redis_closes import kill_connections, uptime_at_least

pytestmark = pytest.mark.timeout(180)


async def test_redis_restart_under_load(tmp_path: Path) -> None:
    server = EmbeddedRedis(appendonly=True, data_dir=tmp_path).start()
    port, url, name = server.port, server.url, f"calc_{uuid.uuid4().hex[:8]}"
    worker = start_worker(url, name)
    try:
        async with RpcClient(url) as client:
            await wait_for_async(lambda: client.call(f"{name}.add", 1, timeout=2), 30)
            # Work accepted before the outage: 40 calls, each running ~1.5 s.
            accepted = [
                asyncio.create_task(client.call(f"{name}.work", i, ms=1500, timeout=60))
                for i in range(40)
            ]
            await wait_for_async(lambda: _taken(client, name, 40))
            server.stop(keep_data=True)  # SIGTERM: Redis fsyncs its AOF and exits

            # During the outage: a clear, prompt error, not a hang until the timeout.
            loop = asyncio.get_running_loop()
            started = loop.time()
            with pytest.raises((ServiceUnavailable, RpcTimeout)) as info:
                await client.call(f"{name}.add", 1, timeout=30)
            assert isinstance(info.value, ServiceUnavailable), info.value
            assert loop.time() - started < 10

            server = EmbeddedRedis(port=port, appendonly=True, data_dir=tmp_path).start()
            assert await asyncio.gather(*accepted) == list(range(40))
            # The same worker and client serve new calls: nobody was restarted.
            assert await wait_for_async(lambda: client.call(f"{name}.add", 41, timeout=2), 30) == 42
            assert worker.alive()
    finally:
        worker.stop()
        server.stop()


async def _taken(client: RpcClient, name: str, n: int) -> bool:
    """All n calls are in the stream (queued or in flight), i.e. accepted by Redis."""
    return int(await client.redis.xlen(constants.call_stream(name))) >= n


async def test_redis_restarted_empty_under_a_worker_and_a_client() -> None:
    # No AOF: the restart loses the streams, the consumer groups, the registry.
    server = EmbeddedRedis().start()
    port, url, name = server.port, server.url, f"calc_{uuid.uuid4().hex[:8]}"
    worker = start_worker(url, name)
    try:
        async with RpcClient(url) as client:
            await wait_for_async(lambda: client.call(f"{name}.add", 1, timeout=2), 30)
            server.stop()
            server = EmbeddedRedis(port=port).start()
            # The worker registers again and makes its group again; nobody is restarted.
            assert await wait_for_async(lambda: client.call(f"{name}.add", 41, timeout=2), 30) == 42
            assert worker.alive()
    finally:
        worker.stop()
        server.stop()


# Leases short enough for a quick outage to outlast them; the client's grace after an
# outage is the same TTL.
SHORT_LEASES = Settings(heartbeat_interval=1.0, heartbeat_ttl=2.0)


def _adder() -> Service:
    svc = Service(f"calc_{uuid.uuid4().hex[:8]}", settings=SHORT_LEASES)

    @svc.method
    async def add(a: int, b: int) -> int:
        return a + b

    return svc


async def _lease_end(url: str, service: str) -> float:
    """The end (epoch s, Redis's clock: this host's) of the latest lease of `service`."""
    probe = aioredis.Redis.from_url(url)
    try:
        found = await probe.zrange(constants.instances_key(service), -1, -1, withscores=True)
    finally:
        await probe.aclose()
    return float(found[0][1]) / 1000


async def _outage_past(lease_end: float) -> None:
    """Wait, Redis being down, until the lease ending at `lease_end` has lapsed."""
    await wait_for_async(lambda: time.time() > lease_end + 0.1, timeout=10)


@pytest.mark.parametrize("keep_data", [True, False], ids=["same_data", "data_lost"])
async def test_a_call_right_after_an_outage_reaches_the_live_worker(
    tmp_path: Path, keep_data: bool
) -> None:
    # The worker's lease lapsed while Redis was down, though it never stopped: the
    # first call once Redis is back (by a client that was idle all along) is served,
    # not refused for "no live instance" until the worker's next heartbeat.
    server = EmbeddedRedis(appendonly=keep_data, data_dir=tmp_path).start()
    svc = _adder()
    task = await serve_until_live(svc, server.url)
    try:
        async with RpcClient(server.url, settings=SHORT_LEASES) as client:
            assert await client.call(f"{svc.name}.add", 1, 2, timeout=5) == 3
            lease_end = await _lease_end(server.url, svc.name)
            server.stop(keep_data=keep_data)
            await _outage_past(lease_end)
            server = EmbeddedRedis(server.port, appendonly=keep_data, data_dir=tmp_path).start()
            # A call and a task, the moment Redis answers.
            sent = client.send(f"{svc.name}.add", 2, 3)
            assert await asyncio.gather(sent, client.call(f"{svc.name}.add", 2, 3)) == [True, 5]
            if not keep_data:
                # Registered again, with what Redis lost of the service: its catalog
                # (a caller that never reached it is told 503, not 404, if it dies)
                # and its backlog bound.
                probe = aioredis.Redis.from_url(server.url)
                try:
                    await wait_for_async(lambda: probe.hexists(constants.CATALOG, svc.name))
                    limits = constants.limits_key(svc.name)
                    assert await probe.hget(limits, "max_backlog") == str(svc.max_backlog).encode()
                finally:
                    await probe.aclose()
    finally:
        svc.request_stop()
        await asyncio.wait_for(task, 20)
        server.stop()


async def test_a_dead_worker_is_still_reported_after_an_outage(tmp_path: Path) -> None:
    # Killed (no deregistration): its lease lapses, and no heartbeat renews it once Redis
    # is back. The call held for the grace after the outage fails as "no live
    # instance", before its own timeout (shorter than the grace): a 503, not a 504.
    server = EmbeddedRedis(appendonly=True, data_dir=tmp_path).start()
    name = f"calc_{uuid.uuid4().hex[:8]}"
    worker = start_worker(server.url, name, HEARTBEAT_TTL=str(SHORT_LEASES.heartbeat_ttl))
    try:
        async with RpcClient(server.url, settings=SHORT_LEASES) as client:
            await wait_for_async(lambda: client.call(f"{name}.add", 1, timeout=2), 30)
            worker.stop(signal.SIGKILL)
            lease_end = await _lease_end(server.url, name)
            server.stop(keep_data=True)
            await _outage_past(lease_end)
            server = EmbeddedRedis(server.port, appendonly=True, data_dir=tmp_path).start()
            with pytest.raises(ServiceUnavailable, match="no live instance"):
                await client.call(f"{name}.add", 1, timeout=1)
    finally:
        worker.stop()
        server.stop()


async def test_a_connection_closed_by_a_redis_up_all_along_holds_no_call() -> None:
    # Redis closing the client's connections while it stays up (a client kill here; an
    # idle timeout or a proxy's alike) is no outage: every live worker has renewed its
    # lease. A call to a service with no live instance right after it is failed at
    # once, never parked for a lease.
    server = EmbeddedRedis().start()
    admin = aioredis.Redis.from_url(server.url)
    name = f"calc_{uuid.uuid4().hex[:8]}"
    try:
        await admin.hset(constants.CATALOG, name, "{}")  # known, and no worker
        await wait_for_async(lambda: uptime_at_least(admin, 1))
        # A lease, and so a grace, of 1 s: a Redis up for a second is up for longer.
        async with RpcClient(server.url, settings=ONE_SECOND_LEASES) as client:
            with pytest.raises(ServiceUnavailable, match="no live instance"):
                await client.call(f"{name}.add", 1, timeout=10)
            await kill_connections(server.url, client)  # and the client saw the close
            with pytest.raises(ServiceUnavailable, match="no live instance"):
                await client.call(f"{name}.add", 1, timeout=10)
            assert client.parked_total == 0
            assert client._receiver.found_closed_at > -math.inf  # it did find it closed
    finally:
        await admin.aclose()
        server.stop()


async def test_the_calls_a_grace_held_share_one_catalog_lookup() -> None:
    # Parked together after a restart, failed together as the grace ends: one look in
    # the catalog (503 or 404?) for them all, not one each. (Parked only if the client
    # asks Redis its uptime within one lease of the restart: hence a lease of 3 s, which
    # that uptime, in whole seconds, stays under on a slow machine.)
    server = EmbeddedRedis().start()
    name = f"calc_{uuid.uuid4().hex[:8]}"
    async with RpcClient(server.url, settings=THREE_SECOND_LEASES) as client:
        admin = None
        try:
            with pytest.raises(MethodNotFound):
                await client.call(f"{name}.add", 1, timeout=10)
            server.stop()
            server = EmbeddedRedis(server.port).start()
            admin = aioredis.Redis.from_url(server.url)
            await admin.hset(constants.CATALOG, name, "{}")
            await admin.config_resetstat()
            calls = [client.call(f"{name}.add", i, timeout=10) for i in range(5)]
            failed = await asyncio.gather(*calls, return_exceptions=True)
            assert all(isinstance(e, ServiceUnavailable) for e in failed), failed
            assert client.parked_total == 5
            stats = await admin.info("commandstats")
            assert stats["cmdstat_hexists"]["calls"] == 1
        finally:
            if admin is not None:
                await admin.aclose()
            server.stop()
