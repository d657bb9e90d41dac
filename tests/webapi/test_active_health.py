"""The gateway's active health checks (`ActiveChecker`) against real HTTP servers on
127.0.0.1, instances registered in Redis and seen through a real `RegistryView`."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import partial

import pytest
import redis.asyncio as aioredis

from common.balancing import HealthBook
from common.instance_record import InstanceRecord
from common.registry import Registry
from common.registry_view import RegistryView
from tests.helpers import wait_for_async
from webapi.proxy.health import ActiveChecker

pytestmark = pytest.mark.timeout(30)

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def _failing(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.readuntil(b"\r\n\r\n")
    writer.write(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n")
    await writer.drain()
    writer.close()


async def _streaming(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A 200 whose body never ends (a health path set to an event stream by mistake)."""
    await reader.readuntil(b"\r\n\r\n")
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                 b"Transfer-Encoding: chunked\r\n\r\n")  # fmt: skip
    while True:
        writer.write(b"6\r\ndata:\n\r\n")
        await writer.drain()
        await asyncio.sleep(0.05)


async def _dribbling(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answers a head one byte at a time, each well within the read timeout, never ending."""
    await reader.readuntil(b"\r\n\r\n")
    writer.write(b"HTTP/1.1 200 OK\r\nX-Slow: ")
    while True:
        writer.write(b"x")
        await writer.drain()
        await asyncio.sleep(0.05)


class Instances:
    """Servers registered as instances of one service."""

    def __init__(self, redis: aioredis.Redis) -> None:
        self.service = f"hc_{uuid.uuid4().hex[:6]}"
        self.registry = Registry(redis, ttl=30)
        self.servers: list[asyncio.Server] = []
        self.addresses: dict[str, str] = {}

    async def add(self, name: str, handler: Handler) -> str:
        server = await asyncio.start_server(handler, "127.0.0.1", 0)
        self.servers.append(server)
        port = server.sockets[0].getsockname()[1]
        instance_id = f"{self.service}-{name}"
        await self.registry.heartbeat(InstanceRecord(
            self.service, instance_id, kind="http", address=f"127.0.0.1:{port}",
            health_path="/health",
        ))  # fmt: skip
        self.addresses[instance_id] = f"127.0.0.1:{port}"
        return instance_id

    async def beat_without_health_path(self, instance_id: str) -> None:
        await self.registry.heartbeat(InstanceRecord(
            self.service, instance_id, kind="http", address=self.addresses[instance_id],
        ))  # fmt: skip

    def close(self) -> None:
        for server in self.servers:
            server.close()


@pytest.fixture
async def instances(redis_client: aioredis.Redis) -> AsyncIterator[Instances]:
    found = Instances(redis_client)
    try:
        yield found
    finally:
        found.close()


@contextlib.asynccontextmanager
async def _checking(
    redis_client: aioredis.Redis, instances: Instances, expected: int, *, run: bool = True
) -> AsyncIterator[tuple[RegistryView, HealthBook, ActiveChecker, asyncio.Task[None] | None]]:
    """A registry view holding `expected` instances, a health book and a checker of
    them, its `run()` task started unless `run` is False; all stopped on leaving."""
    view = RegistryView(redis_client, resync_interval=0.2)
    await view.start()
    checker = None
    task = None
    try:
        await wait_for_async(lambda: _count(view, instances.service, expected), timeout=5)
        book = HealthBook()
        checker = ActiveChecker(view, book, interval=0.1, timeout=0.5, fall=2, rise=2)
        if run:
            task = asyncio.create_task(checker.run())
        yield view, book, checker, task
    finally:
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        if checker is not None:
            await checker.close()
        await view.close()


async def _count(view: RegistryView, service: str, expected: int) -> bool:
    return len(view.instances(service)) == expected


async def test_an_endless_health_body_holds_no_round_of_checks(
    redis_client: aioredis.Redis, instances: Instances
) -> None:
    streaming = await instances.add("streaming", _streaming)
    failing = await instances.add("failing", _failing)
    async with _checking(redis_client, instances, 2) as (_view, book, _checker, _task):
        # Two failed checks of the other instance: its rounds were not held open.
        await wait_for_async(lambda: _ejected(book, instances.service, failing), timeout=10)
        assert not book.is_ejected(
            instances.service, streaming
        )  # a 200 head passes; its body is not read


async def test_a_check_whose_head_never_ends_fails_at_its_timeout(
    redis_client: aioredis.Redis, instances: Instances
) -> None:
    slow = await instances.add("slow", _dribbling)
    async with _checking(redis_client, instances, 1, run=False) as (_view, book, checker, _task):
        for _ in range(2):  # fall=2
            await asyncio.wait_for(checker.check_all(), timeout=5)
        assert book.is_ejected(instances.service, slow)


async def test_a_health_path_no_url_holds_fails_its_instance_and_stops_no_check(
    redis_client: aioredis.Redis, instances: Instances
) -> None:
    """A record from before heartbeats were checked (or written by hand) whose health
    path httpx refuses (`InvalidURL`, no `httpx.HTTPError`): its instance fails its
    checks; the checker goes on checking the others."""
    failing = await instances.add("failing", _failing)
    bad = f"{instances.service}-bad"
    for path in ("/h\r\nX-Injected: 1", "/" + "h" * 100_000):
        await instances.registry.heartbeat(InstanceRecord(
            instances.service, bad, kind="http", address="127.0.0.1:9", health_path=path,
        ))  # fmt: skip
        async with _checking(redis_client, instances, 2) as (_view, book, _checker, task):
            for instance in (failing, bad):
                await wait_for_async(
                    partial(_ejected, book, instances.service, instance), timeout=10
                )
            assert task is not None and not task.done()


async def test_an_instance_marked_down_is_readmitted_once_it_drops_its_health_path(
    redis_client: aioredis.Redis, instances: Instances
) -> None:
    failing = await instances.add("failing", _failing)
    async with _checking(redis_client, instances, 1) as (view, book, _checker, _task):
        await wait_for_async(lambda: _ejected(book, instances.service, failing), timeout=10)
        # Its next heartbeat names no health path (the check was removed): no check will
        # ever pass again, so the checks' verdict must not keep it out of rotation.
        await instances.beat_without_health_path(failing)
        await wait_for_async(lambda: _usable(view, book, instances.service, failing), timeout=10)


async def _usable(view: RegistryView, book: HealthBook, service: str, instance_id: str) -> bool:
    return [r.instance_id for r in book.usable(service, view.instances(service))] == [instance_id]


async def _ejected(book: HealthBook, service: str, instance_id: str) -> bool:
    return book.is_ejected(service, instance_id)
