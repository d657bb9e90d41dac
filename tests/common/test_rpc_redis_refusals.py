"""Redis up but refusing (out of memory, a read-only replica, a failed save, a script
running too long, the credentials): the RPC client raises `ServiceUnavailable` saying
why, at one caller and at many, for a client started before and one started during
the refusal, and both go on once Redis takes writes again. A worker given the wrong
password says so, once, never quoting it, and starts once the password is right."""

from __future__ import annotations

import asyncio
import dataclasses
import uuid

import pytest
import redis
import redis.asyncio as aioredis

from common import RpcClient, constants
from common.embedded_redis import EmbeddedRedis
from common.errors import ServiceUnavailable
from common.settings import get_settings
from tests.helpers import ServiceProcess, serve_until_live, wait_for, wait_for_async
from tests.support.calc_service import build, start_worker
from tests.support.leases import QUICK_LEASES
from tests.support.redis_states import (  # noqa: F401 (the *_fixture ones)
    MESSAGES,
    STATES,
    admin_fixture,
    out_of_memory,
    private_redis_fixture,
    read_only,
)

pytestmark = pytest.mark.timeout(120)


async def _live_service(url: str) -> str:
    """A service with an instance that holds a lease for an hour (and no worker): the
    enqueue script gets past its liveness check to its write."""
    service = f"refused_{uuid.uuid4().hex[:8]}"
    client = aioredis.Redis.from_url(url)
    try:
        seconds, _ = await client.time()
        await client.zadd(constants.instances_key(service), {"fake": (seconds + 3600) * 1000})
    finally:
        await client.aclose()
    return service


async def _refusals(rpc: RpcClient, service: str) -> list[BaseException | None]:
    """What one call, then 20 concurrent calls (the writer's path) raise."""
    errors: list[BaseException | None] = []
    try:
        await rpc.call(f"{service}.m", timeout=5)
        errors.append(None)
    except Exception as exc:
        errors.append(exc)
    calls = [rpc.call(f"{service}.m", timeout=5) for _ in range(20)]
    errors += await asyncio.gather(*calls, return_exceptions=True)
    return errors


async def _taken(rpc: RpcClient, service: str) -> bool:
    """A task is enqueued (the client's writer goes on), within a bound of our own."""
    async with asyncio.timeout(2):
        return await rpc.send(f"{service}.m")


@pytest.mark.parametrize("kind", list(STATES))
async def test_calls_refused_by_redis_are_service_unavailable_saying_why(
    kind: str, private_redis: EmbeddedRedis, admin: redis.Redis
) -> None:
    url = private_redis.url
    service = await _live_service(url)
    # `during` connects on its first call: while Redis refuses.
    async with RpcClient(url) as before, RpcClient(url) as during:
        assert await before.send(f"{service}.m")  # connected, the scripts loaded
        with STATES[kind](admin):
            for rpc in (before, during):
                errors = await _refusals(rpc, service)
                assert all(isinstance(e, ServiceUnavailable) for e in errors), errors
                assert {str(e) for e in errors} == {MESSAGES[kind]}
                assert all(e.__cause__ is not None for e in errors)  # for the log
        for rpc in (before, during):  # the writer and the reader went on
            await wait_for_async(lambda rpc=rpc: _taken(rpc, service), timeout=15)


@pytest.mark.parametrize("kind", ["out_of_memory", "read_only", "persistence_failed"])
async def test_a_service_whose_leases_lapsed_while_redis_refuses_writes_is_told_why(
    kind: str, private_redis: EmbeddedRedis, admin: redis.Redis
) -> None:
    # Redis refusing writes refuses the worker's heartbeats too, and its lease lapses.
    # Before: calls were then told "no live instance" (a 503 for a service that runs).
    svc = build(f"calc_{uuid.uuid4().hex[:8]}")
    svc.settings = dataclasses.replace(get_settings(), **QUICK_LEASES)
    task = await serve_until_live(svc, private_redis.url)
    try:
        async with RpcClient(private_redis.url) as rpc:
            assert await rpc.call(f"{svc.name}.add", 1, timeout=5) == 2
            with STATES[kind](admin):
                await wait_for_async(lambda: _none_live(admin, svc.name))
                for refused in (
                    rpc.call(f"{svc.name}.add", 1, timeout=5),
                    rpc.send(f"{svc.name}.add", 1),
                ):
                    with pytest.raises(ServiceUnavailable) as info:
                        await refused
                    assert str(info.value) == MESSAGES[kind]
            assert await wait_for_async(lambda: rpc.call(f"{svc.name}.add", 2, timeout=5)) == 3
    finally:
        svc.request_stop()
        await asyncio.wait_for(task, 30)


def _none_live(admin: redis.Redis, service: str) -> bool:
    """No lease in `instances` ends after Redis's now."""
    seconds, micros = admin.time()
    now_ms = seconds * 1000 + micros // 1000
    return not admin.zrangebyscore(constants.instances_key(service), f"({now_ms}", "+inf")


async def test_a_refused_inbox_read_leaves_no_reply_to_be_misread(
    private_redis: EmbeddedRedis, admin: redis.Redis
) -> None:
    # The inbox reader drains (LPOP) and waits (BLPOP) in one write. A replica refuses
    # the LPOP (a write): the BLPOP's reply, left unread on the connection, was then
    # read as the answer to the client's next command there, the next call's enqueue
    # (here: refused for another reason, yet taken as enqueued, and timed out).
    url = private_redis.url
    service = await _live_service(url)
    async with RpcClient(url) as rpc:
        awaited = asyncio.create_task(rpc.call(f"{service}.m", timeout=60))  # no worker
        await wait_for_async(lambda: admin.xlen(constants.call_stream(service)))  # enqueued
        with read_only(admin):
            await wait_for_async(lambda: _rejected(admin, "lpop"))  # the drain, refused
            awaited.cancel()
        await wait_for_async(lambda: rpc._reader_parked)  # none awaited: its connection idle
        with out_of_memory(admin), pytest.raises(ServiceUnavailable) as refused:
            await rpc.call(f"{service}.m", timeout=5)
        assert str(refused.value) == MESSAGES["out_of_memory"]


def _rejected(admin: redis.Redis, command: str) -> int:
    """How many `command`s Redis has refused (before running them)."""
    stats = admin.info("commandstats").get(f"cmdstat_{command}", {})
    return int(stats.get("rejected_calls", 0))


def test_a_worker_refused_the_credentials_says_so_once_and_starts_once_they_are_right() -> None:
    server = EmbeddedRedis().start()
    admin = redis.Redis(port=server.port)
    admin.config_set("requirepass", "the-old-Passw0rd")
    name = f"calc_{uuid.uuid4().hex[:8]}"
    url = f"redis://:the-new-Passw0rd@127.0.0.1:{server.port}/0"
    worker = start_worker(url, name)
    try:
        wait_for(lambda: _refused(worker))
        admin.config_set("requirepass", "the-new-Passw0rd")  # the rotation completes
        wait_for(lambda: admin.zcard(constants.instances_key(name)) == 1, timeout=15)
        assert worker.alive()
        assert len(worker.log_records("waiting for redis")) == 1  # once, however many retries
        assert _refused(worker)
        assert len(worker.log_records("redis reachable")) == 1
        assert "Passw0rd" not in worker.log_path.read_text()
    finally:
        worker.stop()
        admin.close()
        server.stop()


def _refused(worker: ServiceProcess) -> bool:
    """The worker said it waits for Redis because Redis refused its credentials."""
    return any(
        (r.get("kind"), r.get("refused")) == ("auth", "redis refused the credentials")
        for r in worker.log_records("waiting for redis")
    )
