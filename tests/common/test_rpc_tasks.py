"""Tasks (fire-and-forget): priority, policies execute/last/drop, watermarks,
retries with backoff and the dead-letter list. Real redis-server."""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from common import Caller, RpcClient, Service, constants
from common.deadletters import DeadLetters
from common.errors import Overloaded, ServiceUnavailable
from common.settings import get_settings
from tests.helpers import serve_in_task, wait_for_async
from tests.support.calc_service import build

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
async def single_slot(redis_url: str) -> AsyncIterator[Service]:
    """One handler at a time, a backlog bound of 10, quick retries."""
    settings = dataclasses.replace(get_settings(), task_retry_delay=0.05, heartbeat_interval=0.2)
    svc = build(f"calc_{uuid.uuid4().hex[:8]}", concurrency=1)
    svc.settings = settings
    svc.max_backlog = 10
    task = await serve_in_task(svc, redis_url)
    yield svc
    svc.request_stop()
    await asyncio.wait_for(task, 30)


async def _busy(rpc: RpcClient, svc: Service, seconds: float) -> asyncio.Task[object]:
    """Occupy the only slot and wait until it is taken."""
    call = asyncio.create_task(rpc.call(f"{svc.name}.sleep", seconds=seconds, timeout=30))
    await wait_for_async(lambda: svc.worker is not None and svc.worker.inflight > 0)
    return call


async def test_priority_one_is_served_first(
    rpc: RpcClient, single_slot: Service, redis_client: aioredis.Redis
) -> None:
    svc, key = single_slot, f"test:order:{uuid.uuid4().hex}"
    busy = await _busy(rpc, svc, 0.5)
    for i in range(4):
        assert await rpc.send(f"{svc.name}.record", key=key, value=f"low{i}", priority=2)
    for i in range(4):
        assert await rpc.send(f"{svc.name}.record", key=key, value=f"high{i}", priority=1)
    await busy
    order = await wait_for_async(lambda: _list_of(redis_client, key, 8))
    assert order == [f"high{i}" for i in range(4)] + [f"low{i}" for i in range(4)]


async def _list_of(redis: aioredis.Redis, key: str, n: int) -> list[str] | None:
    values = [v.decode() for v in await redis.lrange(key, 0, -1)]
    return values if len(values) >= n else None


async def test_policy_last_coalesces_to_the_newest(
    rpc: RpcClient, single_slot: Service, redis_client: aioredis.Redis
) -> None:
    svc, key = single_slot, f"test:last:{uuid.uuid4().hex}"
    busy = await _busy(rpc, svc, 0.5)
    for i in range(5):
        await rpc.send(
            f"{svc.name}.record", key=key, value=f"v{i}", policy="last", coalesce_key="channel-7"
        )
    await busy
    assert await wait_for_async(lambda: redis_client.lrange(key, 0, -1)) == [b"v4"]
    await rpc.call(f"{svc.name}.add", 1)  # the queue has drained: v4 was the last
    assert await redis_client.lrange(key, 0, -1) == [b"v4"]
    stats = await redis_client.hgetall(constants.task_stats_key(svc.name))
    assert stats[b"coalesced"] == b"4"


async def test_policy_drop_discards_and_counts_when_saturated(
    rpc: RpcClient, single_slot: Service, redis_client: aioredis.Redis
) -> None:
    svc, key = single_slot, f"test:drop:{uuid.uuid4().hex}"
    busy = await _busy(rpc, svc, 0.5)
    for i in range(7):  # backlog 1 (the busy call) + 7 = 8 = the high watermark
        assert await rpc.send(f"{svc.name}.record", key=key, value=f"x{i}")
    assert await rpc.send(f"{svc.name}.record", key=key, value="dropped", policy="drop") is False
    stats = await redis_client.hgetall(constants.task_stats_key(svc.name))
    assert stats[b"dropped"] == b"1"
    await busy
    await wait_for_async(lambda: _list_of(redis_client, key, 7))
    assert b"dropped" not in await redis_client.lrange(key, 0, -1)
    # Once drained, drop-policy tasks are accepted again.
    assert await rpc.send(f"{svc.name}.record", key=key, value="kept", policy="drop") is True


async def test_drop_without_instance_is_not_an_error(rpc: RpcClient, redis_url: str) -> None:
    svc = build(f"calc_{uuid.uuid4().hex[:8]}")
    task = await serve_in_task(svc, redis_url)
    svc.request_stop()
    await asyncio.wait_for(task, 30)
    assert await rpc.send(f"{svc.name}.add", 1, policy="drop") is False
    with pytest.raises(ServiceUnavailable):
        await rpc.send(f"{svc.name}.add", 1)


async def test_priority_two_closes_at_high_watermark_and_reopens(
    rpc: RpcClient, single_slot: Service, redis_client: aioredis.Redis
) -> None:
    svc, key = single_slot, f"test:p2:{uuid.uuid4().hex}"
    busy = await _busy(rpc, svc, 0.5)
    accepted = 0
    with pytest.raises(Overloaded):
        for i in range(20):
            await rpc.send(f"{svc.name}.record", key=key, value=str(i), priority=2)
            accepted += 1
    assert accepted == 7  # 1 busy call + 7 tasks = 8 = 80% of the bound of 10
    # Priority 1 is still admitted up to the bound itself.
    assert await rpc.send(f"{svc.name}.record", key=key, value="p1", priority=1)
    await busy
    await wait_for_async(lambda: _list_of(redis_client, key, 8))
    assert await rpc.send(f"{svc.name}.record", key=key, value="again", priority=2)


async def test_failed_task_is_retried_with_backoff(
    rpc: RpcClient, single_slot: Service, redis_client: aioredis.Redis
) -> None:
    svc, key = single_slot, f"test:flaky:{uuid.uuid4().hex}"
    await rpc.send(f"{svc.name}.flaky", key=key, fail_times=2)
    assert await wait_for_async(lambda: redis_client.lrange(key, 0, -1), timeout=20) == [b"3"]
    assert svc.worker is not None and svc.worker.stats.retried == 2
    assert await DeadLetters(redis_client).count(svc.name) == 0


async def test_task_failing_every_attempt_is_dead_lettered_and_replayable(
    rpc: RpcClient, single_slot: Service, redis_client: aioredis.Redis
) -> None:
    svc, key = single_slot, f"test:dead:{uuid.uuid4().hex}"
    letters = DeadLetters(redis_client)
    await rpc.submit(f"{svc.name}.flaky", kwargs={"key": key, "fail_times": 3}, attempts=3)
    await wait_for_async(lambda: letters.count(svc.name), timeout=20)
    [letter] = await letters.list(svc.name)
    assert letter["method"] == "flaky" and letter["kwargs"] == {"key": key, "fail_times": 3}
    assert letter["attempts"] == 3
    assert letter["error"]["type"] == "RuntimeError"
    assert await redis_client.lrange(key, 0, -1) == []
    assert await letters.replay(svc.name) == 1  # the 4th run succeeds
    assert await wait_for_async(lambda: redis_client.lrange(key, 0, -1), timeout=20) == [b"4"]
    assert await letters.count(svc.name) == 0


async def test_invalid_task_is_dead_lettered_at_once(
    rpc: RpcClient, single_slot: Service, redis_client: aioredis.Redis
) -> None:
    svc = single_slot
    letters = DeadLetters(redis_client)
    await rpc.send(f"{svc.name}.add", a="not a number")
    await wait_for_async(lambda: letters.count(svc.name), timeout=20)
    [letter] = await letters.list(svc.name)
    assert letter["error"]["code"] == "invalid_params" and letter["attempts"] == 1


async def test_bad_task_options_are_refused(rpc: RpcClient) -> None:
    with pytest.raises(ValueError):
        await rpc.send("calc.add", 1, priority=3)
    with pytest.raises(ValueError):
        await rpc.send("calc.add", 1, policy="sometimes")
    with pytest.raises(ValueError):
        await rpc.send("calc.add", 1, policy="last")
    for attempts in (0, 101):  # a worker would have cut 101 to 100 without a word
        with pytest.raises(ValueError, match="attempts must be from 1 to 100"):
            await rpc.submit("calc.add", (1,), attempts=attempts)


async def test_a_task_is_run_for_the_caller_it_is_sent_for(rpc: RpcClient, redis_url: str) -> None:
    # As `call` does: the handler's `Caller` parameter gets the caller given to `send` or
    # `submit`, never one named among the task's arguments; None when none is given.
    alice = Caller("u-alice", "user", frozenset({"*"}), username="alice")
    key = Caller("u-bob", "api_key", frozenset({"notes"}), key_id="k1")
    ran: dict[str, Caller | None] = {}
    svc = Service(f"notes_{uuid.uuid4().hex[:8]}")

    @svc.method
    async def note(text: str, caller: Caller | None = None) -> None:
        ran[text] = caller

    task = await serve_in_task(svc, redis_url)
    try:
        assert await rpc.send(f"{svc.name}.note", "sent", caller=alice)
        assert await rpc.submit(f"{svc.name}.note", kwargs={"text": "submitted"}, caller=key)
        assert await rpc.send(f"{svc.name}.note", "for no one")
        await wait_for_async(lambda: len(ran) == 3)
        assert ran == {"sent": alice, "submitted": key, "for no one": None}
    finally:
        svc.request_stop()
        await asyncio.wait_for(task, 30)
