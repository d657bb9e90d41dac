"""The caller's side of RPC under faults: odd replies, Redis down or silent, bad timeouts.

A reply of an unexpected shape fails its own call and nothing else; a `drop` task
never fails or blocks its caller, whatever Redis does; an inbox a client left keeps
an expiry; a timeout of NaN, 0 or less is refused at the call.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import signal
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from common import RpcClient, Service, codec
from common.embedded_redis import EmbeddedRedis
from common.errors import InvalidParams, RemoteError
from common.replies import INBOX_TTL_SECONDS
from tests.helpers import serve_until_live, wait_for_async
from tests.support.calc_service import build, start_worker

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
async def svc(redis_url: str) -> AsyncIterator[Service]:
    service = build(f"calc_{uuid.uuid4().hex[:8]}")

    @service.method
    async def bad_details() -> None:
        await asyncio.sleep(0)
        raise InvalidParams("bad", details=5)  # type: ignore[arg-type]

    task = await serve_until_live(service, redis_url)
    yield service
    service.request_stop()
    await asyncio.wait_for(task, 15)


async def test_a_handlers_odd_error_details_fail_only_its_call(
    svc: Service, rpc: RpcClient
) -> None:
    with pytest.raises(InvalidParams) as info:
        await rpc.call(f"{svc.name}.bad_details", timeout=5)
    assert (info.value.message, info.value.details) == ("bad", [])
    # The client goes on: its inbox reader did not die with that reply.
    assert await rpc.call(f"{svc.name}.add", 1, timeout=5) == 2
    assert rpc._reader is not None and not rpc._reader.done()


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (5, ("remote_error", "malformed error reply")),
        ("boom", ("remote_error", "malformed error reply")),
        (None, ("remote_error", "malformed error reply")),
        ([{"code": "not_found"}], ("remote_error", "malformed error reply")),
        ({"code": 5, "message": ["x"], "type": {}, "retry_after": "soon"}, ("remote_error", "")),
    ],
)
async def test_malformed_error_replies_fail_their_call_and_nothing_else(
    svc: Service,
    rpc: RpcClient,
    redis_client: aioredis.Redis,
    caplog: Any,
    error: Any,
    expected: tuple[str, str],
) -> None:
    caplog.set_level(logging.WARNING, logger="switchboard.client")
    call = asyncio.create_task(rpc.call(f"{svc.name}.sleep", 1, timeout=10))
    await wait_for_async(lambda: rpc._pending)
    (call_id,) = rpc._pending
    garbage = [b"\xc1", codec.packb([1, 2]), codec.packb({"id": [call_id]}), codec.packb("x")]
    # What a buggy worker could write: none of it may stop the inbox reader.
    await redis_client.rpush(
        rpc.inbox, *garbage, codec.packb({"v": 1, "id": call_id, "ok": False, "e": error})
    )
    with pytest.raises(RemoteError) as info:
        await call
    assert (info.value.code, info.value.message) == expected
    assert info.value.retry_after is None
    # One line per reply dropped or malformed, at most.
    warnings = [r.getMessage() for r in caplog.records if r.name == "switchboard.client"]
    assert warnings.count("undecodable reply dropped") == len(garbage)
    assert warnings.count("malformed error reply") == (expected[1] != "")
    assert await rpc.call(f"{svc.name}.add", 1, timeout=5) == 2


async def test_odd_invalid_params_details_are_left_out(
    svc: Service, rpc: RpcClient, redis_client: aioredis.Redis
) -> None:
    call = asyncio.create_task(rpc.call(f"{svc.name}.sleep", 1, timeout=10))
    await wait_for_async(lambda: rpc._pending)
    (call_id,) = rpc._pending
    error = {"code": "invalid_params", "message": "no", "details": [1, {"loc": ["a"]}, "x"]}
    await redis_client.rpush(rpc.inbox, codec.packb({"v": 1, "id": call_id, "e": error}))
    with pytest.raises(InvalidParams) as info:
        await call
    assert info.value.details == [{"loc": ["a"]}]
    assert await rpc.call(f"{svc.name}.add", 1, timeout=5) == 2


async def test_a_timeout_of_nan_is_refused_at_the_call(svc: Service, rpc: RpcClient) -> None:
    with pytest.raises(ValueError, match="timeout must be a number of seconds above 0, not nan"):
        await rpc.call(f"{svc.name}.add", 1, timeout=math.nan)
    with pytest.raises(ValueError, match="ttl must be a number of seconds above 0, not nan"):
        await rpc.submit(f"{svc.name}.add", (1,), ttl=math.nan)
    with pytest.raises(ValueError, match="timeout must be a number"):
        RpcClient("redis://127.0.0.1:1", timeout=math.nan)
    assert not rpc._pending
    # An infinite timeout stays what it was: a call without a bound.
    assert await rpc.call(f"{svc.name}.add", 1, timeout=math.inf) == 2


@pytest.mark.parametrize("seconds", [0, -1, -0.5, -math.inf])
async def test_a_timeout_of_0_or_less_is_refused_at_the_call(
    svc: Service, rpc: RpcClient, seconds: float
) -> None:
    """Not an `RpcTimeout` "did not answer within -1s": the call was never sent."""
    with pytest.raises(
        ValueError, match=f"timeout must be a number of seconds above 0, not {seconds!r}"
    ):
        await rpc.call(f"{svc.name}.add", 1, timeout=seconds)
    with pytest.raises(ValueError, match="ttl must be a number of seconds above 0"):
        await rpc.submit(f"{svc.name}.add", (1,), ttl=seconds)
    with pytest.raises(ValueError, match="timeout must be a number of seconds above 0"):
        RpcClient("redis://127.0.0.1:1", timeout=seconds)
    assert not rpc._pending


async def test_an_inbox_a_client_left_keeps_its_expiry(
    svc: Service, redis_url: str, redis_client: aioredis.Redis
) -> None:
    client = RpcClient(redis_url)
    try:
        assert await client.call(f"{svc.name}.add", 1, timeout=5) == 2
        # Its reader's BLPOP deleted the emptied inbox; the late reply makes it again.
        with pytest.raises(TimeoutError):
            await client.call(f"{svc.name}.sleep", 0.3, timeout=0.05)
    finally:
        await client.close()
    await wait_for_async(lambda: redis_client.exists(client.inbox), timeout=10)
    assert 0 < await redis_client.ttl(client.inbox) <= INBOX_TTL_SECONDS


async def test_a_drop_task_never_fails_or_blocks_its_caller(tmp_path: Path) -> None:
    server = EmbeddedRedis(data_dir=tmp_path).start()
    name = f"calc_{uuid.uuid4().hex[:8]}"
    worker = start_worker(server.url, name)
    assert server.process is not None
    pid = server.process.pid
    try:
        async with RpcClient(server.url) as rpc:
            await wait_for_async(lambda: rpc.call(f"{name}.add", 1, timeout=2), 30)
            key = f"test:drop:{uuid.uuid4().hex}"

            async def drop(value: str) -> bool:
                # 5 s: far under what the enqueue's connection waits for a silent Redis.
                task = rpc.send(f"{name}.record", key=key, value=value, policy="drop")
                return await asyncio.wait_for(task, 5)

            assert await drop("up") is True
            os.kill(pid, signal.SIGSTOP)  # Redis silent: a partition, a stall
            try:
                assert await drop("silent 1") is False
                assert await drop("silent 2") is False
            finally:
                os.kill(pid, signal.SIGCONT)
            assert await wait_for_async(lambda: drop("back"), 10) is True
            recorded = await wait_for_async(lambda: _recorded(rpc, key, "back"), 10)
            # "silent 1" was on its way to Redis already and may run; "silent 2" never went.
            assert "silent 2" not in recorded
            worker.stop()
            server.stop()
            assert await drop("stopped") is False
    finally:
        worker.stop()
        server.stop()


async def _recorded(rpc: RpcClient, key: str, value: str) -> list[str]:
    """The values `calc.record` stored under `key`, once `value` is among them."""
    values = [v.decode() for v in await rpc.redis.lrange(key, 0, -1)]
    return values if value in values else []
