"""`common.connection.connect` from a `unix://` URL, against a real redis-server, end to
end through an RPC call (the client's and the worker's bare connections included)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from common import RpcClient, Service
from common.embedded_redis import EmbeddedRedis
from common.settings import Settings
from tests.helpers import serve_in_task

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def socket_redis(tmp_path: Path) -> Iterator[tuple[EmbeddedRedis, Path]]:
    """A redis-server of this test's own, also listening on a unix socket."""
    path = tmp_path / "redis.sock"
    server = EmbeddedRedis(extra_args=["--unixsocket", str(path), "--unixsocketperm", "700"])
    with server:
        yield server, path


async def _calls_work(url: str) -> None:
    svc = Service(f"conn_{uuid.uuid4().hex[:8]}")

    @svc.method
    async def add(a: int, b: int) -> int:
        return a + b

    task = await serve_in_task(svc, url)
    try:
        async with RpcClient(url) as rpc:
            assert await rpc.call(f"{svc.name}.add", 2, 3, timeout=10) == 5
    finally:
        svc.request_stop()
        await task


async def test_a_unix_socket_url_serves_calls(socket_redis: tuple[EmbeddedRedis, Path]) -> None:
    _server, path = socket_redis
    url = Settings.from_env({"REDIS_URL": f"unix://{path}?db=2"}).require_redis_url()
    await _calls_work(url)
    with redis.Redis(unix_socket_path=str(path), db=2) as db2:
        assert db2.dbsize() > 0  # the URL's db, over the socket
