"""Fixtures and helpers shared by the `tests/common/test_credentials*.py` modules:
an `Authenticator` on a fresh Redis database (DB 8) and a clock moved on demand."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from common.credentials import Authenticator
from common.errors import Unauthorized
from common.tokens import SigningKey
from tests.helpers import Clock, db_url, fresh_db

SECRET = "s" * 64
KEY = SigningKey.create(SECRET, now=0)  # the keyring's first key, made from SECRET
OWNER = str(uuid.uuid4())


@pytest.fixture(name="redis")
async def redis_fixture(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    async with fresh_db(db_url(redis_url, 8)) as client:
        yield client


@pytest.fixture(name="clock")
def clock_fixture() -> Clock:
    return Clock()


@pytest.fixture(name="auth")
async def auth_fixture(redis: aioredis.Redis, clock: Clock) -> AsyncIterator[Authenticator]:
    authenticator = Authenticator(
        redis, configured_secret=SECRET, api_key_cache_ttl=3600, clock=clock
    )
    await authenticator.start()
    try:
        yield authenticator
    finally:
        await authenticator.close()


async def rejected(auth: Authenticator, credential: str) -> str:
    """The message of the `Unauthorized` that `credential` gets."""
    with pytest.raises(Unauthorized) as caught:
        await auth.authenticate(credential)
    return caught.value.message
