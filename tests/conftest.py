"""Shared fixtures: a real embedded redis-server for the whole session."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest
import redis.asyncio as aioredis

from common.embedded_redis import EmbeddedRedis


@pytest.fixture(scope="session")
def redis_server() -> Iterator[EmbeddedRedis]:
    """One private redis-server (AOF on) for the test session."""
    server = EmbeddedRedis(appendonly=True).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def redis_url(redis_server: EmbeddedRedis) -> str:
    return redis_server.url


@pytest.fixture
async def redis_client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url)
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture(scope="session")
def admin_key(redis_url: str) -> str:
    """An API key with every scope, admin included, for tests that are not about access."""
    from tests.helpers import issue_api_key

    return issue_api_key(redis_url, ["*", "admin"])


@pytest.fixture(scope="session")
def auth(admin_key: str) -> dict[str, str]:
    """Headers carrying `admin_key`."""
    return {"Authorization": f"Bearer {admin_key}"}
