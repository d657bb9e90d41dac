"""Redis refusing a worker's writes for a while (out of memory, a read-only replica while
a failover completes, a failed save, a script past its time limit, the credentials):
the worker holds what it finished and writes it once Redis takes writes again. A call
whose handler ran meanwhile gets its answer, not `RpcTimeout`; its entry is acked and
its reply kept for deduplication; a failed task still gets its retry. One warning says
the outage, one line its end. A reply held past its call's deadline is dropped (logged)
and its entry acked. A real worker process and a private redis-server in each state
(`tests.support.redis_states`), the state applied while the handler runs."""

from __future__ import annotations

import asyncio
import json
import signal
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis

from common import RpcClient, constants
from common.connection import RawConnection
from common.deadletters import DeadLetters
from common.embedded_redis import EmbeddedRedis
from common.errors import ResultTooLarge, RpcTimeout
from common.redelivery import Redelivery
from common.replies import Finished, ReplyWrites, error_replies
from tests.helpers import ServiceProcess, serve_in_task, wait_for, wait_for_async
from tests.support.calc_service import build, start_worker
from tests.support.leases import QUICK_LEASES_ENV
from tests.support.redis_states import (  # noqa: F401 (the *_fixture ones)
    STATES,
    admin_fixture,
    busy,
    out_of_memory,
    private_redis_fixture,
    read_only,
    small_values,
)

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
def worker(private_redis: EmbeddedRedis, admin: redis.Redis) -> Iterator[ServiceProcess]:
    """A calc service's worker process, live (its name is `worker.name`)."""
    name = f"calc_{uuid.uuid4().hex[:8]}"
    process = start_worker(private_redis.url, name)
    try:
        wait_for(lambda: admin.zcard(constants.instances_key(name)) == 1, timeout=20)
        yield process
    finally:
        process.stop()


@pytest.fixture
async def rpc(private_redis: EmbeddedRedis, worker: ServiceProcess) -> AsyncIterator[RpcClient]:
    async with RpcClient(private_redis.url) as client:
        # A handler that suspends: its reply is the flusher's, whose connection is made
        # now, before Redis refuses anything.
        assert await client.call(f"{worker.name}.sleep", 0.01, timeout=10) == 0.01
        yield client


def _records(worker: ServiceProcess) -> list[dict[str, Any]]:
    return [json.loads(line) for line in worker.log_path.read_text().splitlines() if line]


def _flush_failed(worker: ServiceProcess) -> bool:
    """The worker logged that a reply write of its failed ("reply flush ...")."""
    return any(r["msg"].startswith("reply flush") for r in _records(worker))


def _open(gate: Path, text: str) -> None:
    """Let the `gate` handler waiting for `gate` end, answering `text` (all of it: the
    file appears whole)."""
    written = gate.with_suffix(".part")
    written.write_text(text)
    written.rename(gate)


def _reading(admin: redis.Redis) -> bool:
    """A worker waits for calls: some client is blocked in an XREADGROUP."""
    return any(c["cmd"] == "xreadgroup" and "b" in c["flags"] for c in admin.client_list())


def _pending(admin: redis.Redis, stream: str) -> int:
    return int(admin.xpending(stream, constants.WORKER_GROUP)["pending"])


def _leased(admin: redis.Redis, service: str) -> bool:
    """An instance of `service` holds a lease now: a refusal longer than the lease (its
    heartbeat refused too) lets it lapse until the heartbeat is taken again."""
    seconds, micros = admin.time()
    now_ms = seconds * 1000 + micros // 1000
    return bool(admin.zrangebyscore(constants.instances_key(service), now_ms, "+inf"))


async def _running(admin: redis.Redis, stream: str) -> None:
    """Until the worker has taken the one entry of `stream` (its handler runs)."""
    await wait_for_async(lambda: _pending(admin, stream) == 1)


@pytest.mark.parametrize("kind", list(STATES))
async def test_a_reply_redis_refuses_for_a_while_is_written_once_it_takes_writes(
    kind: str, worker: ServiceProcess, rpc: RpcClient, admin: redis.Redis, tmp_path: Path
) -> None:
    gate, stream = tmp_path / "gate", constants.call_stream(worker.name)
    call = asyncio.create_task(rpc.call(f"{worker.name}.gate", str(gate), timeout=20))
    await _running(admin, stream)
    with STATES[kind](admin):
        _open(gate, "done")
        await wait_for_async(lambda: _flush_failed(worker), timeout=15)
    assert await call == "done"  # not RpcTimeout: the work was done
    # Acked and deleted; its reply stored for deduplication first.
    await wait_for_async(lambda: admin.xlen(stream) == 0 and _pending(admin, stream) == 0)
    done_keys = admin.keys(constants.done_key(worker.name, 0)[:-1] + "*")
    assert sum(admin.hlen(key) for key in done_keys) == 2  # the warm-up's and this one
    warned = worker.log_records("reply flush failed, retrying")
    assert [r["kind"] for r in warned].count(kind) == 1, warned  # once, not per retry
    # Logged as the write's replies are read: after the caller may have had its answer.
    await wait_for_async(lambda: worker.log_records("replies flushed again"))
    assert len(worker.log_records("replies flushed again")) == 1
    assert worker.log_records("reply flush: redis refused a command") == []
    assert await rpc.call(f"{worker.name}.add", 2, timeout=10) == 3  # it takes calls again


@pytest.mark.parametrize("state", [out_of_memory, read_only], ids=["out_of_memory", "read_only"])
async def test_a_failed_task_redis_refuses_for_a_while_is_still_retried(
    state: Any,
    private_redis: EmbeddedRedis,
    worker: ServiceProcess,
    rpc: RpcClient,
    admin: redis.Redis,
    tmp_path: Path,
) -> None:
    """Its retry (a zset entry) is written once Redis takes it: the task runs again, and
    then, failing again, is dead-lettered after its 2 attempts."""
    gate, stream = tmp_path / "gate", constants.task_stream(worker.name, 1)
    assert await rpc.submit(f"{worker.name}.gate", (str(gate), True), attempts=2)
    await _running(admin, stream)
    with state(admin):
        _open(gate, "refused")
        await wait_for_async(lambda: _flush_failed(worker), timeout=15)
    letters = DeadLetters(rpc.redis)
    (letter,) = await wait_for_async(lambda: letters.list(worker.name), timeout=20)
    assert (letter["method"], letter["attempts"]) == ("gate", 2)
    assert letter["error"]["message"] == "refused"


async def test_a_call_whose_reply_redis_refuses_is_redelivered_if_its_worker_dies(
    private_redis: EmbeddedRedis, admin: redis.Redis, tmp_path: Path
) -> None:
    """Out of memory, Redis refused the reply but took the entry's ack (XACK and XDEL are
    not refused: they free memory): the worker held the only trace of a call that had
    run, and killed, lost it; its caller waited for its timeout. Now the reply and the
    ack are written all or nothing: the entry stays pending, another worker reclaims it
    once the lease lapses and runs it again (at-least-once), and the caller is answered."""
    name = f"calc_{uuid.uuid4().hex[:8]}"
    workers = [start_worker(private_redis.url, name, **QUICK_LEASES_ENV)]
    try:
        wait_for(lambda: admin.zcard(constants.instances_key(name)) == 1, timeout=20)
        async with RpcClient(private_redis.url) as rpc:
            assert await rpc.call(f"{name}.sleep", 0.01, timeout=10) == 0.01  # (see `rpc`)
            gate, stream = tmp_path / "gate", constants.call_stream(name)
            call = asyncio.create_task(rpc.call(f"{name}.gate", str(gate), timeout=30))
            await _running(admin, stream)
            with out_of_memory(admin):
                _open(gate, "done")
                await wait_for_async(lambda: _flush_failed(workers[0]), timeout=15)
                assert _pending(admin, stream) == 1  # not acked without its reply
                workers[0].stop(signal.SIGKILL)
            workers.append(start_worker(private_redis.url, name, **QUICK_LEASES_ENV))
            assert await call == "done"
    finally:
        for worker in workers:
            worker.stop()


@pytest.mark.parametrize(
    ("state", "acked_meanwhile"),
    [(read_only, False), (out_of_memory, True)],
    ids=["read_only", "out_of_memory"],
)
async def test_a_reply_held_past_its_deadline_is_dropped_and_its_entry_acked(
    state: Any,
    acked_meanwhile: bool,
    worker: ServiceProcess,
    rpc: RpcClient,
    admin: redis.Redis,
    tmp_path: Path,
) -> None:
    """Nobody waits for it any more: it is not written, the entry is acked, it is logged,
    and the worker takes calls again. Its ack alone is written outside a transaction
    (`common.replies`): out of memory, Redis takes it at once (acks free memory); a
    read-only replica, once it takes writes."""
    gate, stream = tmp_path / "gate", constants.call_stream(worker.name)
    call = asyncio.create_task(rpc.call(f"{worker.name}.gate", str(gate), timeout=1))
    await _running(admin, stream)
    with state(admin):
        _open(gate, "late")
        with pytest.raises(RpcTimeout):
            await call
        message = "replies dropped: redis refused them past their deadline"
        (dropped,) = await wait_for_async(lambda: worker.log_records(message), timeout=15)
        assert (dropped["n"], dropped["methods"]) == (1, ["gate"])
        if acked_meanwhile:
            await wait_for_async(lambda: _pending(admin, stream) == 0)
    await wait_for_async(lambda: admin.xlen(stream) == 0 and _pending(admin, stream) == 0)
    assert admin.llen(rpc.inbox) == 0
    await wait_for_async(lambda: _leased(admin, worker.name))
    assert await rpc.call(f"{worker.name}.add", 2, timeout=10) == 3


async def test_a_reply_redis_refuses_for_good_held_while_it_refuses_all_writes(
    worker: ServiceProcess, rpc: RpcClient, admin: redis.Redis, tmp_path: Path
) -> None:
    """A 2 MB result while Redis takes no value over 1 MB, and is out of memory: held
    (no call is taken meanwhile) while Redis refuses every write, then answered with
    `ResultTooLarge` (`ReplyWrites.write_apart`), and the worker takes calls again."""
    gate, stream = tmp_path / "gate", constants.call_stream(worker.name)
    with small_values(admin):
        call = asyncio.create_task(rpc.call(f"{worker.name}.gate", str(gate), timeout=20))
        await _running(admin, stream)
        with out_of_memory(admin):
            _open(gate, "x" * 2_000_000)
            await wait_for_async(lambda: _flush_failed(worker), timeout=15)
            # Reads go on out of memory, but the worker holding a reply takes no calls.
            await wait_for_async(lambda: not _reading(admin))
        with pytest.raises(ResultTooLarge):
            await call
        assert await rpc.call(f"{worker.name}.add", 2, timeout=10) == 3


async def test_a_stored_reply_looked_up_while_redis_is_busy_is_unknown(
    private_redis: EmbeddedRedis, admin: redis.Redis
) -> None:
    """Not an error that ends the reclaimed call's task (leaving it unanswered): the call
    runs again, as when Redis is down (at-least-once)."""
    client = aioredis.Redis.from_url(private_redis.url)
    try:
        redelivery = Redelivery(
            client, "refused_lookup", "consumer", 15.0, lease_ttl=3.0, reap_interval=1.0
        )
        with busy(admin):
            assert await redelivery.stored_reply("some-call") is None
    finally:
        await client.aclose()


async def test_a_bug_building_a_batchs_writes_does_not_end_the_read_loop(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The read loop hands the batch to the flusher, which builds its writes again (and
    would write it apart, the entry at fault acked only, were the bug for good)."""
    svc = build(f"calc_{uuid.uuid4().hex[:8]}")
    task = await serve_in_task(svc, redis_url)
    try:
        assert svc.worker is not None
        writes = svc.worker._writes
        commands, failed = writes.commands, []

        def buggy(batch: list[Finished]) -> list[tuple[Any, ...]]:
            if not failed:
                failed.append(len(batch))
                raise RuntimeError("a bug")
            return commands(batch)

        monkeypatch.setattr(writes, "commands", buggy)
        async with RpcClient(redis_url) as rpc:
            # `add` cannot suspend: it runs in the read loop, which writes its reply.
            assert await rpc.call(f"{svc.name}.add", 1, timeout=5) == 2
            assert await rpc.call(f"{svc.name}.add", 2, timeout=5) == 3
        assert failed == [1]
    finally:
        svc.request_stop()
        await asyncio.wait_for(task, 30)


async def test_the_error_replies_of_entries_written_apart_are_all_found(
    redis_client: aioredis.Redis,
) -> None:
    """`write_apart` writes each entry in a transaction of its own, its replies one after
    the other: an error inside any of those EXECs is found (the flusher logs it, "reply
    flush: redis refused a command"), not only inside the last one's."""
    conn = RawConnection(redis_client, timeout=5.0)
    try:
        tag = uuid.uuid4().hex[:8]
        wrong, inbox, stream = f"inbox:wrong:{tag}", f"inbox:{tag}", f"calls:{tag}"
        await redis_client.set(wrong, b"not a list")
        batch = [Finished(stream, b"1-1", call_id="a", inbox=wrong, reply=b"ra"),
                 Finished(stream, b"1-2", call_id="b", inbox=inbox, reply=b"rb")]  # fmt: skip
        writes = ReplyWrites("errors_apart", 1.0, 10)
        replies, left, refused = await writes.write_apart(conn, batch)
        assert (left, refused) == ([], None)
        assert [str(e).split()[0] for e in error_replies(replies)] == ["WRONGTYPE"]
        assert await redis_client.lrange(inbox, 0, -1) == [b"rb"]
    finally:
        await conn.aclose()
