"""What a call carries through Redis, bounded: arguments over `RPC_MAX_PAYLOAD_BYTES`
are refused by the caller's client before anything is sent (`PayloadTooLarge`), a result
over it is answered with `ResultTooLarge`, one the codec cannot encode with
`InvalidResult`, each naming the cause. A value Redis itself refuses (over its own
`proto-max-bulk-len`, set lower) fails its own call, at once, and never the other calls
written with it, nor the worker's flushing and shutdown. Real redis-server."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis

from common import RpcClient, Service, constants
from common.deadletters import DeadLetters
from common.embedded_redis import EmbeddedRedis
from common.errors import InvalidParams, InvalidResult, PayloadTooLarge, ResultTooLarge
from common.settings import MIN_PAYLOAD_LIMIT, Settings, get_settings
from tests.helpers import serve_in_task, wait_for_async
from tests.support.redis_states import private_redis_fixture, small_values  # noqa: F401

pytestmark = pytest.mark.timeout(60)

LIMIT = MIN_PAYLOAD_LIMIT  # 64 KiB: the smallest bound the setting takes


def _build(settings: Settings) -> Service:
    svc = Service(f"payload_{uuid.uuid4().hex[:8]}", settings=settings)

    # No `await` in these: the worker runs them in its read loop, so calls read together
    # finish together and their replies go out in one write.
    @svc.method
    async def text(size: int) -> str:
        return "x" * size

    @svc.method
    async def length(data: str) -> int:
        return len(data)

    @svc.method
    async def ok(n: int) -> int:
        return n

    @svc.method
    async def opaque() -> object:
        return object()

    @svc.method
    async def wordy() -> None:
        raise InvalidParams("bad", details=[{"input": "y" * LIMIT}])

    return svc


@pytest.fixture
async def bounded(redis_url: str) -> AsyncIterator[Service]:
    """A worker whose bound is `LIMIT`."""
    svc = _build(dataclasses.replace(get_settings(), rpc_max_payload_bytes=LIMIT))
    task = await serve_in_task(svc, redis_url)
    yield svc
    svc.request_stop()
    await asyncio.wait_for(task, 30)


@pytest.fixture
def refusing(private_redis: EmbeddedRedis) -> Iterator[str]:
    """The URL of a Redis that takes no value over 1 MB (under RPC_MAX_PAYLOAD_BYTES)."""
    admin = redis.Redis(port=private_redis.port)
    try:
        with small_values(admin):
            yield private_redis.url
    finally:
        admin.close()


def _logged(caplog: pytest.LogCaptureFixture, message: str) -> list[dict[str, Any]]:
    return [r.fields for r in caplog.records if r.getMessage() == message]  # type: ignore[attr-defined]


async def test_a_result_over_the_bound_is_result_too_large_logged_once(
    bounded: Service, rpc: RpcClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="switchboard.worker")
    assert len(await rpc.call(f"{bounded.name}.text", LIMIT - 100, timeout=5)) == LIMIT - 100
    with pytest.raises(ResultTooLarge) as info:
        await rpc.call(f"{bounded.name}.text", LIMIT, timeout=5)
    assert info.value.message.startswith(f"the result of {bounded.name}.text encodes to ")
    assert f"over the {LIMIT}-byte limit (RPC_MAX_PAYLOAD_BYTES)" in info.value.message
    (fields,) = _logged(caplog, "result too large")
    assert fields["method"] == "text" and fields["bytes"] > LIMIT and fields["limit"] == LIMIT
    # An error whose details are over it is answered without them.
    with pytest.raises(InvalidParams) as refused:
        await rpc.call(f"{bounded.name}.wordy", timeout=5)
    assert (refused.value.message, refused.value.details) == ("bad", [])
    assert await rpc.call(f"{bounded.name}.ok", 3, timeout=5) == 3


async def test_a_result_the_codec_cannot_encode_is_invalid_result_naming_the_cause(
    bounded: Service, rpc: RpcClient, caplog: pytest.LogCaptureFixture
) -> None:
    """Not "the handler failed (TypeError)": it did not fail; its result cannot travel."""
    caplog.set_level(logging.ERROR, logger="switchboard.worker")
    with pytest.raises(InvalidResult) as info:
        await rpc.call(f"{bounded.name}.opaque", timeout=5)
    assert info.value.message.startswith(
        f"the result of {bounded.name}.opaque cannot be sent over RPC: cannot encode object"
    )
    assert [f["method"] for f in _logged(caplog, "result not encodable")] == ["opaque"]
    assert _logged(caplog, "handler raised") == []


async def test_arguments_over_the_bound_are_refused_before_anything_is_sent(
    bounded: Service, redis_url: str, redis_client: aioredis.Redis
) -> None:
    settings = dataclasses.replace(get_settings(), rpc_max_payload_bytes=LIMIT)
    stream = constants.call_stream(bounded.name)
    async with RpcClient(redis_url, settings=settings) as rpc:
        assert await rpc.call(f"{bounded.name}.length", "x" * (LIMIT - 200), timeout=5)
        entries = await redis_client.xlen(stream)
        with pytest.raises(PayloadTooLarge) as info:
            await rpc.call(f"{bounded.name}.length", "x" * LIMIT, timeout=5)
        message = info.value.message
        assert message.startswith(f"the arguments of '{bounded.name}.length' encode to ")
        assert message.endswith(f"over the {LIMIT}-byte limit (RPC_MAX_PAYLOAD_BYTES)")
        with pytest.raises(PayloadTooLarge):
            await rpc.send(f"{bounded.name}.length", "x" * LIMIT)
        assert await redis_client.xlen(stream) == entries
        assert not rpc._pending
        assert await rpc.call(f"{bounded.name}.ok", 4, timeout=5) == 4


async def test_a_reply_redis_refuses_fails_its_own_call_only(
    refusing: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A 2 MB result, under our bound but over Redis's: Redis drops the connection of
    the write holding it, with the replies written along with it. Written again whole,
    it would be refused forever: the caller would time out, the other calls too."""
    caplog.set_level(logging.ERROR, logger="switchboard.worker")
    svc = _build(get_settings())
    task = await serve_in_task(svc, refusing)
    try:
        async with RpcClient(refusing) as rpc:
            assert await rpc.call(f"{svc.name}.ok", 0, timeout=5) == 0
            calls = [rpc.call(f"{svc.name}.ok", n, timeout=10) for n in range(1, 6)]
            calls.insert(3, rpc.call(f"{svc.name}.text", 2_000_000, timeout=10))
            answers = await asyncio.gather(*calls, return_exceptions=True)
            big = answers.pop(3)
            assert answers == [1, 2, 3, 4, 5]
            assert isinstance(big, ResultTooLarge), big
            assert "Redis refused it" in big.message and f"{svc.name}.text" in big.message
            (fields,) = _logged(caplog, "reply refused by redis, answered with an error")
            assert fields["method"] == "text" and fields["bytes"] > 2_000_000
            assert await rpc.call(f"{svc.name}.ok", 6, timeout=5) == 6
    finally:
        svc.request_stop()
        await asyncio.wait_for(task, 30)
    assert svc.worker is not None and svc.worker.outbox.unflushed == 0
    assert _logged(caplog, "replies not flushed before shutdown") == []


async def test_a_call_redis_refuses_fails_alone(refusing: str) -> None:
    """2 MB of arguments, under our bound but over Redis's: only that call fails, at
    once, saying so; the calls enqueued in the same write go through."""
    svc = _build(get_settings())
    task = await serve_in_task(svc, refusing)
    try:
        async with RpcClient(refusing) as rpc:
            assert await rpc.call(f"{svc.name}.ok", 0, timeout=5) == 0
            calls = [rpc.call(f"{svc.name}.ok", n, timeout=10) for n in range(1, 6)]
            calls.insert(2, rpc.call(f"{svc.name}.length", "x" * 2_000_000, timeout=10))
            answers = await asyncio.gather(*calls, return_exceptions=True)
            big = answers.pop(2)
            assert answers == [1, 2, 3, 4, 5]
            assert isinstance(big, PayloadTooLarge), big
            assert "Redis refused it" in big.message
            assert await rpc.call(f"{svc.name}.ok", 6, timeout=5) == 6
    finally:
        svc.request_stop()
        await asyncio.wait_for(task, 30)


async def test_a_task_whose_result_cannot_travel_is_dead_lettered_not_run_again(
    bounded: Service, rpc: RpcClient, redis_client: aioredis.Redis
) -> None:
    """Its handler ran, and would return the same: a retry would repeat its effects."""
    letters = DeadLetters(redis_client)
    assert await rpc.submit(f"{bounded.name}.text", (LIMIT,), attempts=3)
    (letter,) = await wait_for_async(lambda: letters.list(bounded.name))
    assert (letter["method"], letter["error"]["code"]) == ("text", "result_too_large")
    assert letter["attempts"] == 1
    assert await redis_client.zcard(constants.retry_key(bounded.name)) == 0


async def test_ints_past_64_bits_travel_both_ways(bounded: Service, rpc: RpcClient) -> None:
    assert await rpc.call(f"{bounded.name}.ok", 2**64, timeout=5) == 2**64
    assert await rpc.call(f"{bounded.name}.ok", -(10**40), timeout=5) == -(10**40)
