"""The auth domain (Accounts, shared_secret) against a real Redis (DB 2), without RPC.

Most tests use cheap argon2 parameters to stay fast; the timing and event-loop
tests use the production defaults, where the cost is what is being tested.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import statistics
import threading
import time
import uuid
from datetime import UTC, datetime
from typing import Any

import jwt
import pytest
import redis.asyncio as aioredis
from argon2 import PasswordHasher

from common.errors import BadRequest, ConfigError, Conflict, Unauthorized
from microservices.auth.accounts import Accounts, Keys, key_id, shared_secret

pytestmark = pytest.mark.timeout(60)

SECRET = "s" * 64
PASSWORD = "correct horse battery"


def fast_hasher(time_cost: int = 1) -> PasswordHasher:
    return PasswordHasher(time_cost=time_cost, memory_cost=8192, parallelism=1)


class CountingHasher(PasswordHasher):
    """A PasswordHasher that records how many verifications and hashes ran, and
    the most that ran at the same time."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.verifications = 0
        self.running = 0
        self.most_running = 0
        self._lock = threading.Lock()

    def _enter(self) -> None:
        with self._lock:
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


@pytest.fixture
async def redis(redis_url: str):
    client = aioredis.Redis.from_url(redis_url.rsplit("/", 1)[0] + "/2")
    await client.flushdb()
    try:
        yield client
    finally:
        await client.flushdb()
        await client.aclose()


@pytest.fixture
def accounts(redis: aioredis.Redis) -> Accounts:
    return Accounts(redis, SECRET, ttl=900, hasher=fast_hasher())


def decode(token: str) -> dict[str, Any]:
    claims: dict[str, Any] = jwt.decode(
        token, SECRET, algorithms=["HS256"], audience="switchboard", issuer="switchboard"
    )
    return claims


def b64(data: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


# -- register ------------------------------------------------------------------------


async def test_register_creates_a_user(accounts: Accounts, redis: aioredis.Redis) -> None:
    before = datetime.now(UTC)
    user = await accounts.register("Alice.B-1_", PASSWORD)
    assert set(user) == {"user_id", "username", "created_at"}
    assert uuid.UUID(user["user_id"]) and user["username"] == "Alice.B-1_"
    assert user["created_at"].tzinfo is UTC
    assert before <= user["created_at"] <= datetime.now(UTC)
    stored = await redis.hgetall(Keys.user(user["user_id"]))
    assert stored[b"password_hash"].startswith(b"$argon2id$")
    assert all(PASSWORD.encode() not in value for value in stored.values())
    assert await redis.hget(Keys.usernames, "alice.b-1_") == user["user_id"].encode()


@pytest.mark.parametrize(
    "username", ["ab", "a" * 65, "has space", "at@sign", "é" * 5, "new\nline", "", "x/y"]
)
async def test_register_rejects_bad_usernames(accounts: Accounts, username: str) -> None:
    with pytest.raises(BadRequest):
        await accounts.register(username, PASSWORD)


@pytest.mark.parametrize("password", ["", "7chars!", "x" * 257])
async def test_register_rejects_bad_passwords(accounts: Accounts, password: str) -> None:
    with pytest.raises(BadRequest):
        await accounts.register("bob", password)


async def test_register_accepts_edge_lengths(accounts: Accounts) -> None:
    await accounts.register("abc", "x" * 8)
    await accounts.register("a" * 64, "x" * 256)


async def test_usernames_are_unique_ignoring_case(accounts: Accounts) -> None:
    await accounts.register("Carol", PASSWORD)
    for taken in ("Carol", "carol", "CAROL"):
        with pytest.raises(Conflict):
            await accounts.register(taken, PASSWORD)


async def test_concurrent_registrations_of_one_name_have_one_winner(
    accounts: Accounts, redis: aioredis.Redis
) -> None:
    results = await asyncio.gather(
        *(accounts.register(name, PASSWORD) for name in ("dave", "Dave", "DAVE", "dAve")),
        return_exceptions=True,
    )
    winners = [r for r in results if isinstance(r, dict)]
    assert len(winners) == 1
    assert all(isinstance(r, Conflict) for r in results if not isinstance(r, dict))
    assert len(await redis.keys(Keys.user("*"))) == 1


# -- login ---------------------------------------------------------------------------


async def test_login_issues_a_signed_jwt(accounts: Accounts) -> None:
    user = await accounts.register("Erin", PASSWORD)
    now = int(time.time())
    answer = await accounts.login("erin", PASSWORD)  # usernames match ignoring case
    assert answer["token_type"] == "bearer" and answer["expires_in"] == 900
    token = answer["access_token"]
    header = jwt.get_unverified_header(token)
    assert header["alg"] == "HS256" and header["kid"] == key_id(SECRET)
    claims = decode(token)
    assert claims["sub"] == user["user_id"] and claims["name"] == "Erin"
    assert now - 1 <= claims["iat"] <= now + 1 and claims["exp"] == claims["iat"] + 900
    assert claims["iss"] == claims["aud"] == "switchboard"
    assert claims["jti"] != decode((await accounts.login("Erin", PASSWORD))["access_token"])["jti"]


@pytest.mark.parametrize(
    ("username", "password"),
    [("Frank", "wrong password"), ("nobody", PASSWORD), ("no such!", PASSWORD), ("Frank", "")],
)
async def test_login_failures_all_look_the_same(
    accounts: Accounts, username: str, password: str
) -> None:
    await accounts.register("Frank", PASSWORD)
    with pytest.raises(Unauthorized) as caught:
        await accounts.login(username, password)
    assert caught.value.message == "invalid username or password"


async def test_unknown_users_are_verified_against_a_dummy_hash(redis: aioredis.Redis) -> None:
    hasher = CountingHasher(time_cost=1, memory_cost=8192, parallelism=1)
    accounts = Accounts(redis, SECRET, hasher=hasher)
    for username in ("ghost", "bad name!"):
        before = hasher.verifications
        with pytest.raises(Unauthorized):
            await accounts.login(username, PASSWORD)
        assert hasher.verifications == before + 1


async def test_unknown_user_and_wrong_password_take_similar_time(redis: aioredis.Redis) -> None:
    accounts = Accounts(redis, SECRET)  # production argon2 parameters
    await accounts.register("Heidi", PASSWORD)

    async def timed(username: str, password: str) -> float:
        began = time.perf_counter()
        with pytest.raises(Unauthorized):
            await accounts.login(username, password)
        return time.perf_counter() - began

    await timed("nobody", PASSWORD)  # the dummy hash is made on first use
    wrong = statistics.median([await timed("Heidi", "wrong password") for _ in range(3)])
    unknown = statistics.median([await timed("nobody", PASSWORD) for _ in range(3)])
    assert 0.5 < unknown / wrong < 2.0, (unknown, wrong)


async def test_login_rehashes_when_parameters_change(redis: aioredis.Redis) -> None:
    user = await Accounts(redis, SECRET, hasher=fast_hasher(1)).register("Ivan", PASSWORD)
    old_hash = await redis.hget(Keys.user(user["user_id"]), "password_hash")
    stronger = Accounts(redis, SECRET, hasher=fast_hasher(2))
    await stronger.login("Ivan", PASSWORD)
    new_hash = await redis.hget(Keys.user(user["user_id"]), "password_hash")
    assert new_hash != old_hash and b"t=2" in new_hash
    await stronger.login("Ivan", PASSWORD)  # still valid, and no further rehash
    assert await redis.hget(Keys.user(user["user_id"]), "password_hash") == new_hash


async def test_hashing_does_not_block_the_event_loop(redis: aioredis.Redis) -> None:
    accounts = Accounts(redis, SECRET)  # production parameters: ~100 ms per hash
    worst_lag = 0.0
    done = asyncio.Event()

    async def ticker() -> None:
        nonlocal worst_lag
        while not done.is_set():
            began = time.perf_counter()
            await asyncio.sleep(0.005)
            worst_lag = max(worst_lag, time.perf_counter() - began - 0.005)

    tick = asyncio.create_task(ticker())
    try:
        await accounts.register("Judy", PASSWORD)
        await accounts.login("Judy", PASSWORD)
    finally:
        done.set()
        await tick
    assert worst_lag < 0.05, worst_lag


async def test_hash_concurrency_is_bounded(redis: aioredis.Redis) -> None:
    hasher = CountingHasher(time_cost=1, memory_cost=8192, parallelism=1)
    accounts = Accounts(redis, SECRET, hasher=hasher, hash_concurrency=2)
    await asyncio.gather(*(accounts.register(f"user{i}", PASSWORD) for i in range(8)))
    await asyncio.gather(*(accounts.login(f"user{i}", PASSWORD) for i in range(8)))
    assert hasher.most_running == 2


async def test_passwords_and_hashes_are_never_logged(
    redis: aioredis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    user = await Accounts(redis, SECRET, hasher=fast_hasher(1)).register("Ken", PASSWORD)
    stronger = Accounts(redis, SECRET, hasher=fast_hasher(2))
    await stronger.login("Ken", PASSWORD)  # rehash path
    with pytest.raises(Unauthorized):
        await stronger.login("Ken", "not the password")
    stored = (await redis.hget(Keys.user(user["user_id"]), "password_hash")).decode()
    assert caplog.records, "expected some log records to check"
    for record in caplog.records:
        text = repr(record.__dict__)
        for secret in (PASSWORD, "not the password", stored, "$argon2"):
            assert secret not in text


# -- verify --------------------------------------------------------------------------


async def test_verify_accepts_its_own_tokens(accounts: Accounts) -> None:
    user = await accounts.register("Leo", PASSWORD)
    claims = accounts.verify((await accounts.login("Leo", PASSWORD))["access_token"])
    assert claims["sub"] == user["user_id"] and claims["name"] == "Leo"


def test_verify_rejects_expired_tokens(redis: aioredis.Redis) -> None:
    past = Accounts(redis, SECRET, ttl=60, clock=lambda: time.time() - 3600)
    token = past.issue("user-id", "mallory")["access_token"]
    with pytest.raises(Unauthorized, match="expired"):
        Accounts(redis, SECRET).verify(token)


def good_claims(**override: Any) -> dict[str, Any]:
    now = int(time.time())
    claims = {
        "sub": "u1",
        "name": "mallory",
        "iat": now,
        "exp": now + 600,
        "iss": "switchboard",
        "aud": "switchboard",
        "jti": uuid.uuid4().hex,
    }
    claims.update(override)
    return {k: v for k, v in claims.items() if v is not None}


def forged_tokens() -> dict[str, str]:
    kid = {"kid": key_id(SECRET)}
    valid = jwt.encode(good_claims(), SECRET, algorithm="HS256", headers=kid)
    head, payload, signature = valid.split(".")
    raised = b64(good_claims(sub="admin"))
    flipped = ("B" if signature[0] == "A" else "A") + signature[1:]
    return {
        "garbage": "not a token",
        "empty": "",
        "tampered payload": f"{head}.{raised}.{signature}",
        "tampered signature": f"{head}.{payload}.{flipped}",
        "alg none": f"{b64({'alg': 'none', 'typ': 'JWT', **kid})}.{payload}.",
        "alg none via pyjwt": jwt.encode(good_claims(), None, algorithm="none", headers=kid),
        "HS512": jwt.encode(good_claims(), SECRET, algorithm="HS512", headers=kid),
        "wrong key": jwt.encode(good_claims(), "k" * 48, algorithm="HS256", headers=kid),
        "wrong audience": jwt.encode(good_claims(aud="other"), SECRET, "HS256", headers=kid),
        "wrong issuer": jwt.encode(good_claims(iss="other"), SECRET, "HS256", headers=kid),
        "no jti": jwt.encode(good_claims(jti=None), SECRET, "HS256", headers=kid),
        "no exp": jwt.encode(good_claims(exp=None), SECRET, "HS256", headers=kid),
        "no kid": jwt.encode(good_claims(), SECRET, algorithm="HS256"),
        "other kid": jwt.encode(good_claims(), SECRET, "HS256", headers={"kid": "k2"}),
        "not yet valid": jwt.encode(
            good_claims(nbf=int(time.time()) + 600), SECRET, "HS256", headers=kid
        ),
    }


def test_the_forgery_baseline_is_valid(accounts: Accounts) -> None:
    # The same recipe with nothing forged passes, so each rejection below is
    # caused by its one defect.
    kid = {"kid": key_id(SECRET)}
    assert accounts.verify(jwt.encode(good_claims(), SECRET, "HS256", headers=kid))["sub"] == "u1"


@pytest.mark.parametrize("case", list(forged_tokens()))
def test_verify_rejects_forged_tokens(accounts: Accounts, case: str) -> None:
    with pytest.raises(Unauthorized):
        accounts.verify(forged_tokens()[case])


# -- signing secret ------------------------------------------------------------------


async def test_configured_secret_wins_and_must_be_long(redis: aioredis.Redis) -> None:
    assert await shared_secret(redis, SECRET) == SECRET
    assert not await redis.exists(Keys.jwt_secret)
    with pytest.raises(ConfigError):
        await shared_secret(redis, "short")


async def test_generated_secret_is_shared_by_all_instances(redis_url: str, redis) -> None:
    clients = [aioredis.Redis.from_url(redis_url.rsplit("/", 1)[0] + "/2") for _ in range(3)]
    try:
        secrets_seen = await asyncio.gather(*(shared_secret(c, None) for c in clients))
    finally:
        for client in clients:
            await client.aclose()
    assert len(set(secrets_seen)) == 1 and len(secrets_seen[0]) >= 64
    assert await redis.get(Keys.jwt_secret) == secrets_seen[0].encode()
    assert await shared_secret(redis, None) == secrets_seen[0]  # a restart keeps it
    # Tokens from one instance verify at another.
    one, other = (Accounts(redis, s) for s in secrets_seen[:2])
    assert other.verify(one.issue("u1", "x")["access_token"])["sub"] == "u1"
