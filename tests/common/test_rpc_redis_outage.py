"""Issue 3, point 5: Redis stopped and restarted (AOF on) under load.

Every process reconnects by itself, calls during the outage fail promptly with a
clear error, and work accepted before the outage completes after it.
"""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import pytest

from common import RpcClient
from common.embedded_redis import EmbeddedRedis
from common.errors import RpcTimeout, ServiceUnavailable
from tests.helpers import ServiceProcess, wait_for_async

pytestmark = pytest.mark.timeout(180)


async def test_redis_restart_under_load(tmp_path: Path) -> None:
    server = EmbeddedRedis(appendonly=True, data_dir=tmp_path).start()
    port, url, name = server.port, server.url, f"calc_{uuid.uuid4().hex[:8]}"
    worker = _calc_worker(url, name)
    try:
        async with RpcClient(url) as client:
            await wait_for_async(lambda: client.call(f"{name}.add", 1, timeout=2), 30)
            # Work accepted before the outage: 40 calls, each running ~1.5 s.
            accepted = [
                asyncio.create_task(client.call(f"{name}.work", i, ms=1500, timeout=60))
                for i in range(40)
            ]
            await wait_for_async(lambda: _taken(client, name, 40))
            server.stop(keep_data=True)  # SIGTERM: Redis fsyncs its AOF and exits

            # During the outage: a clear, prompt error, not a hang until the timeout.
            loop = asyncio.get_running_loop()
            started = loop.time()
            with pytest.raises((ServiceUnavailable, RpcTimeout)) as info:
                await client.call(f"{name}.add", 1, timeout=30)
            assert isinstance(info.value, ServiceUnavailable), info.value
            assert loop.time() - started < 10

            server = EmbeddedRedis(port=port, appendonly=True, data_dir=tmp_path).start()
            assert await asyncio.gather(*accepted) == list(range(40))
            # The same worker and client serve new calls: nobody was restarted.
            assert await wait_for_async(lambda: client.call(f"{name}.add", 41, timeout=2), 30) == 42
            assert worker.alive()
    finally:
        worker.stop()
        server.stop()


def _calc_worker(url: str, name: str) -> ServiceProcess:
    """A `tests.support.calc_service` worker serving RPC service `name`, started."""
    env = {"REDIS_URL": url, "CALC_NAME": name}
    return ServiceProcess(
        ["python", "-m", "tests.support.calc_service"], env=env, name=name
    ).start()


async def _taken(client: RpcClient, name: str, n: int) -> bool:
    """All n calls are in the stream (queued or in flight), i.e. accepted by Redis."""
    from common import constants

    return int(await client.redis.xlen(constants.call_stream(name))) >= n


async def test_redis_restarted_empty_under_a_worker_and_a_client() -> None:
    # No AOF: the restart loses the streams, the consumer groups, the registry.
    server = EmbeddedRedis().start()
    port, url, name = server.port, server.url, f"calc_{uuid.uuid4().hex[:8]}"
    worker = _calc_worker(url, name)
    try:
        async with RpcClient(url) as client:
            await wait_for_async(lambda: client.call(f"{name}.add", 1, timeout=2), 30)
            server.stop()
            server = EmbeddedRedis(port=port).start()
            # The worker registers again and makes its group again; nobody is restarted.
            assert await wait_for_async(lambda: client.call(f"{name}.add", 41, timeout=2), 30) == 42
            assert worker.alive()
    finally:
        worker.stop()
        server.stop()
