"""A worker never dies or wedges because of one call: handlers that raise what cannot
be encoded (or `SystemExit`), entries no client writes, tasks that kill their worker.
Real redis-server; real worker processes where a process would die."""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import redis.asyncio as aioredis

from common import RpcClient, Service, codec, constants, deadletters
from common.deadletters import DeadLetters
from common.errors import ConfigError, InvalidParams, RemoteError, RpcError
from common.protocol import Call
from common.settings import Settings, get_settings
from tests.helpers import ServiceProcess, serve_in_task, wait_for_async
from tests.support.faulty_service import build
from tests.support.leases import QUICK_LEASES, QUICK_LEASES_ENV

pytestmark = pytest.mark.timeout(120)


def _name() -> str:
    return f"faulty_{uuid.uuid4().hex[:8]}"


@pytest.fixture
async def faulty(redis_url: str) -> AsyncIterator[Service]:
    svc = build(_name())
    svc.settings = dataclasses.replace(get_settings(), **QUICK_LEASES)
    task = await serve_in_task(svc, redis_url)
    yield svc
    svc.request_stop()
    await asyncio.wait_for(task, 30)


async def _nothing_pending(redis: aioredis.Redis, stream: str) -> bool:
    return int((await redis.xpending(stream, constants.WORKER_GROUP))["pending"]) == 0


async def _still_serving(rpc: RpcClient, name: str) -> None:
    assert await rpc.call(f"{name}.ok", 7, timeout=3) == 7
    assert await rpc.call(f"{name}.ok_inline", 8, timeout=3) == 8


def _remote(remote_type: str, message: str | None = None) -> Callable[[RpcError], bool]:
    def check(error: RpcError) -> bool:
        assert isinstance(error, RemoteError), error
        assert error.remote_type == remote_type
        assert message is None or error.message == message, error.message
        return True

    return check


def _invalid_bad(error: RpcError) -> bool:
    # The details could not travel; the code and message did.
    assert isinstance(error, InvalidParams) and error.message == "bad", error
    return True


def _bad_request_without_retry_after(error: RpcError) -> bool:
    assert isinstance(error, RemoteError) and error.code == "bad_request", error
    assert error.message == "slow down" and error.retry_after is None
    return True


@pytest.mark.parametrize(
    ("method", "check"),
    [
        ("generator_exit", _remote("GeneratorExit", "GeneratorExit")),
        ("weird", _remote("Weird", "weird")),
        ("weird_inline", _remote("Weird", "weird")),
        ("cancelled_by_itself", _remote("CancelledError")),
        ("bad_str", _remote("BadStr", "BadStr (its message could not be encoded)")),
        ("bad_str_inline", _remote("BadStr", "BadStr (its message could not be encoded)")),
        ("bad_str_sync", _remote("BadStr", "BadStr (its message could not be encoded)")),
        ("bad_details", _invalid_bad),
        ("bad_details_inline", _invalid_bad),
        ("bad_retry_after", _bad_request_without_retry_after),
        ("surrogate_message", _remote("ValueError", "half a pair: ?")),
    ],
)
async def test_every_handler_failure_is_answered(
    faulty: Service, rpc: RpcClient, redis_client: aioredis.Redis, method: str, check: Any
) -> None:
    with pytest.raises(RpcError) as info:
        await rpc.call(f"{faulty.name}.{method}", timeout=3)
    assert check(info.value)
    await _still_serving(rpc, faulty.name)
    stream = constants.call_stream(faulty.name)
    assert await wait_for_async(lambda: _nothing_pending(redis_client, stream), timeout=5)


async def test_a_huge_error_message_is_cut(faulty: Service, rpc: RpcClient) -> None:
    with pytest.raises(RemoteError) as info:
        await rpc.call(f"{faulty.name}.huge_message", 1_000_000, timeout=5)
    assert info.value.message.startswith("xxx")
    assert "(1000000 characters)" in info.value.message
    assert len(info.value.message) < 3000


async def test_system_exit_and_keyboard_interrupt_do_not_kill_the_worker(redis_url: str) -> None:
    name = _name()
    proc = ServiceProcess(
        ["python", "-m", "tests.support.faulty_service"],
        env={"REDIS_URL": redis_url, "FAULTY_NAME": name},
        name=name,
    ).start()
    try:
        async with RpcClient(redis_url) as rpc:
            await wait_for_async(lambda: rpc.call(f"{name}.ok", timeout=1), timeout=30)
            for method, remote_type in [
                ("system_exit", "SystemExit"),
                ("system_exit_inline", "SystemExit"),
                ("system_exit_sync", "SystemExit"),
                ("keyboard_interrupt", "KeyboardInterrupt"),
                ("keyboard_interrupt_sync", "KeyboardInterrupt"),
            ]:
                with pytest.raises(RemoteError) as info:
                    await rpc.call(f"{name}.{method}", timeout=3)
                assert info.value.remote_type == remote_type, method
                await _still_serving(rpc, name)
            assert proc.alive()
    finally:
        proc.stop()


def _envelope(**fields: Any) -> dict[str, Any]:
    env: dict[str, Any] = {"v": 1, "id": uuid.uuid4().hex, "m": "ok", "a": [], "k": {}}
    env.update(dl=time.time() + 60, rt=constants.inbox_key(uuid.uuid4().hex), rid=None)
    env.update(fields)
    return env


def _task(**fields: Any) -> dict[str, Any]:
    task: dict[str, Any] = {"rt": None, "p": 1, "pol": "execute", "key": None}
    return _envelope(**{**task, "att": 1, "max": 1, "m": "fail_inline", **fields})


async def test_entries_no_client_writes_are_dropped(
    faulty: Service, rpc: RpcClient, redis_client: aioredis.Redis
) -> None:
    name = faulty.name
    await redis_client.set(f"test:precious:{name}", "x")
    limits = constants.limits_key(name)
    calls = [
        _envelope(rt=["a"]),
        _envelope(rt={"a": 1}),
        _envelope(rt=7),
        _envelope(rt=f"test:precious:{name}"),  # an existing key that is no inbox
        _envelope(rt=limits),
        _envelope(rid=["r"]),
    ]
    tasks = [
        _task(p=10),
        _task(p=-1),
        _task(p=True),
        _task(p="1"),
        _task(pol="sometimes"),
        _task(key=["k"]),
        _task(att=0),
        _task(max=-5),
        _task(att="2"),
    ]
    for env in calls:
        await redis_client.xadd(constants.call_stream(name), {"c": codec.packb(env)})
    for env in tasks:
        await redis_client.xadd(constants.task_stream(name, 1), {"c": codec.packb(env)})
    assert faulty.worker is not None
    expected = len(calls) + len(tasks)
    await wait_for_async(lambda: faulty.worker.stats.malformed == expected, timeout=5)
    await _still_serving(rpc, name)
    for stream in (constants.call_stream(name), constants.task_stream(name, 1)):
        assert await wait_for_async(lambda s=stream: _nothing_pending(redis_client, s))
    # Nothing was pushed to, or set to expire on, a key that is not an inbox.
    assert await redis_client.ttl(f"test:precious:{name}") == -1
    assert await redis_client.ttl(limits) == -1
    assert await DeadLetters(redis_client).count(name) == 0


@pytest.mark.parametrize("method", ["fail_inline", "fail"])
async def test_huge_attempt_numbers_are_cut_to_the_limit(
    faulty: Service, rpc: RpcClient, redis_client: aioredis.Redis, method: str
) -> None:
    env = _task(m=method, att=2000, max=3000)
    await redis_client.xadd(constants.task_stream(faulty.name, 1), {"c": codec.packb(env)})
    letters = DeadLetters(redis_client)
    await wait_for_async(lambda: letters.count(faulty.name), timeout=5)
    [letter] = await letters.list(faulty.name)
    assert letter["attempts"] == 100 and letter["error"]["type"] == "RuntimeError"
    await _still_serving(rpc, faulty.name)


async def test_dead_letters_stay_readable_with_a_bad_record(
    redis_client: aioredis.Redis,
) -> None:
    """A record an older version wrote for priority 10 ("10" then the length): listed as
    unreadable, kept by replay; the good records around it are listed and replayed."""
    name = _name()
    letters = DeadLetters(redis_client)
    good = Call("good", "fail", [], {}, time.time() + 60, None, None, max_attempts=1)
    bad = Call("bad", "fail", [], {}, time.time() + 60, None, None, priority=10)
    envelope = bad.encode()
    legacy = f"10{len(envelope):08d}".encode() + envelope + codec.packb({"attempts": 1})
    key = constants.dead_letter_key(name)
    await redis_client.lpush(key, deadletters.encode(good, {"code": "remote_error"}))
    await redis_client.lpush(key, legacy)
    await redis_client.lpush(key, deadletters.encode(good, {"code": "remote_error"}))
    listed = await letters.list(name)
    assert [letter.get("call_id") for letter in listed] == ["good", None, "good"]
    assert "unreadable" in listed[1]
    assert await letters.replay(name) == 2
    assert await letters.count(name) == 1  # the unreadable record, kept
    entries = await redis_client.xrange(constants.task_stream(name, 1))
    assert [Call.decode(fields[b"c"]).call_id for _, fields in entries] == ["good", "good"]
    assert await letters.replay(name) == 0 and await letters.count(name) == 1


async def _ghost_delivered(redis: aioredis.Redis, stream: str, call: Call, deliveries: int) -> None:
    """A consumer without a lease took the entry, `deliveries` times in all."""
    entry_id = await redis.xadd(stream, {"c": call.encode()})
    await redis.xreadgroup(constants.WORKER_GROUP, "ghost", {stream: ">"}, count=10)
    await redis.execute_command(
        "XCLAIM", stream, constants.WORKER_GROUP, "ghost", 0, entry_id, "RETRYCOUNT", deliveries
    )


async def test_a_call_delivered_too_often_is_answered_not_run(
    redis_url: str, redis_client: aioredis.Redis
) -> None:
    """`RPC_MAX_DELIVERIES` 3: reclaimed as its third delivery, a call runs; as its
    fourth, it is answered with an error instead."""
    svc = build(_name())
    svc.settings = dataclasses.replace(get_settings(), **QUICK_LEASES)
    stream = constants.call_stream(svc.name)
    await redis_client.xgroup_create(stream, constants.WORKER_GROUP, id="0", mkstream=True)
    inbox, key = constants.inbox_key(uuid.uuid4().hex), f"test:ran:{uuid.uuid4().hex}"
    for deliveries in (2, 3):
        call = Call(f"call-{deliveries}", "record", [], {"key": key}, time.time() + 60, inbox, None)
        await _ghost_delivered(redis_client, stream, call, deliveries)
    task = await serve_in_task(svc, redis_url)
    try:
        replies = await wait_for_async(lambda: _replies(redis_client, inbox, 2), timeout=10)
        assert replies["call-2"]["ok"] is True
        assert replies["call-3"]["ok"] is False and replies["call-3"]["e"]["type"] == "WorkerLost"
        assert await redis_client.lrange(key, 0, -1) == [b"ran"]  # once: call-2's run
        assert await wait_for_async(lambda: _nothing_pending(redis_client, stream))
        assert svc.worker is not None and svc.worker.stats.abandoned == 1
    finally:
        svc.request_stop()
        await asyncio.wait_for(task, 30)


async def _replies(redis: aioredis.Redis, inbox: str, n: int) -> dict[str, Any] | None:
    replies = [codec.unpackb(r) for r in await redis.lrange(inbox, 0, -1)]
    return {r["id"]: r for r in replies} if len(replies) >= n else None


async def test_a_task_that_kills_its_worker_is_dead_lettered(redis_url: str) -> None:
    """Delivered once, it kills its worker; the next instance dead-letters it, unrun."""
    name = _name()

    def worker() -> ServiceProcess:
        env = {"REDIS_URL": redis_url, "FAULTY_NAME": name, "RPC_MAX_DELIVERIES": "1",
               **QUICK_LEASES_ENV}  # fmt: skip
        args = ["python", "-m", "tests.support.faulty_service"]
        return ServiceProcess(args, env=env, name=name).start()

    first = worker()
    second: ServiceProcess | None = None
    try:
        async with RpcClient(redis_url) as rpc:
            await wait_for_async(lambda: rpc.call(f"{name}.ok", timeout=1), timeout=30)
            assert await rpc.send(f"{name}.die")
            assert first.process is not None
            assert await asyncio.to_thread(first.process.wait, 10) == 9
            second = worker()
            letters = DeadLetters(rpc.redis)
            await wait_for_async(lambda: letters.count(name), timeout=30)
            [letter] = await letters.list(name)
            assert letter["method"] == "die" and letter["error"]["type"] == "WorkerLost"
            assert await rpc.call(f"{name}.ok", 5, timeout=5) == 5
            assert second.alive()
            abandoned = second.log_records("call abandoned: delivered too often, never answered")
            assert len(abandoned) == 1 and abandoned[0]["method"] == "die"
    finally:
        first.stop()
        if second is not None:
            second.stop()


def test_max_deliveries_setting_must_be_positive() -> None:
    assert Settings.from_env({}).rpc_max_deliveries == 3
    with pytest.raises(ConfigError, match="RPC_MAX_DELIVERIES"):
        Settings.from_env({"RPC_MAX_DELIVERIES": "0"})
