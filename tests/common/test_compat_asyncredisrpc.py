"""The asyncredisrpc adapter: the real asyncredisrpc client against a real worker process."""

from __future__ import annotations

import asyncio
import json
import signal
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any
from urllib.parse import urlsplit

import pytest
import redis
import redis.asyncio as aioredis
from asyncredisrpc.client import AsyncClient  # type: ignore[import-untyped]

from common.embedded_redis import EmbeddedRedis
from tests.helpers import ServiceProcess, wait_for, wait_for_async
from tests.support.redis_states import out_of_memory, private_redis_fixture  # noqa: F401

pytestmark = pytest.mark.timeout(60)

CONCURRENCY = 16


class Worker:
    def __init__(self, name: str, queue: str, process: ServiceProcess) -> None:
        self.name = name
        self.queue = queue
        self.key = f"asyncredisrpc:{queue}"
        self.process = process


def _start(redis_url: str, **env: str) -> Worker:
    name = f"compat_{uuid.uuid4().hex[:8]}"
    queue = f"legacy-{uuid.uuid4().hex[:8]}"
    process = ServiceProcess(
        ["python", "-m", "tests.support.compat_service"],
        env={
            "REDIS_URL": redis_url,
            "COMPAT_NAME": name,
            "COMPAT_QUEUE": queue,
            "COMPAT_CONCURRENCY": str(CONCURRENCY),
            **env,
        },
        name=name,
    ).start()
    probe = redis.Redis.from_url(redis_url)
    try:
        # The adapter starts in an on_startup hook, before the instance registers.
        wait_for(lambda: probe.zcard(f"sb:{{{name}}}:instances"), timeout=20)
    except AssertionError:
        process.stop()
        raise AssertionError(f"{name} did not start:\n{process.log_tail()}") from None
    finally:
        probe.close()
    return Worker(name, queue, process)


@pytest.fixture(scope="module")
def worker(redis_url: str) -> Iterator[Worker]:
    started = _start(redis_url)
    yield started
    started.process.stop()


async def _client(redis_url: str, queue: str) -> AsyncClient:
    url = urlsplit(redis_url)
    client = AsyncClient(queue, url.hostname, url.port)
    await client.connect()
    return client


@pytest.fixture
async def client(redis_url: str, worker: Worker) -> AsyncIterator[AsyncClient]:
    c = await _client(redis_url, worker.queue)
    yield c
    await c.redis.aclose()


async def call(client: AsyncClient, name: str, *args: Any, **kwargs: Any) -> tuple[int, Any]:
    # asyncredisrpc's call waits for its reply forever: bound it so a missing reply fails.
    result: tuple[int, Any] = await asyncio.wait_for(client.call(name, *args, **kwargs), 10)
    return result


async def test_call_with_args_and_kwargs(client: AsyncClient) -> None:
    assert await call(client, "add", 2, b=5) == (0, 7)
    assert await call(client, "add", a=40) == (0, 41)
    assert await call(client, "add", "2") == (0, 3)  # coerced by the type hints


async def test_sync_handler(client: AsyncClient) -> None:
    assert await call(client, "multiply", 3, b=4) == (0, 12.0)


async def test_dict_result_is_json(client: AsyncClient) -> None:
    error, result = await call(client, "profile", "ann", verbose=True)
    assert error == 0
    assert result == {
        "user": "ann",
        "verbose": True,
        "since": "2024-05-01T12:30:00+00:00",
        "id": "00000000-0000-0000-0000-000000000007",
        "balance": "12.50",
        "tags": ["a", "é"],
    }


async def test_unknown_method(client: AsyncClient, worker: Worker) -> None:
    assert await call(client, "nope", 1) == (
        1,
        f"MethodNotFound: {worker.name} has no method 'nope'",
    )
    # The qualified Switchboard name is not an asyncredisrpc name.
    error, _ = await call(client, f"{worker.name}.add", 1)
    assert error == 1


async def test_handler_exceptions_answer_error_and_keep_serving(client: AsyncClient) -> None:
    assert await call(client, "fail", "kaput") == (1, "ValueError: kaput")
    assert await call(client, "fail") == (1, "ValueError: boom")
    assert await call(client, "missing", "k") == (1, "NotFound: no such thing: k")
    error, result = await call(client, "unencodable")
    assert error == 1
    assert result.startswith("InvalidResult: the result of unencodable cannot be sent as JSON")
    assert await call(client, "add", 1, 1) == (0, 2)


@pytest.mark.parametrize(
    ("args", "kwargs", "fragment"),
    [
        ((), {}, "missing a required argument"),
        ((1,), {"c": 2}, "unexpected keyword argument"),
        (("two",), {}, "a: Input should be a valid integer"),
        ((1, 2, 3), {}, "too many positional"),
    ],
)
async def test_invalid_params(client: AsyncClient, worker: Worker, args, kwargs, fragment) -> None:
    error, result = await call(client, "add", *args, **kwargs)
    assert error == 1
    assert result.startswith(f"InvalidParams: {worker.name}.add: ")
    assert fragment in result


async def test_200_concurrent_calls(redis_url: str, worker: Worker) -> None:
    # One AsyncClient holds a pooled connection per waiting call, and redis-py's
    # pool stops at 100 connections: 200 calls in flight take several clients.
    clients = [await _client(redis_url, worker.queue) for _ in range(4)]
    try:
        replies = await asyncio.gather(
            *(call(clients[n % 4], "slow", n, seconds=0.05) for n in range(200))
        )
        assert replies == [(0, n) for n in range(200)]
        _, stats = await call(clients[0], "slow_stats")
        assert 1 < stats["peak"] <= CONCURRENCY
    finally:
        for c in clients:
            await c.redis.aclose()


async def test_wire_format_and_reply_expiry(redis_client: aioredis.Redis, worker: Worker) -> None:
    req_id = uuid.uuid4().hex
    request = {"id": req_id, "name": "add", "args": [1], "kwargs": {"b": 2}}
    await redis_client.rpush(worker.key, json.dumps(request))
    reply_key = f"{worker.key}:{req_id}"
    await wait_for_async(lambda: redis_client.exists(reply_key))
    assert 0 < await redis_client.ttl(reply_key) <= 60
    assert await redis_client.lrange(reply_key, 0, -1) == [b'{"error": 0, "result": 3}']
    await redis_client.delete(reply_key)


async def test_malformed_requests_are_dropped(
    redis_client: aioredis.Redis, client: AsyncClient, worker: Worker
) -> None:
    await redis_client.rpush(
        worker.key,
        b"not json",
        b"\xff\xfe",
        json.dumps(["a", "list"]),
        json.dumps({"name": "add", "args": [1]}),  # no id: nowhere to answer
        json.dumps({"id": 7, "name": "add", "args": [1]}),  # not asyncredisrpc's id
    )
    # An id but a malformed body is answered.
    req_id = uuid.uuid4().hex
    await redis_client.rpush(worker.key, json.dumps({"id": req_id, "name": ["add"]}))
    popped = await redis_client.blpop([f"{worker.key}:{req_id}"], timeout=10)
    assert popped is not None
    reply = json.loads(popped[1])
    assert reply["error"] == 1
    assert "malformed request" in reply["result"]
    # The consumer survived and took everything; no reply was written for the rest.
    assert await call(client, "add", 1) == (0, 2)
    assert await redis_client.llen(worker.key) == 0
    assert [k async for k in redis_client.scan_iter(f"{worker.key}:*")] == []


async def test_sigterm_finishes_in_flight_and_answers_abandoned(redis_url: str) -> None:
    worker = _start(redis_url, SHUTDOWN_GRACE="1.0")
    client = await _client(redis_url, worker.queue)
    try:
        quick = asyncio.create_task(call(client, "slow", 1, seconds=0.5))
        stuck = asyncio.create_task(call(client, "slow", 2, seconds=30))
        # Both handlers are running before the signal.
        await wait_for_async(lambda: _started(client, 2))
        worker.process.send_signal(signal.SIGTERM)
        assert await quick == (0, 1)
        assert await stuck == (
            1,
            f"ServiceUnavailable: {worker.name} shut down before the call finished",
        )
        assert worker.process.process is not None
        assert await asyncio.to_thread(worker.process.process.wait, 15) == 0
    finally:
        worker.process.stop(signal.SIGKILL)
        await client.redis.aclose()


async def _started(client: AsyncClient, n: int) -> bool:
    _, stats = await call(client, "slow_stats")
    return bool(stats["started"] >= n)


async def test_redis_refusing_is_logged_once_per_loop_and_loses_no_reply(
    private_redis: EmbeddedRedis,
) -> None:
    url = private_redis.url
    admin = redis.Redis.from_url(url)
    refused = _start(url)
    c = await _client(url, refused.queue)
    try:
        # The queue's key of the wrong type: every pop fails (WRONGTYPE), for a while.
        admin.set(refused.key, "not a list")
        wait_for(lambda: refused.process.log_records("asyncredisrpc pop failed, retrying"))
        await asyncio.sleep(1.0)  # retries at 0.05, 0.1, 0.2, 0.4, 0.8 s of backoff
        admin.delete(refused.key)
        assert await call(c, "add", 1, 2) == (0, 3)
        assert len(refused.process.log_records("asyncredisrpc pop failed, retrying")) == 1
        assert refused.process.log_records("asyncredisrpc pop recovered")

        # Redis at maxmemory as the handler answers: the reply is retried, not lost.
        reply = asyncio.create_task(call(c, "slow", 7, seconds=1.0))
        await asyncio.sleep(0.3)  # the request is taken well before the handler answers
        assert admin.llen(refused.key) == 0
        with out_of_memory(admin):
            wait_for(lambda: refused.process.log_records("asyncredisrpc reply failed, retrying"))
            await asyncio.sleep(1.0)
        assert await reply == (0, 7)
        assert len(refused.process.log_records("asyncredisrpc reply failed, retrying")) == 1
        assert refused.process.alive()
    finally:
        await c.redis.aclose()
        admin.close()
        refused.process.stop()
