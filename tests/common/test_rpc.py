"""RPC core against a real redis-server: results, errors, timeouts, liveness, shutdown."""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import signal
import uuid
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from common import RpcClient, Service
from common.errors import (
    InvalidParams,
    MethodNotFound,
    RemoteError,
    RpcTimeout,
    ServiceUnavailable,
)
from tests.helpers import serve_until_live, wait_for_async
from tests.support.calc_service import Point, build, start_worker


@pytest.fixture
async def calc(redis_url: str) -> AsyncIterator[Service]:
    svc = build(f"calc_{uuid.uuid4().hex[:8]}")
    task = await serve_until_live(svc, redis_url)
    yield svc
    svc.request_stop()
    await asyncio.wait_for(task, 15)


async def test_call_returns_result(calc: Service, rpc: RpcClient) -> None:
    assert await rpc.call(f"{calc.name}.add", 2, b=5) == 7
    assert await rpc.call(f"{calc.name}.add", a=40) == 41


async def test_arguments_are_coerced_by_type_hints(calc: Service, rpc: RpcClient) -> None:
    assert await rpc.call(f"{calc.name}.add", "2", b="3") == 5


@pytest.mark.parametrize(
    ("args", "kwargs", "fragment"),
    [
        ((), {}, "missing a required argument"),
        ((1,), {"c": 2}, "unexpected keyword argument"),
        ((), {"a": "two"}, "valid integer"),
        ((1, 2, 3), {}, "too many positional"),
        ((), {"a": True}, "a boolean is not a number"),  # (pydantic's lax mode reads 1)
        ((True, 2), {}, "a boolean is not a number"),  # (`MethodSpec.bind`'s shortcut)
    ],
)
async def test_invalid_params(calc: Service, rpc: RpcClient, args, kwargs, fragment) -> None:
    with pytest.raises(InvalidParams) as info:
        await rpc.call(f"{calc.name}.add", *args, **kwargs)
    assert fragment in info.value.message


@pytest.mark.parametrize("positional", [False, True])
async def test_invalid_params_name_the_field(
    calc: Service, rpc: RpcClient, positional: bool
) -> None:
    # Every argument given positionally takes `MethodSpec.bind`'s shortcut: same answer.
    with pytest.raises(InvalidParams) as info:
        if positional:
            await rpc.call(f"{calc.name}.add", "x", "y")
        else:
            await rpc.call(f"{calc.name}.add", a="x", b="y")
    assert {d["field"] for d in info.value.details} == {"a", "b"}
    assert await rpc.call(f"{calc.name}.add", "2", "3") == 5


async def test_unknown_method_and_service(calc: Service, rpc: RpcClient) -> None:
    with pytest.raises(MethodNotFound):
        await rpc.call(f"{calc.name}.nope")
    with pytest.raises(MethodNotFound):
        await rpc.call("never_registered_service.x")
    with pytest.raises(MethodNotFound):
        await rpc.call("no_dot_here")


async def test_handler_exception_is_remote_error_and_worker_survives(
    calc: Service, rpc: RpcClient
) -> None:
    with pytest.raises(RemoteError) as info:
        await rpc.call(f"{calc.name}.fail", message="kaput")
    assert info.value.remote_type == "ValueError"
    assert info.value.message == "kaput"
    assert await rpc.call(f"{calc.name}.add", 1) == 2


async def test_service_error_keeps_its_code(calc: Service, rpc: RpcClient) -> None:
    with pytest.raises(RemoteError) as info:
        await rpc.call(f"{calc.name}.missing", key="k1")
    assert info.value.code == "not_found"
    assert info.value.remote_type == "NotFound"


async def test_timeout_never_waits_past_deadline(
    calc: Service, rpc: RpcClient, tmp_path: Path
) -> None:
    # The handler cannot answer before the test lets it (after the timeout): a caller
    # that waited for the answer past its deadline would never get its RpcTimeout.
    gate = tmp_path / "gate"
    try:
        with pytest.raises(RpcTimeout):
            await rpc.call(f"{calc.name}.gate", str(gate), timeout=0.3)
        assert calc.worker is not None and calc.worker.inflight > 0  # still unanswered
    finally:
        gate.write_text("late")
    assert isinstance(RpcTimeout(), TimeoutError)


async def test_sync_handler_runs_in_thread_pool(calc: Service, rpc: RpcClient) -> None:
    thread = await rpc.call(f"{calc.name}.blocking", seconds=0.05)
    assert thread.startswith(f"{calc.name}-handler")
    # Blocking handlers do not block the loop: async calls are answered meanwhile.
    slow = asyncio.create_task(rpc.call(f"{calc.name}.blocking", seconds=1.0))
    assert await rpc.call(f"{calc.name}.add", 1, timeout=0.9) == 2
    await slow


async def test_request_id_travels_with_the_call(calc: Service, rpc: RpcClient) -> None:
    answer = await rpc.call(f"{calc.name}.whoami", request_id="req-123")
    assert answer == {"request_id": "req-123", "instance": calc.instance_id}


async def test_codec_types_round_trip(calc: Service, rpc: RpcClient) -> None:
    values = {
        "when": dt.datetime(2026, 1, 2, 3, 4, 5, 678000, tzinfo=dt.timezone(dt.timedelta(hours=2))),
        "day": dt.date(2026, 2, 28),
        "ident": uuid.uuid4(),
        "amount": Decimal("12.3400"),
        "blob": b"\x00\xffbytes",
        "point": Point(3, 4),
    }
    assert await rpc.call(f"{calc.name}.echo", **values) == values


async def test_send_is_fire_and_forget(
    calc: Service, rpc: RpcClient, redis_client: aioredis.Redis
) -> None:
    key = f"test:send:{uuid.uuid4().hex}"
    assert await rpc.send(f"{calc.name}.record", key=key, value="v1") is True
    assert await wait_for_async(lambda: redis_client.lrange(key, 0, -1)) == [b"v1"]


async def test_unavailable_at_once_without_instance(rpc: RpcClient, redis_url: str) -> None:
    svc = build(f"calc_{uuid.uuid4().hex[:8]}")
    task = await serve_until_live(svc, redis_url)
    assert await rpc.call(f"{svc.name}.add", 1) == 2
    svc.request_stop()
    await asyncio.wait_for(task, 15)
    # At once, not at the 10 s timeout: neither left waiting for a worker (an RpcTimeout)
    # nor held for one to come back (`common.rejoin`: this client never lost Redis).
    with pytest.raises(ServiceUnavailable, match="no live instance"):
        await rpc.call(f"{svc.name}.add", 1, timeout=10)
    assert rpc.parked_total == 0


async def test_expired_calls_are_skipped_not_run(rpc: RpcClient, redis_url: str) -> None:
    svc = build(f"calc_{uuid.uuid4().hex[:8]}", concurrency=1)
    task = await serve_until_live(svc, redis_url)
    try:
        busy = asyncio.create_task(rpc.call(f"{svc.name}.sleep", seconds=0.6))
        await asyncio.sleep(0.1)  # let the only slot be taken
        with pytest.raises(RpcTimeout):
            await rpc.call(f"{svc.name}.sleep", seconds=0.0, timeout=0.2)
        assert await busy == 0.6
        assert svc.worker is not None
        await wait_for_async(lambda: svc.worker.stats.expired == 1)
        assert await rpc.call(f"{svc.name}.run_count", method="sleep") == 1
    finally:
        svc.request_stop()
        await asyncio.wait_for(task, 15)


async def test_one_inbox_per_client_and_no_key_per_call(
    calc: Service, redis_url: str, redis_client: aioredis.Redis
) -> None:
    async with RpcClient(redis_url) as client:
        await client.call(f"{calc.name}.add", 0)
        keys_before = set(await redis_client.keys("*"))
        results = await asyncio.gather(*(client.call(f"{calc.name}.add", i) for i in range(300)))
        assert results == [i + 1 for i in range(300)]
        new_keys = set(await redis_client.keys("*")) - keys_before
        assert all(not k.startswith(b"sb:inbox:") for k in new_keys)
        assert len(new_keys) <= 1  # at most the (re-created) inbox list, never one per call


async def test_worker_process_graceful_shutdown_finishes_inflight(redis_url: str) -> None:
    name = f"calc_{uuid.uuid4().hex[:8]}"
    proc = start_worker(redis_url, name)
    try:
        async with RpcClient(redis_url) as client:
            await wait_for_async(lambda: client.call(f"{name}.add", 1, timeout=1), timeout=20)
            inflight = asyncio.create_task(client.call(f"{name}.sleep", seconds=1.0, timeout=10))
            await asyncio.sleep(0.3)
            proc.send_signal(signal.SIGTERM)
            assert await inflight == 1.0
            assert proc.process is not None
            assert await asyncio.to_thread(proc.process.wait, 15) == 0
            with pytest.raises(ServiceUnavailable):
                await client.call(f"{name}.add", 1)
    finally:
        proc.stop()


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"a": "\ud800"}, "lone surrogate"),
        ({"a": {"\udfff": 1}}, "lone surrogate"),
        ({"a": functools.reduce(lambda inner, _: [inner], range(2000), [])}, "recursion limit"),
    ],
)
async def test_arguments_that_cannot_travel_are_invalid_params(
    calc: Service, rpc: RpcClient, kwargs: dict[str, object], fragment: str
) -> None:
    with pytest.raises(InvalidParams, match=fragment):
        await rpc.call(f"{calc.name}.add", **kwargs)
    with pytest.raises(InvalidParams, match=fragment):
        await rpc.send(f"{calc.name}.add", **kwargs)
    assert await rpc.call(f"{calc.name}.add", 1, b=1) == 2  # the client is unharmed
