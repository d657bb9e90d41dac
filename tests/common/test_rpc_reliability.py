"""Issue 3: nothing is lost. Redelivery after SIGKILL, deduplication, overload,
directed calls, hand-back on shutdown. Real redis-server, real worker processes."""

from __future__ import annotations

import asyncio
import dataclasses
import signal
import uuid

import pytest
import redis.asyncio as aioredis

from common import RpcClient, Service, constants
from common.errors import Overloaded, RpcTimeout, ServiceUnavailable
from common.protocol import Call, ok_reply
from common.settings import get_settings
from tests.helpers import serve_in_task, wait_for_async
from tests.support.calc_service import build, start_worker
from tests.support.leases import QUICK_LEASES

pytestmark = pytest.mark.timeout(180)


def _name() -> str:
    return f"calc_{uuid.uuid4().hex[:8]}"


def _reaping(name: str, **settings: float) -> Service:
    """`build(name)` with short leases: a new service's first reclaims wait one lease
    and one interval (`common.redelivery`), 0.8 s rather than 4."""
    svc = build(name)
    svc.settings = dataclasses.replace(get_settings(), **QUICK_LEASES, **settings)
    return svc


async def _stop(svc: Service, task: asyncio.Task[None]) -> None:
    svc.request_stop()
    await asyncio.wait_for(task, 30)


async def test_sigkill_loses_no_call(redis_url: str) -> None:
    """2 workers, 3,000 calls at concurrency 32; one SIGKILLed halfway and replaced."""
    name = _name()
    workers = [start_worker(redis_url, name), start_worker(redis_url, name)]
    total, concurrency = 3000, 32
    answers: dict[int, list[object]] = {i: [] for i in range(total)}
    errors: list[BaseException] = []
    done = 0
    try:
        async with RpcClient(redis_url) as client:
            for _ in range(2):  # both instances up
                await wait_for_async(lambda: client.call(f"{name}.add", 1, timeout=2), 30)
            await wait_for_async(lambda: _live_count(client.redis, name, 2), timeout=30)
            queue: asyncio.Queue[int] = asyncio.Queue()
            for i in range(total):
                queue.put_nowait(i)
            halfway = asyncio.Event()

            async def caller() -> None:
                nonlocal done
                while not queue.empty():
                    i = queue.get_nowait()
                    try:
                        answers[i].append(await client.call(f"{name}.work", i, timeout=60))
                    except Exception as exc:
                        errors.append(exc)
                    done += 1
                    if done == total // 2:
                        halfway.set()

            callers = [asyncio.create_task(caller()) for _ in range(concurrency)]
            await halfway.wait()
            workers[0].stop(signal.SIGKILL)
            workers.append(start_worker(redis_url, name))  # the replacement
            await asyncio.gather(*callers)
            assert errors == []
            assert all(answers[i] == [i] for i in range(total))  # exactly one correct reply each
            stats = [await client.call(f"{name}.stats", timeout=5, instance=i) for i in
                     await _live_ids(client.redis, name)]  # fmt: skip
            assert sum(s["redelivered"] for s in stats) >= 1  # the killed worker's calls
    finally:
        for w in workers:
            w.stop()


async def _live_ids(redis: aioredis.Redis, service: str) -> list[str]:
    from common.registry import Registry

    return await Registry(redis).live_ids(service)


async def _live_count(redis: aioredis.Redis, service: str, n: int) -> bool:
    return len(await _live_ids(redis, service)) >= n


async def _ghost_takes(redis: aioredis.Redis, service: str, call: Call) -> bytes:
    """A worker that took the call and died: it read the entry and holds no lease."""
    stream = constants.call_stream(service)
    entry_id: bytes = await redis.xadd(stream, {"c": call.encode()})
    await redis.xreadgroup(constants.WORKER_GROUP, "ghost", {stream: ">"}, count=10)
    return entry_id


def _call(method: str, reply_to: str, **kwargs: object) -> Call:
    import time

    return Call(uuid.uuid4().hex, method, [], dict(kwargs), time.time() + 60, reply_to, None)


async def test_dead_workers_call_is_redelivered_and_run_once(
    redis_url: str, redis_client: aioredis.Redis
) -> None:
    svc = _reaping(_name())
    await redis_client.xgroup_create(
        constants.call_stream(svc.name), constants.WORKER_GROUP, id="0", mkstream=True
    )
    inbox, key = constants.inbox_key(f"test-{uuid.uuid4().hex}"), f"test:rec:{uuid.uuid4().hex}"
    await _ghost_takes(redis_client, svc.name, _call("record", inbox, key=key, value="v"))
    task = await serve_in_task(svc, redis_url)
    try:
        assert await wait_for_async(lambda: redis_client.lrange(key, 0, -1)) == [b"v"]
        assert await wait_for_async(lambda: redis_client.llen(inbox)) == 1
        assert svc.worker is not None and svc.worker.stats.redelivered == 1
        pending = await redis_client.xpending(
            constants.call_stream(svc.name), constants.WORKER_GROUP
        )
        assert pending["pending"] == 0
    finally:
        await _stop(svc, task)


async def test_redelivered_completed_call_returns_stored_reply(
    redis_url: str, redis_client: aioredis.Redis
) -> None:
    """The first run wrote its reply into the dedup window, then died before acking."""
    svc = _reaping(_name())
    await redis_client.xgroup_create(
        constants.call_stream(svc.name), constants.WORKER_GROUP, id="0", mkstream=True
    )
    inbox, key = constants.inbox_key(f"test-{uuid.uuid4().hex}"), f"test:rec:{uuid.uuid4().hex}"
    call = _call("record", inbox, key=key, value="v")
    await _ghost_takes(redis_client, svc.name, call)
    stored = ok_reply(call.call_id, "the first run's result")
    window = get_settings().rpc_dedup_window / 2
    import time

    await redis_client.hset(
        constants.done_key(svc.name, int(time.time() // window)), call.call_id, stored
    )
    task = await serve_in_task(svc, redis_url)
    try:
        assert await wait_for_async(lambda: redis_client.lrange(inbox, 0, -1)) == [stored]
        assert svc.worker is not None and svc.worker.stats.deduplicated == 1
        assert await redis_client.lrange(key, 0, -1) == []  # the handler did not run again
    finally:
        await _stop(svc, task)


async def test_overloaded_at_enqueue(redis_url: str, rpc: RpcClient) -> None:
    svc = Service(_name(), concurrency=1, max_backlog=3)

    @svc.method
    async def slow(seconds: float) -> float:
        await asyncio.sleep(seconds)
        return seconds

    task = await serve_in_task(svc, redis_url)
    try:
        running = [
            asyncio.create_task(rpc.call(f"{svc.name}.slow", 0.5, timeout=10)) for _ in range(3)
        ]
        await wait_for_async(lambda: rpc.redis.xlen(constants.call_stream(svc.name)))
        await wait_for_async(lambda: _xlen_at_least(rpc.redis, constants.call_stream(svc.name), 3))
        with pytest.raises(Overloaded):
            await rpc.call(f"{svc.name}.slow", 0.0, timeout=10)
        assert await asyncio.gather(*running) == [0.5, 0.5, 0.5]
        assert await rpc.call(f"{svc.name}.slow", 0.0) == 0.0  # accepted again once drained
    finally:
        await _stop(svc, task)


async def _xlen_at_least(redis: aioredis.Redis, key: str, n: int) -> bool:
    return int(await redis.xlen(key)) >= n


async def test_directed_calls_reach_only_that_instance(redis_url: str, rpc: RpcClient) -> None:
    name = _name()
    a, b = build(name), build(name)
    tasks = [await serve_in_task(a, redis_url), await serve_in_task(b, redis_url)]
    try:
        for target in (a, b):
            answers = await asyncio.gather(
                *(rpc.call(f"{name}.whoami", instance=target.instance_id) for _ in range(20))
            )
            assert {x["instance"] for x in answers} == {target.instance_id}
        with pytest.raises(ServiceUnavailable):
            await rpc.call(f"{name}.whoami", instance=f"{name}-nobody")
    finally:
        await _stop(a, tasks[0])
        await _stop(b, tasks[1])


async def test_shutdown_hands_back_calls_past_the_grace(redis_url: str, rpc: RpcClient) -> None:
    name = _name()
    leaving = _reaping(name, shutdown_grace=0.3)
    staying = _reaping(name)
    first = await serve_in_task(leaving, redis_url)
    try:
        call = asyncio.create_task(
            rpc.call(f"{name}.sleep", seconds=1.5, timeout=30, instance=None)
        )
        await wait_for_async(lambda: leaving.worker is not None and leaving.worker.inflight > 0)
        second = await serve_in_task(staying, redis_url)
        await _stop(leaving, first)  # cancels the call after 0.3 s, then deregisters
        assert await call == 1.5  # finished by the other instance
        assert staying.worker is not None and staying.worker.stats.redelivered == 1
        await _stop(staying, second)
    finally:
        for svc in (leaving, staying):
            svc.request_stop()


async def test_draining_instance_is_not_routed_to(redis_url: str, rpc: RpcClient) -> None:
    svc = build(_name())
    task = await serve_in_task(svc, redis_url)
    inflight = asyncio.create_task(rpc.call(f"{svc.name}.sleep", seconds=0.8, timeout=10))
    await wait_for_async(lambda: svc.worker is not None and svc.worker.inflight > 0)
    svc.request_stop()
    await wait_for_async(lambda: _no_live(rpc.redis, svc.name))
    with pytest.raises(ServiceUnavailable):  # at once, while the old call still runs
        await rpc.call(f"{svc.name}.add", 1, timeout=5)
    assert await inflight == 0.8
    await asyncio.wait_for(task, 30)


async def _no_live(redis: aioredis.Redis, service: str) -> bool:
    return not await _live_ids(redis, service)


async def test_method_counters_and_histograms(redis_url: str, rpc: RpcClient) -> None:
    svc = build(_name())
    task = await serve_in_task(svc, redis_url)
    try:
        for i in range(10):
            await rpc.call(f"{svc.name}.add", i)
        with pytest.raises(RpcTimeout):
            await rpc.call(f"{svc.name}.sleep", seconds=2, timeout=0.1)
        snapshot = await rpc.call(f"{svc.name}.stats")
        add = snapshot["methods"]["add"]
        assert add["calls"] == 10 and add["errors"] == 0
        assert add["latency"]["count"] == 10
        assert sum(add["latency"]["buckets"].values()) == 10
        assert add["p50"] is not None
    finally:
        await _stop(svc, task)
