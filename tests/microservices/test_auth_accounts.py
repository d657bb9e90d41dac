"""Users in the auth domain (`Accounts`) against a real Redis (DB 2), without RPC:
registration, passwords and login.

Most tests use cheap argon2 parameters to stay fast; the timing and event-loop
tests use the production defaults, where the cost is what is being tested.
Fixtures and helpers are in `tests/microservices/auth_fixtures.py`.
"""

from __future__ import annotations

import asyncio
import logging
import re
import threading
import time
import uuid
from datetime import UTC, datetime

import jwt
import pytest
import redis.asyncio as aioredis

from common import tokens
from common.connection import as_text
from common.credentials import Authenticator
from common.errors import BadRequest, ConfigError, Conflict, Unauthorized
from microservices.auth.accounts import Accounts
from microservices.auth.throttle import ThrottleRules
from microservices.auth.users import USERNAMES, user_key
from tests.microservices.auth_fixtures import (  # noqa: F401 (fixtures)
    PASSWORD,
    SECRET,
    TTL,
    CountingHasher,
    accounts_fixture,
    claims_of,
    fast_hasher,
    gateway_fixture,
    make_accounts,
    redis_fixture,
)

pytestmark = pytest.mark.timeout(60)


# -- register ------------------------------------------------------------------------


async def test_register_creates_a_user(accounts: Accounts, redis: aioredis.Redis) -> None:
    before = datetime.now(UTC)
    user = await accounts.register("Alice.B-1_", PASSWORD)
    assert set(user) == {"user_id", "username", "roles", "created_at"}
    assert uuid.UUID(user["user_id"]) and user["username"] == "Alice.B-1_"
    assert user["roles"] == ["user"]
    assert user["created_at"].tzinfo is UTC
    assert before <= user["created_at"] <= datetime.now(UTC)
    stored = await redis.hgetall(user_key(user["user_id"]))
    assert stored[b"password_hash"].startswith(b"$argon2id$")
    assert stored[b"roles"] == b"user" and stored[b"scopes"] == b"*"
    assert all(PASSWORD.encode() not in value for value in stored.values())
    assert await redis.hget(USERNAMES, "alice.b-1_") == user["user_id"].encode()
    assert await accounts.me(user["user_id"]) == {
        "user_id": user["user_id"], "username": "Alice.B-1_", "roles": ["user"], "scopes": ["*"],
    }  # fmt: skip


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


async def test_a_password_that_is_not_utf8_text_is_refused(
    accounts: Accounts, redis: aioredis.Redis
) -> None:
    # Bytes that are not UTF-8, read as text with surrogateescape (a CLI's stdin, an
    # environment variable): argon2 cannot hash the lone surrogates they become.
    password = b"\xff\xfe a long passphrase".decode(errors="surrogateescape")
    with pytest.raises(BadRequest, match=r"^password must be UTF-8 text$"):
        await accounts.register("bob", password)
    with pytest.raises(ConfigError, match="AUTH_ADMIN_PASSWORD: password must be UTF-8 text"):
        await accounts.bootstrap_admin("root", password)
    assert not await redis.hlen(USERNAMES)  # type: ignore[misc]


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
    assert len(await redis.keys(user_key("*"))) == 1


async def test_default_scopes_come_from_the_setting(redis: aioredis.Redis) -> None:
    accounts = make_accounts(redis, default_scopes="iptv nlp.run")
    user = await accounts.register("Scoped", PASSWORD)
    assert (await accounts.me(user["user_id"]))["scopes"] == ["iptv", "nlp.run"]
    for bad in ("admin", "Not A Scope", "registry", "iptv registry"):
        with pytest.raises(ConfigError, match="AUTH_DEFAULT_SCOPES"):
            make_accounts(redis, default_scopes=bad)


# -- login ---------------------------------------------------------------------------


async def test_login_issues_an_access_a_refresh_and_a_device_token(
    accounts: Accounts, gateway: Authenticator
) -> None:
    user = await accounts.register("Erin", PASSWORD)
    now = int(time.time())
    answer = await accounts.login("erin", PASSWORD)  # usernames match ignoring case
    assert set(answer) == {"access_token", "token_type", "expires_in", "refresh_token",
                           "refresh_expires_in", "device_token", "device_expires_in"}  # fmt: skip
    assert answer["device_token"].startswith("sbd_") and answer["device_expires_in"] == 30 * 86400
    assert answer["token_type"] == "bearer" and answer["expires_in"] == TTL
    assert answer["refresh_token"].startswith("sbr_") and answer["refresh_expires_in"] == 14 * 86400
    token = answer["access_token"]
    header = jwt.get_unverified_header(token)
    assert header["alg"] == "HS256" and header["kid"] == tokens.key_id(SECRET)
    claims = claims_of(token)
    assert claims["sub"] == user["user_id"] and claims["name"] == "Erin"
    assert claims["roles"] == ["user"] and claims["scope"] == "*"
    assert len(claims["sid"]) == 32 and answer["refresh_token"][4:36] == claims["sid"]
    assert now - 1 <= claims["iat"] <= now + 1 and claims["exp"] == claims["iat"] + TTL
    assert claims["iss"] == claims["aud"] == "switchboard"
    again = claims_of((await accounts.login("Erin", PASSWORD))["access_token"])
    assert again["jti"] != claims["jti"] and again["sid"] != claims["sid"]  # a new session
    principal = await gateway.authenticate(token)
    assert principal.subject == user["user_id"] and principal.session_id == claims["sid"]
    assert principal.allows("iptv", "search") and not principal.allows("admin", None)


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
    accounts = make_accounts(redis, hasher=hasher)
    for username in ("ghost", "bad name!"):
        before = hasher.verifications
        with pytest.raises(Unauthorized):
            await accounts.login(username, PASSWORD)
        assert hasher.verifications == before + 1


async def test_unknown_users_cost_what_a_wrong_password_costs(redis: aioredis.Redis) -> None:
    """An unknown name is verified against a dummy hash made with the very parameters
    of the users' hashes (production argon2 here), so its answer takes as long as a
    wrong password's: checked on the hashes themselves, not by timing."""
    accounts = Accounts(redis, configured_secret=SECRET, throttle=ThrottleRules(max_failures=20))
    user = await accounts.register("Heidi", PASSWORD)
    with pytest.raises(Unauthorized):
        await accounts.login("nobody", PASSWORD)
    dummy = accounts.users.passwords._dummy_hash
    stored = as_text(await redis.hget(user_key(user["user_id"]), "password_hash"))
    assert dummy is not None and dummy != stored
    parameters = re.compile(r"\$argon2id\$v=\d+\$m=\d+,t=\d+,p=\d+\$")
    assert parameters.match(dummy).group() == parameters.match(stored).group()  # type: ignore[union-attr]
    assert not accounts.users.passwords.needs_rehash(dummy)


async def test_login_rehashes_when_parameters_change(redis: aioredis.Redis) -> None:
    user = await make_accounts(redis, hasher=fast_hasher(1)).register("Ivan", PASSWORD)
    old_hash = await redis.hget(user_key(user["user_id"]), "password_hash")
    stronger = make_accounts(redis, hasher=fast_hasher(2))
    await stronger.login("Ivan", PASSWORD)
    new_hash = await redis.hget(user_key(user["user_id"]), "password_hash")
    assert new_hash != old_hash and b"t=2" in new_hash
    await stronger.login("Ivan", PASSWORD)  # still valid, and no further rehash
    assert await redis.hget(user_key(user["user_id"]), "password_hash") == new_hash


async def test_hashing_runs_off_the_event_loop(redis: aioredis.Redis) -> None:
    # Production cost (tens of ms per hash) on the loop's thread would stall every
    # other request of the service meanwhile.
    hasher = CountingHasher()  # argon2's default (production) parameters
    accounts = make_accounts(redis, hasher=hasher)
    await accounts.register("Judy", PASSWORD)
    await accounts.login("Judy", PASSWORD)
    assert hasher.verifications == 1
    assert hasher.threads and threading.get_ident() not in hasher.threads


async def test_hash_concurrency_is_bounded(redis: aioredis.Redis) -> None:
    hasher = CountingHasher(time_cost=1, memory_cost=8192, parallelism=1)
    accounts = make_accounts(redis, hasher=hasher, hash_concurrency=2)
    await asyncio.gather(*(accounts.register(f"user{i}", PASSWORD) for i in range(8)))
    await asyncio.gather(*(accounts.login(f"user{i}", PASSWORD) for i in range(8)))
    assert hasher.most_running == 2


async def test_secrets_are_never_logged(
    redis: aioredis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    user = await make_accounts(redis, hasher=fast_hasher(1)).register("Ken", PASSWORD)
    stronger = make_accounts(redis, hasher=fast_hasher(2))
    await stronger.prepare()
    answer = await stronger.login("Ken", PASSWORD)  # rehash path
    with pytest.raises(Unauthorized):
        await stronger.login("Ken", "not the password")
    renewed = await stronger.refresh(answer["refresh_token"])
    with pytest.raises(Unauthorized):
        await stronger.refresh(answer["refresh_token"])  # reuse: logged as a warning
    key = await stronger.create_api_key(user["user_id"], "ci", ["iptv"], None)
    stored = (await redis.hget(user_key(user["user_id"]), "password_hash")).decode()
    assert caplog.records, "expected some log records to check"
    secrets = [PASSWORD, "not the password", stored, "$argon2", SECRET, key["api_key"]]
    secrets += [answer["access_token"], answer["refresh_token"], renewed["refresh_token"]]
    for record in caplog.records:
        text = repr(record.__dict__)
        for secret in secrets:
            assert secret not in text
