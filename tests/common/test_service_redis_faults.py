"""A worker's start-up and heartbeat against Redis going away or refusing writes
(maxmemory reached, noeviction: the OOM error), on a private redis-server each.

Neither ends the worker or leaves it unregistered: the start-up waits at the step it
reached and finishes once Redis is back; the heartbeat goes on. Each says so once.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from common import RpcClient, Service, constants
from common.embedded_redis import EmbeddedRedis
from common.settings import Settings
from tests.helpers import serve_until_live, wait_for_async

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def server() -> Iterator[EmbeddedRedis]:
    with EmbeddedRedis() as private:
        yield private


def calc() -> Service:
    svc = Service(f"calc_{uuid.uuid4().hex[:8]}", settings=Settings(heartbeat_interval=0.2))

    @svc.method
    async def add(a: int, b: int) -> int:
        return a + b

    return svc


def lines(caplog: pytest.LogCaptureFixture, message: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.getMessage() == message]


def fields(record: logging.LogRecord) -> dict[str, Any]:
    return dict(getattr(record, "fields", {}))


async def full(redis: aioredis.Redis, on: bool) -> None:
    """Redis refusing every write (`on`), or taking them again."""
    await redis.config_set("maxmemory-policy", "noeviction")
    await redis.config_set("maxmemory", "1" if on else "0")


async def test_heartbeat_goes_on_after_redis_refused_writes(
    server: EmbeddedRedis, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="switchboard.service")
    svc = calc()
    task = await serve_until_live(svc, server.url)
    admin = aioredis.Redis.from_url(server.url)
    try:
        await full(admin, True)
        await wait_for_async(lambda: lines(caplog, "heartbeat failed"))
        await full(admin, False)
        await wait_for_async(lambda: lines(caplog, "heartbeat restored"))
        (failed,) = lines(caplog, "heartbeat failed")  # once, not once per heartbeat
        assert "OOM" in fields(failed)["error"]
        async with RpcClient(server.url) as rpc:
            assert await rpc.call(f"{svc.name}.add", 1, 2, timeout=5) == 3
    finally:
        svc.request_stop()
        await asyncio.wait_for(task, 20)
        await admin.aclose()


async def test_start_up_waits_while_redis_refuses_writes(
    server: EmbeddedRedis, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="switchboard.service")
    admin = aioredis.Redis.from_url(server.url)
    await full(admin, True)  # PING answers; publishing the catalog is refused
    svc = calc()
    task = asyncio.create_task(svc.serve(server.url))
    try:
        await wait_for_async(lambda: lines(caplog, "waiting for redis") or task.done())
        assert not task.done(), task.exception()
        (waiting,) = lines(caplog, "waiting for redis")
        assert fields(waiting)["step"] == "catalog"
        await full(admin, False)
        async with RpcClient(server.url) as rpc:
            call = lambda: rpc.call(f"{svc.name}.add", 2, 3, timeout=2)  # noqa: E731
            assert await wait_for_async(call) == 5
        assert len(lines(caplog, "waiting for redis")) == 1
        assert len(lines(caplog, "redis reachable")) == 1
    finally:
        svc.request_stop()
        await asyncio.wait_for(task, 20)
        await admin.aclose()


async def test_start_up_hook_run_again_after_redis_restarted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Redis stops while a startup hook runs: the hook fails, is run again once Redis
    is back, and the worker serves (before: the process ended with a traceback)."""
    caplog.set_level(logging.INFO, logger="switchboard.service")
    server = EmbeddedRedis(data_dir=tmp_path).start()
    svc = calc()
    runs: list[int] = []

    @svc.on_startup
    async def prepare(service: Service) -> None:
        runs.append(1)
        if len(runs) == 1:
            await asyncio.to_thread(server.stop, keep_data=True)
        await service.redis.set("prepared", "yes")

    task = asyncio.create_task(svc.serve(server.url))
    try:
        await wait_for_async(lambda: lines(caplog, "waiting for redis") or task.done())
        assert not task.done(), task.exception()
        (waiting,) = lines(caplog, "waiting for redis")
        assert fields(waiting)["step"].endswith("prepare")
        assert fields(waiting)["kind"] == "unreachable"
        server.start()
        async with RpcClient(server.url) as rpc:
            call = lambda: rpc.call(f"{svc.name}.add", 4, 5, timeout=2)  # noqa: E731
            assert await wait_for_async(call, timeout=20) == 9
            assert await rpc.redis.get("prepared") == b"yes"
        assert len(runs) >= 2
    finally:
        svc.request_stop()
        await asyncio.wait_for(task, 20)
        server.stop()


async def test_worker_reads_again_after_redis_refused_its_read(
    server: EmbeddedRedis, caplog: pytest.LogCaptureFixture
) -> None:
    """A call stream replaced by a key of another type: Redis answers the worker's read
    with WRONGTYPE. The read loop says so once and reads again (before: it ended)."""
    caplog.set_level(logging.INFO, logger="switchboard.worker")
    svc = calc()
    task = await serve_until_live(svc, server.url)
    admin = aioredis.Redis.from_url(server.url)
    direct = constants.direct_stream(svc.name, svc.instance_id)
    try:
        await admin.delete(direct)
        await admin.set(direct, "not a stream")
        await wait_for_async(lambda: lines(caplog, "redis refused the call read, retrying"))
        await admin.delete(direct)  # the worker makes its stream and group again
        async with RpcClient(server.url) as rpc:
            assert await rpc.call(f"{svc.name}.add", 1, 1, timeout=10) == 2
        await wait_for_async(lambda: lines(caplog, "calls read again"))
        assert len(lines(caplog, "redis refused the call read, retrying")) == 1
    finally:
        svc.request_stop()
        await asyncio.wait_for(task, 20)
        await admin.aclose()
