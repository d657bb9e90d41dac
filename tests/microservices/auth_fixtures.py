"""Fixtures and helpers shared by the `Accounts` tests (`test_auth_*.py` without RPC).

They use a real Redis (DB 2), flushed for each test, and cheap argon2 parameters.
Tokens are checked the way the gateway checks them: by a real `Authenticator`.
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator
from typing import Any

import jwt
import pytest
import redis.asyncio as aioredis
from argon2 import PasswordHasher

from common.credentials import Authenticator
from microservices.auth.accounts import Accounts
from tests.helpers import db_url, fresh_db

SECRET = "s" * 64
PASSWORD = "correct horse battery"
TTL = 900


class CountingHasher(PasswordHasher):
    """A PasswordHasher that records how many verifications and hashes ran, the most
    that ran at the same time, and the threads they ran on."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.verifications = 0
        self.running = 0
        self.most_running = 0
        self.threads: set[int] = set()
        self._lock = threading.Lock()

    def _enter(self) -> None:
        with self._lock:
            self.threads.add(threading.get_ident())
            self.running += 1
            self.most_running = max(self.most_running, self.running)

    def _leave(self) -> None:
        with self._lock:
            self.running -= 1

    def hash(self, password: str | bytes, *, salt: bytes | None = None) -> str:
        self._enter()
        try:
            return super().hash(password, salt=salt)
        finally:
            self._leave()

    def verify(self, hash: str | bytes, password: str | bytes) -> bool:
        self.verifications += 1
        self._enter()
        try:
            return super().verify(hash, password)
        finally:
            self._leave()


def fast_hasher(time_cost: int = 1) -> PasswordHasher:
    return PasswordHasher(time_cost=time_cost, memory_cost=8192, parallelism=1)


@pytest.fixture(name="redis")
async def redis_fixture(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    async with fresh_db(db_url(redis_url, 2)) as client:
        yield client


def make_accounts(redis: aioredis.Redis, **kwargs: Any) -> Accounts:
    kwargs.setdefault("hasher", fast_hasher())
    return Accounts(redis, ttl=TTL, configured_secret=SECRET, **kwargs)


@pytest.fixture(name="accounts")
async def accounts_fixture(redis: aioredis.Redis) -> Accounts:
    accounts = make_accounts(redis)
    await accounts.prepare()
    return accounts


@pytest.fixture(name="gateway")
async def gateway_fixture(
    redis: aioredis.Redis, accounts: Accounts
) -> AsyncIterator[Authenticator]:
    """What a gateway runs to check credentials."""
    authenticator = Authenticator(redis, configured_secret=None, api_key_cache_ttl=3600)
    await authenticator.start()
    try:
        yield authenticator
    finally:
        await authenticator.close()


def claims_of(token: str) -> dict[str, Any]:
    claims: dict[str, Any] = jwt.decode(
        token, SECRET, algorithms=["HS256"], audience="switchboard", issuer="switchboard"
    )
    return claims


async def signed_up(accounts: Accounts, name: str) -> tuple[str, dict[str, Any]]:
    """Register `name` and log in: (user id, login answer)."""
    user = await accounts.register(name, PASSWORD)
    return user["user_id"], await accounts.login(name, PASSWORD)
