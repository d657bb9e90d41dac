"""A worker's lease (common.lease): a handler blocking the event loop for longer than
the lease is not taken for a dead worker (its call runs once), while a stopped, killed
or hung worker (blocked past LOOP_STALL_LIMIT) still has its calls redelivered; after a
Redis outage that ended every lease, the first worker back does not take the calls of
the others before they renew (common.redelivery), a dead one's still are.
Real redis-server, real worker processes with short leases."""

from __future__ import annotations

import asyncio
import hashlib
import signal
import time
import uuid
from typing import Any

import pytest
import redis.asyncio as aioredis

from common import RpcClient, constants
from common.embedded_redis import EmbeddedRedis
from common.redelivery import _RECLAIM
from common.registry import Registry
from tests.helpers import ServiceProcess, wait_for, wait_for_async
from tests.support.leases import QUICK_LEASES_ENV

pytestmark = pytest.mark.timeout(90)


def _worker(name: str, redis_url: str, **env: str) -> ServiceProcess:
    # Leases of 0.6 s renewed (and reaped) every 0.2 s: a 2.5 s block is four leases.
    return ServiceProcess(
        ["python", "-m", "tests.support.stall_service"],
        env={"REDIS_URL": redis_url, "STALL_NAME": name, **QUICK_LEASES_ENV, **env},
        name=name,
    ).start()


def _instance(worker: ServiceProcess) -> str:
    """The instance id a worker process serves as (from its "serving" line)."""
    record = wait_for(lambda: worker.log_records("serving"), timeout=30)[0]
    return str(record["instance"])


def _logged(worker: ServiceProcess, message: str) -> dict[str, Any]:
    return wait_for(lambda: worker.log_records(message), timeout=10)[0]  # type: ignore[no-any-return]


async def _serving(rpc: RpcClient, name: str, worker: ServiceProcess) -> str:
    """Wait until `worker` consumes its calls; its instance id."""
    instance = _instance(worker)
    call = lambda: rpc.call(f"{name}.stats", timeout=2, instance=instance)  # noqa: E731
    await wait_for_async(call, timeout=30)
    return instance


async def _taken_by(rpc: RpcClient, name: str, worker: ServiceProcess, key: str,
                    **params: object) -> asyncio.Task[Any]:  # fmt: skip
    """Call `charge` with `worker` the only instance, so that it takes the call; return
    the call's task once the handler has started there."""
    await _serving(rpc, name, worker)
    call = asyncio.create_task(rpc.call(f"{name}.charge", key=key, timeout=30, **params))
    await wait_for_async(lambda: rpc.redis.llen(key))
    return call


async def test_handler_blocking_the_loop_past_the_lease_runs_once(
    redis_url: str, redis_client: aioredis.Redis
) -> None:
    """Before: the blocked worker's lease lapsed, the other worker reclaimed the call
    and ran it a second time (the side effect twice)."""
    name, key = f"stall_{uuid.uuid4().hex[:8]}", f"test:charged:{uuid.uuid4().hex}"
    workers = [_worker(name, redis_url), _worker(name, redis_url)]
    try:
        async with RpcClient(redis_url) as rpc:
            ids = [await _serving(rpc, name, w) for w in workers]
            ran_by = await rpc.call(f"{name}.charge", key=key, seconds=2.5, timeout=20)
            assert await redis_client.lrange(key, 0, -1) == [ran_by.encode()]  # ran once
            for instance in ids:
                stats = await rpc.call(f"{name}.stats", timeout=5, instance=instance)
                assert stats["redelivered"] == 0
            assert sorted(await Registry(redis_client).live_ids(name)) == sorted(ids)
        runner = workers[ids.index(ran_by)]
        blocked = _logged(runner, "event loop blocked")  # said once, while it lasted
        assert blocked["level"] == "warning"
        assert blocked["seconds"] >= 1
        assert blocked["methods"] == ["charge"]
        assert "stall_service.py" in blocked["where"]
        again = _logged(runner, "event loop running again")
        assert again["seconds"] >= blocked["seconds"]
        assert again["lease_given_up"] is False
        assert len(runner.log_records("event loop blocked")) == 1
    finally:
        for w in workers:
            w.stop()


@pytest.mark.parametrize("sig", [signal.SIGSTOP, signal.SIGKILL], ids=["sigstop", "sigkill"])
async def test_stopped_or_killed_worker_has_its_call_redelivered(
    redis_url: str, redis_client: aioredis.Redis, sig: signal.Signals
) -> None:
    """The lease's thread stops with its process: the call runs elsewhere."""
    name, key = f"stall_{uuid.uuid4().hex[:8]}", f"test:charged:{uuid.uuid4().hex}"
    first = _worker(name, redis_url)
    workers = [first]
    try:
        async with RpcClient(redis_url) as rpc:
            call = await _taken_by(rpc, name, first, key, seconds=60.0, block=False)
            gone = _instance(first)
            first.send_signal(sig)
            workers.append(_worker(name, redis_url))
            other = await _serving(rpc, name, workers[1])
            assert await call == other
            assert await redis_client.lrange(key, 0, -1) == [gone.encode(), other.encode()]
    finally:
        first.stop(signal.SIGKILL)
        for w in workers:
            w.stop()


async def test_loop_blocked_past_the_stall_limit_has_its_call_redelivered(
    redis_url: str, redis_client: aioredis.Redis
) -> None:
    """A loop blocked longer than LOOP_STALL_LIMIT is taken for hung: its lease is no
    longer renewed, and its call runs elsewhere."""
    name, key = f"stall_{uuid.uuid4().hex[:8]}", f"test:charged:{uuid.uuid4().hex}"
    hung = _worker(name, redis_url, LOOP_STALL_LIMIT="0.5")
    workers = [hung]
    try:
        async with RpcClient(redis_url) as rpc:
            call = await _taken_by(rpc, name, hung, key, seconds=30.0)
            workers.append(_worker(name, redis_url))
            other = await _serving(rpc, name, workers[1])
            assert await call == other
            assert await redis_client.lrange(key, 0, -1) == [_instance(hung).encode(),
                                                             other.encode()]  # fmt: skip
        message = "event loop blocked past LOOP_STALL_LIMIT: lease no longer renewed, "
        given_up = _logged(hung, message + "its calls go to other instances")
        assert given_up["level"] == "error"
        assert given_up["limit"] == 0.5
        assert given_up["methods"] == ["charge"]
    finally:
        hung.stop(signal.SIGKILL)
        for w in workers:
            w.stop()


# Leases of 1.2 s renewed (and reaped) every 0.2 s: the grace after an outage (one lease
# and one interval, 1.4 s) is seven reaps.
_OUTAGE_LEASES = {"HEARTBEAT_INTERVAL": "0.2", "HEARTBEAT_TTL": "1.2"}


@pytest.mark.parametrize("fate", ["resumed", "killed"])
async def test_the_first_worker_back_after_an_outage_leaves_the_others_calls(fate: str) -> None:
    """Redis is away (stopped: it answers nothing, closes nothing) for longer than the
    lease, so every lease lapses; the worker running a call is itself stopped until the
    other has run a reclaim once Redis is back, as a live worker whose heartbeat has not
    got through yet. Before: the other took the call and ran it a second time. Now it
    waits a grace: the runner, resumed, renews and its call runs once; killed instead,
    its call runs on the other after the grace."""
    server = EmbeddedRedis().start()
    assert server.process is not None
    name, key = f"stall_{uuid.uuid4().hex[:8]}", f"test:charged:{uuid.uuid4().hex}"
    workers = [_worker(name, server.url, **_OUTAGE_LEASES) for _ in range(2)]
    admin = aioredis.Redis.from_url(server.url)
    try:
        async with RpcClient(server.url) as rpc:
            ids = [await _serving(rpc, name, w) for w in workers]
            call = asyncio.create_task(
                rpc.call(f"{name}.charge", key=key, seconds=2.0, block=False, timeout=30)
            )
            runner = (await wait_for_async(lambda: admin.lrange(key, 0, -1)))[0].decode()
            other = ids[1 - ids.index(runner)]
            worker = workers[ids.index(runner)]
            worker.send_signal(signal.SIGSTOP)  # first: its lease must not lapse with Redis up
            leases = await admin.zrange(constants.leases_key(name), 0, -1, withscores=True)
            server.process.send_signal(signal.SIGSTOP)
            try:
                ended = max(score for _, score in leases) / 1000
                await wait_for_async(lambda: time.time() > ended + 0.1)
            finally:
                server.process.send_signal(signal.SIGCONT)
            await asyncio.wait_for(_reclaim_ran(admin, other), 10)
            if fate == "killed":
                worker.stop(signal.SIGKILL)
            worker.send_signal(signal.SIGCONT)
            answer = await call
            ran = [runner, other] if fate == "killed" else [runner]
            assert [r.decode() for r in await admin.lrange(key, 0, -1)] == ran
            assert answer == ran[-1]
    finally:
        for w in workers:
            w.send_signal(signal.SIGCONT)
            w.stop()
        await admin.aclose()
        server.stop()


async def _reclaim_ran(admin: aioredis.Redis, consumer: str) -> None:
    """Return once Redis has run a reclaim by `consumer` (the script, by its hash or
    its text), from now on."""
    sha = hashlib.sha1(_RECLAIM.encode()).hexdigest()
    async with admin.monitor() as monitor:
        while True:
            command = (await monitor.next_command())["command"]
            if consumer in command and (sha in command or "XCLAIM" in command):
                return
