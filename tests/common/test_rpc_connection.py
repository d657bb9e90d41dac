"""The RPC hot path's own connections (`RawConnection`) and how the worker starts calls.

Real redis-servers: AUTH and db from the URL, connections killed under the
client and the worker, the script cache flushed, handlers that finish at once
and handlers that suspend.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import math
import socket
import uuid
from collections.abc import AsyncIterator, Awaitable
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.asyncio.connection import Connection
from redis.exceptions import TimeoutError as RedisTimeoutError

from common import RpcClient, Service, constants
from common.connection import (
    REDIS_DOWN_ERRORS,
    RawConnection,
    RedisClosedConnection,
    WriteRefused,
    pack_commands,
)
from common.embedded_redis import EmbeddedRedis
from common.errors import RemoteError, ServiceUnavailable
from common.log import request_id_var
from common.params import never_suspends
from tests.helpers import serve_in_task, wait_for_async

pytestmark = pytest.mark.timeout(120)

_seen: contextvars.ContextVar[str] = contextvars.ContextVar("seen", default="")


def _service() -> Service:
    svc = Service(f"hot_{uuid.uuid4().hex[:8]}")

    @svc.method
    async def now(x: int) -> int:  # finishes without suspending: replied with the next read
        return x + 1

    @svc.method
    async def later(x: int) -> int:  # suspends: replied by the flusher
        await asyncio.sleep(0)  # a bare yield first
        await asyncio.sleep(0.01)
        return x + 2

    @svc.method
    async def fail_now() -> None:
        raise ValueError("at once")

    @svc.method
    async def fail_later() -> None:
        await asyncio.sleep(0.01)
        raise ValueError("after a wait")

    @svc.method
    async def request_ids(wait: bool) -> list[str | None]:
        before = request_id_var.get()
        _seen.set("leaked?")  # must not reach the next call
        if wait:
            await asyncio.sleep(0.01)
        return [before, request_id_var.get()]

    @svc.method
    async def stamp() -> str | None:  # no await: runs in the read loop, in its own context
        _seen.set("leaked?")
        return request_id_var.get()

    @svc.method
    async def context_is_fresh() -> str:
        return _seen.get()

    @svc.method
    def sync(x: int) -> int:
        return x * 10

    @svc.method
    async def structured(x: int, fail: bool = False) -> list[Any]:
        # Timeouts and task groups bind to the current task: it must be the call's.
        async with asyncio.timeout(5):
            async with asyncio.TaskGroup() as group:
                child = group.create_task(asyncio.sleep(0.01, result=x))
                if fail:
                    group.create_task(_raise_soon())
        task = asyncio.current_task()
        return [child.result(), task is not None and task.get_name().endswith("-consume")]

    return svc


async def _raise_soon() -> None:
    await asyncio.sleep(0)
    raise ValueError("child failed")


@pytest.fixture
async def served(redis_url: str) -> AsyncIterator[tuple[Service, RpcClient]]:
    svc = _service()
    task = await serve_in_task(svc, redis_url)
    async with RpcClient(redis_url) as rpc:
        yield svc, rpc
    svc.request_stop()
    await asyncio.wait_for(task, 15)


def test_pack_commands_is_what_redis_py_sends() -> None:
    commands = [
        ("EVALSHA", "ab" * 20, 3, "sb:{x}:instances", b"\x00\xff\r\n", "", 1.5e12, -3, 0.1),
        ("XACK", "sb:{x}:calls", "workers", b"1-0", bytearray(b"2-0"), "é"),
    ]
    assert pack_commands(commands) == b"".join(Connection().pack_commands(commands))
    # hiredis's packer takes the usual types; a bytearray goes through our own.
    usual = [commands[0], ("XACK", "sb:{x}:calls", "workers", b"1-0", "é")]
    assert pack_commands(usual) == b"".join(Connection().pack_commands(usual))
    with pytest.raises(TypeError):
        pack_commands([("SET", "k", True)])


async def test_raw_connection_times_out_a_read_and_recovers(redis_client: aioredis.Redis) -> None:
    conn = RawConnection(redis_client, timeout=5.0)
    try:
        assert await conn.execute([("PING",), ("ECHO", b"x")]) == [b"PONG", b"x"]
        key = f"never:{uuid.uuid4().hex}"
        await conn.send([("BLPOP", key, 0)])  # no reply, ever
        with pytest.raises(RedisTimeoutError):
            await conn.read(1, timeout=0.3)
        task = asyncio.current_task()
        assert task is not None and task.cancelling() == 0  # not left cancelled
        await asyncio.sleep(0)  # and no cancellation pending either
        # The dropped connection is replaced on the next write.
        assert await conn.execute([("PING",)]) == [b"PONG"]
        # A cancellation from outside stays a cancellation.
        await _cancel_a_blocked_read(conn, key)
        assert await conn.execute([("PING",)]) == [b"PONG"]
    finally:
        await conn.aclose()


async def _cancel_a_blocked_read(conn: RawConnection, key: str) -> None:
    """Cancel, from outside, a read of `conn` waiting on a BLPOP of `key`: it stays a
    cancellation."""
    await conn.send([("BLPOP", key, 0)])
    reader = asyncio.create_task(conn.read(1, timeout=60))
    await asyncio.sleep(0.05)  # (the read under way; the assertion holds either way)
    reader.cancel()
    with pytest.raises(asyncio.CancelledError):
        await reader


@contextlib.asynccontextmanager
async def _unreachable() -> AsyncIterator[RawConnection]:
    """A `RawConnection` to a port nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    nobody = aioredis.Redis(host="127.0.0.1", port=port)
    conn = RawConnection(nobody, timeout=2.0)
    try:
        yield conn
    finally:
        await conn.aclose()
        await nobody.aclose()


async def test_raw_connection_notes_when_redis_failed_it(redis_client: aioredis.Redis) -> None:
    # What `common.lost_touch` reads: a timeout or Redis out of reach is a failure; a
    # close in order (a client kill) or a cancellation is none.
    conn = RawConnection(redis_client, timeout=5.0)
    try:
        (own_id,) = await conn.execute([("CLIENT", "ID")])
        key = f"never:{uuid.uuid4().hex}"
        await conn.send([("BLPOP", key, 0)])
        reader = asyncio.create_task(conn.read(1))
        await asyncio.sleep(0.05)
        await redis_client.client_kill_filter(_id=own_id)
        with pytest.raises(RedisClosedConnection):
            await reader
        assert conn.found_closed_at > -math.inf
        await _cancel_a_blocked_read(conn, key)
        assert conn.failed_at == -math.inf
        await conn.send([("BLPOP", key, 0)])
        with pytest.raises(RedisTimeoutError):
            await conn.read(1, timeout=0.3)
        assert conn.failed_at > -math.inf
    finally:
        await conn.aclose()
    async with _unreachable() as conn:
        with pytest.raises(REDIS_DOWN_ERRORS):
            await conn.execute([("PING",)])
        assert conn.failed_at > -math.inf and conn.found_closed_at == -math.inf


async def test_a_write_whose_connection_redis_drops_while_it_answers_is_refused(
    redis_client: aioredis.Redis,
) -> None:
    # What the RPC client and the worker write apart, entry by entry (Redis drops the
    # connection of a value over its `proto-max-bulk-len`; a client kill stands in for
    # it here): `WriteRefused`, with the write's own error; Redis down is not.
    conn = RawConnection(redis_client, timeout=5.0)
    try:
        (own_id,) = await conn.execute([("CLIENT", "ID")])
        key = f"never:{uuid.uuid4().hex}"
        write = asyncio.create_task(conn.execute_refusable([("BLPOP", key, 0)]))
        await asyncio.sleep(0.05)
        await redis_client.client_kill_filter(_id=own_id)
        with pytest.raises(WriteRefused) as refused:
            await write
        assert isinstance(refused.value.error, RedisClosedConnection)
        assert refused.value.__cause__ is refused.value.error
        assert await conn.execute_refusable([("PING",)]) == [b"PONG"]
    finally:
        await conn.aclose()
    async with _unreachable() as conn:
        with pytest.raises(REDIS_DOWN_ERRORS) as down:
            await conn.execute_refusable([("PING",)])
        assert not isinstance(down.value, WriteRefused)


async def test_handlers_that_finish_at_once_or_suspend(
    served: tuple[Service, RpcClient],
) -> None:
    svc, rpc = served
    name = svc.name
    assert await rpc.call(f"{name}.now", 1) == 2
    assert await rpc.call(f"{name}.later", 1) == 3
    assert await rpc.call(f"{name}.sync", 2) == 20
    for method, message in (("fail_now", "at once"), ("fail_later", "after a wait")):
        with pytest.raises(RemoteError) as info:
            await rpc.call(f"{name}.{method}")
        assert info.value.message == message
        assert info.value.remote_type == "ValueError"
    # Many at once: some start while others are suspended.
    calls = [rpc.call(f"{name}.{'later' if i % 2 else 'now'}", i) for i in range(200)]
    assert await asyncio.gather(*calls) == [i + (2 if i % 2 else 1) for i in range(200)]
    assert svc.worker is not None
    stats = svc.worker.snapshot()["methods"]
    assert stats["now"]["calls"] == 101 and stats["later"]["calls"] == 101
    assert stats["fail_now"]["errors"] == 1 and stats["fail_later"]["errors"] == 1


async def test_handlers_get_a_task_of_their_own(served: tuple[Service, RpcClient]) -> None:
    svc, rpc = served
    assert await rpc.call(f"{svc.name}.structured", 7) == [7, False]
    with pytest.raises(RemoteError) as info:
        await rpc.call(f"{svc.name}.structured", 7, fail=True)
    assert info.value.remote_type == "ExceptionGroup"
    # The worker goes on consuming.
    assert await rpc.call(f"{svc.name}.now", 1) == 2


def test_never_suspends() -> None:
    async def plain(x: int) -> int:
        return x

    async def awaits() -> None:
        await asyncio.sleep(0)

    async def locks() -> int:  # `async with` suspends (its __aenter__ is awaited)
        async with asyncio.Lock():
            return 1

    async def comprehends(xs: Any) -> list[Any]:
        return [x async for x in xs]

    def sync() -> None:
        pass

    assert never_suspends(plain)
    for fn in (awaits, locks, comprehends, sync, print):
        assert not never_suspends(fn), fn


async def test_each_call_has_its_own_context(served: tuple[Service, RpcClient]) -> None:
    svc, rpc = served
    assert svc.worker is not None
    assert {"now", "stamp", "context_is_fresh"} <= svc.worker._inline
    assert await rpc.call(f"{svc.name}.stamp", request_id="req-inline") == "req-inline"
    assert await rpc.call(f"{svc.name}.context_is_fresh") == ""
    for wait in (False, True):
        rid = f"req-{wait}"
        assert await rpc.call(f"{svc.name}.request_ids", wait, request_id=rid) == [rid, rid]
        assert await rpc.call(f"{svc.name}.context_is_fresh") == ""


@pytest.fixture
async def private_redis() -> AsyncIterator[EmbeddedRedis]:
    """A redis-server of this test's own: it gets a password and its clients killed."""
    server = EmbeddedRedis().start()
    try:
        yield server
    finally:
        server.stop()


async def _kill_clients(admin: aioredis.Redis) -> int:
    return int(await admin.execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes"))


async def test_auth_and_db_from_the_url_and_reconnects(private_redis: EmbeddedRedis) -> None:
    admin = aioredis.Redis(port=private_redis.port)
    await admin.config_set("requirepass", "s3cret")  # this connection stays authenticated
    url = f"redis://:s3cret@127.0.0.1:{private_redis.port}/3"
    svc = _service()
    task = await serve_in_task(svc, url)
    try:
        async with RpcClient(url) as rpc:
            assert await rpc.call(f"{svc.name}.now", 1) == 2
            # Everything went to db 3, through authenticated connections.
            db3 = aioredis.Redis(port=private_redis.port, db=3, password="s3cret")
            assert await db3.exists(f"sb:{{{svc.name}}}:calls") == 1
            await db3.aclose()
            for _ in range(3):
                assert await _kill_clients(admin) > 0
                # Calls go on over fresh connections, each authenticated again.
                assert await rpc.call(f"{svc.name}.now", 5, timeout=10) == 6
                results = await asyncio.gather(
                    *(rpc.call(f"{svc.name}.later", i, timeout=10) for i in range(50))
                )
                assert results == [i + 2 for i in range(50)]
            # The lease is renewed by a thread on a connection of its own (common.lease):
            # the same URL, so authenticated and on db 3 too, again after the kills.
            db3 = aioredis.Redis(port=private_redis.port, db=3, password="s3cret")
            leases, instance = constants.leases_key(svc.name), svc.instance_id
            before = await db3.zscore(leases, instance)
            assert before is not None
            await wait_for_async(lambda: _later(db3.zscore(leases, instance), before))
            await db3.aclose()
            named = [c for c in await admin.client_list() if c["name"] == f"{instance}-lease"]
            assert [c["db"] for c in named] == ["3"]
    finally:
        svc.request_stop()
        await asyncio.wait_for(task, 15)
        await admin.aclose()


async def _later(score: Awaitable[float | None], than: float) -> bool:
    found = await score
    return found is not None and found > than


async def test_script_cache_flushed_under_the_client(served: tuple[Service, RpcClient]) -> None:
    svc, rpc = served
    await rpc.redis.script_flush()
    assert await rpc.call(f"{svc.name}.now", 1) == 2  # one caller: the reader's connection
    await rpc.redis.script_flush()
    results = await asyncio.gather(*(rpc.call(f"{svc.name}.later", i) for i in range(50)))
    assert results == [i + 2 for i in range(50)]  # many callers: the writer's connection


async def test_no_instance_fails_fast_at_one_caller(redis_url: str) -> None:
    svc = _service()
    task = await serve_in_task(svc, redis_url)
    svc.request_stop()
    await asyncio.wait_for(task, 15)
    async with RpcClient(redis_url) as rpc:
        for _ in range(3):  # again and again on the same idle reader connection
            with pytest.raises(ServiceUnavailable):
                await rpc.call(f"{svc.name}.now", 1, timeout=30)
