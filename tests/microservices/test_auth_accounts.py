"""The auth domain (`Accounts`) against a real Redis (DB 2), without RPC.

Most tests use cheap argon2 parameters to stay fast; the timing and event-loop
tests use the production defaults, where the cost is what is being tested.
Tokens are checked the way the gateway checks them: by a real `Authenticator`.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import jwt
import pytest
import redis.asyncio as aioredis
from argon2 import PasswordHasher

from common import apikeys, tokens
from common.credentials import Authenticator
from common.errors import BadRequest, ConfigError, Conflict, Forbidden, NotFound, Unauthorized
from common.revocation import REVOKED
from microservices.auth.accounts import Accounts
from microservices.auth.sessions import session_key
from microservices.auth.users import USERNAMES, user_key
from tests.helpers import Clock, db_url, fresh_db, wait_for_async

pytestmark = pytest.mark.timeout(60)

SECRET = "s" * 64
PASSWORD = "correct horse battery"
TTL = 900


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
async def redis(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    async with fresh_db(db_url(redis_url, 2)) as client:
        yield client


def make_accounts(redis: aioredis.Redis, **kwargs: Any) -> Accounts:
    kwargs.setdefault("hasher", fast_hasher())
    return Accounts(redis, ttl=TTL, configured_secret=SECRET, **kwargs)


@pytest.fixture
async def accounts(redis: aioredis.Redis) -> Accounts:
    accounts = make_accounts(redis)
    await accounts.prepare()
    return accounts


@pytest.fixture
async def gateway(redis: aioredis.Redis, accounts: Accounts) -> AsyncIterator[Authenticator]:
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


async def signed_up(accounts: Accounts, name: str, **login: Any) -> tuple[str, dict[str, Any]]:
    """Register `name` and log in: (user id, login answer)."""
    user = await accounts.register(name, PASSWORD)
    return user["user_id"], await accounts.login(name, PASSWORD)


async def refused(gateway: Authenticator, credential: str, message: str) -> None:
    """Poll until the gateway refuses `credential` with `message` (revocations are pushed)."""

    async def check() -> bool:
        try:
            await gateway.authenticate(credential)
        except Unauthorized as exc:
            return exc.message == message
        return False

    await wait_for_async(check, timeout=10)


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
    for bad in ("admin", "Not A Scope"):
        with pytest.raises(ConfigError, match="AUTH_DEFAULT_SCOPES"):
            make_accounts(redis, default_scopes=bad)


# -- login ---------------------------------------------------------------------------


async def test_login_issues_an_access_and_a_refresh_token(
    accounts: Accounts, gateway: Authenticator
) -> None:
    user = await accounts.register("Erin", PASSWORD)
    now = int(time.time())
    answer = await accounts.login("erin", PASSWORD)  # usernames match ignoring case
    assert set(answer) == {"access_token", "token_type", "expires_in", "refresh_token",
                           "refresh_expires_in"}  # fmt: skip
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


async def test_unknown_user_and_wrong_password_take_similar_time(redis: aioredis.Redis) -> None:
    accounts = Accounts(redis, configured_secret=SECRET)  # production argon2 parameters
    await accounts.register("Heidi", PASSWORD)

    async def timed(username: str, password: str) -> float:
        began = time.perf_counter()
        with pytest.raises(Unauthorized):
            await accounts.login(username, password)
        return time.perf_counter() - began

    await timed("nobody", PASSWORD)  # the dummy hash is made on first use
    # The fastest of a few runs: noise from a busy machine only ever adds time.
    wrong = min([await timed("Heidi", "wrong password") for _ in range(5)])
    unknown = min([await timed("nobody", PASSWORD) for _ in range(5)])
    assert 0.5 < unknown / wrong < 2.0, (unknown, wrong)


async def test_login_rehashes_when_parameters_change(redis: aioredis.Redis) -> None:
    user = await make_accounts(redis, hasher=fast_hasher(1)).register("Ivan", PASSWORD)
    old_hash = await redis.hget(user_key(user["user_id"]), "password_hash")
    stronger = make_accounts(redis, hasher=fast_hasher(2))
    await stronger.login("Ivan", PASSWORD)
    new_hash = await redis.hget(user_key(user["user_id"]), "password_hash")
    assert new_hash != old_hash and b"t=2" in new_hash
    await stronger.login("Ivan", PASSWORD)  # still valid, and no further rehash
    assert await redis.hget(user_key(user["user_id"]), "password_hash") == new_hash


async def test_hashing_does_not_block_the_event_loop(redis: aioredis.Redis) -> None:
    accounts = Accounts(redis, configured_secret=SECRET)  # production parameters
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


# -- refresh, logout -------------------------------------------------------------------


async def test_refresh_rotates_the_refresh_token(
    accounts: Accounts, gateway: Authenticator
) -> None:
    user_id, first = await signed_up(accounts, "Lena")
    second = await accounts.refresh(first["refresh_token"])
    assert second["refresh_token"] != first["refresh_token"]
    assert second["access_token"] != first["access_token"]
    old, new = claims_of(first["access_token"]), claims_of(second["access_token"])
    assert new["sid"] == old["sid"] and new["sub"] == user_id and new["jti"] != old["jti"]
    third = await accounts.refresh(second["refresh_token"])  # the new one works in turn
    assert claims_of(third["access_token"])["sid"] == old["sid"]
    for answer in (first, second, third):
        assert (await gateway.authenticate(answer["access_token"])).subject == user_id


async def test_a_reused_refresh_token_revokes_its_whole_family(
    accounts: Accounts, gateway: Authenticator
) -> None:
    _, first = await signed_up(accounts, "Mallory")
    _, elsewhere = await signed_up(accounts, "Mallory2")
    second = await accounts.refresh(first["refresh_token"])
    with pytest.raises(Unauthorized) as caught:
        await accounts.refresh(first["refresh_token"])  # replayed: stolen, or a leak
    assert caught.value.message == "refresh token reused: session revoked"
    with pytest.raises(Unauthorized, match="invalid refresh token"):
        await accounts.refresh(second["refresh_token"])  # the newer one dies with its family
    for answer in (first, second):  # and so do the session's access tokens
        await refused(gateway, answer["access_token"], "token revoked")
        assert (await accounts.introspect(answer["access_token"])) == {"active": False}
    assert (await gateway.authenticate(elsewhere["access_token"])).name == "Mallory2"
    assert (await accounts.refresh(elsewhere["refresh_token"]))["token_type"] == "bearer"


async def test_concurrent_uses_of_one_refresh_token_revoke_the_session(
    accounts: Accounts,
) -> None:
    _, first = await signed_up(accounts, "Nina")
    results = await asyncio.gather(
        *(accounts.refresh(first["refresh_token"]) for _ in range(2)), return_exceptions=True
    )
    winners = [r for r in results if isinstance(r, dict)]
    losers = [r for r in results if isinstance(r, Unauthorized)]
    assert len(winners) == 1 and len(losers) == 1
    assert losers[0].message == "refresh token reused: session revoked"
    with pytest.raises(Unauthorized):
        await accounts.refresh(winners[0]["refresh_token"])


@pytest.mark.parametrize(
    "token", ["", "garbage", "sbr_" + "0" * 32 + "_" + "A" * 43, "sbr_zz_" + "A" * 43]
)
async def test_bad_refresh_tokens_are_invalid(accounts: Accounts, token: str) -> None:
    with pytest.raises(Unauthorized, match="invalid refresh token"):
        await accounts.refresh(token)


async def test_a_forged_refresh_token_of_a_real_session_does_not_revoke_it(
    accounts: Accounts,
) -> None:
    _, first = await signed_up(accounts, "Olga")
    forged = first["refresh_token"][:37] + "A" * 43  # right session, made-up secret
    with pytest.raises(Unauthorized, match="invalid refresh token"):
        await accounts.refresh(forged)
    assert (await accounts.refresh(first["refresh_token"]))["token_type"] == "bearer"


async def test_refresh_tokens_expire(redis: aioredis.Redis) -> None:
    clock = Clock()
    accounts = make_accounts(redis, refresh_ttl=3600, clock=clock)
    _, first = await signed_up(accounts, "Pia")
    clock.offset = 3601
    with pytest.raises(Unauthorized, match="refresh token expired"):
        await accounts.refresh(first["refresh_token"])


async def test_logout_ends_the_session(
    accounts: Accounts, gateway: Authenticator, redis: aioredis.Redis
) -> None:
    _, mine = await signed_up(accounts, "Quinn")
    other = await accounts.login("Quinn", PASSWORD)  # another device
    sid = claims_of(mine["access_token"])["sid"]
    await gateway.authenticate(mine["access_token"])
    assert await accounts.logout(sid) == {"revoked": True}
    assert not await redis.exists(session_key(sid))
    await refused(gateway, mine["access_token"], "token revoked")
    with pytest.raises(Unauthorized, match="invalid refresh token"):
        await accounts.refresh(mine["refresh_token"])
    assert (await gateway.authenticate(other["access_token"])).name == "Quinn"
    assert await accounts.logout(sid) == {"revoked": True}  # idempotent
    with pytest.raises(BadRequest):
        await accounts.logout("not-a-session")


# -- revoke --------------------------------------------------------------------------


async def test_revoke_one_token(accounts: Accounts, gateway: Authenticator) -> None:
    _, first = await signed_up(accounts, "Rita")
    second = await accounts.refresh(first["refresh_token"])  # same session
    jti = claims_of(first["access_token"])["jti"]
    assert await accounts.revoke("token", jti) == {"revoked": True}
    await refused(gateway, first["access_token"], "token revoked")
    assert (await gateway.authenticate(second["access_token"])).name == "Rita"


async def test_revoke_a_user(
    accounts: Accounts, gateway: Authenticator, redis: aioredis.Redis
) -> None:
    user_id, first = await signed_up(accounts, "Sam")
    key = await accounts.create_api_key(user_id, "ci", ["iptv"], None)
    await gateway.authenticate(key["api_key"])
    assert await accounts.revoke("user", user_id) == {"revoked": True}
    await refused(gateway, first["access_token"], "token revoked")
    await refused(gateway, key["api_key"], "API key revoked")
    assert await accounts.list_api_keys(user_id) == []
    with pytest.raises(Unauthorized):
        await accounts.refresh(first["refresh_token"])
    with pytest.raises(Unauthorized, match="revoked"):
        await accounts.login("Sam", PASSWORD)  # until every older token has expired
    await redis.zrem(REVOKED, f"user:{user_id}")  # as when the entry lapses
    assert (await accounts.login("Sam", PASSWORD))["token_type"] == "bearer"


async def test_revoke_a_key_and_bad_requests(accounts: Accounts, gateway: Authenticator) -> None:
    user_id, _ = await signed_up(accounts, "Tara")
    key = await accounts.create_api_key(user_id, "ci", ["iptv"], None)
    await gateway.authenticate(key["api_key"])
    assert await accounts.revoke("key", key["key_id"]) == {"revoked": True}
    await refused(gateway, key["api_key"], "API key revoked")
    with pytest.raises(NotFound):
        await accounts.revoke("key", key["key_id"])
    with pytest.raises(NotFound):
        await accounts.revoke("user", str(uuid.uuid4()))
    with pytest.raises(BadRequest):
        await accounts.revoke("everything", user_id)
    with pytest.raises(BadRequest):
        await accounts.revoke("token", "not a jti")


# -- API keys --------------------------------------------------------------------------


async def test_api_keys_are_created_listed_and_deleted(
    accounts: Accounts, gateway: Authenticator, redis: aioredis.Redis
) -> None:
    user_id, _ = await signed_up(accounts, "Uma")
    before = datetime.now(UTC)
    key = await accounts.create_api_key(user_id, "ci", ["iptv", "nlp.run"], 3600)
    assert set(key) == {"key_id", "api_key", "name", "scopes", "created_at", "expires_at"}
    assert key["api_key"].startswith(f"sbk_{key['key_id']}_") and key["name"] == "ci"
    assert key["scopes"] == ["iptv", "nlp.run"]
    assert before <= key["created_at"] and key["expires_at"] > before
    assert (key["expires_at"] - key["created_at"]).total_seconds() == pytest.approx(3600)
    stored = await redis.hgetall(apikeys.record_key(key["key_id"]))
    assert key["api_key"].split("_", 2)[2].encode() not in b"".join(stored.values())
    principal = await gateway.authenticate(key["api_key"])
    assert principal.kind == "api_key" and principal.subject == user_id
    assert principal.allows("nlp", "run") and not principal.allows("nlp", "train")

    unnamed = await accounts.create_api_key(user_id, None, ["*"], None)
    assert unnamed["name"] == f"key-{unnamed['key_id']}" and unnamed["expires_at"] is None
    listed = await accounts.list_api_keys(user_id)
    assert [k["key_id"] for k in listed] == [key["key_id"], unnamed["key_id"]]
    assert all(set(k) == {"key_id", "name", "scopes", "created_at", "expires_at"} for k in listed)

    other_id, _ = await signed_up(accounts, "Victor")
    with pytest.raises(NotFound):
        await accounts.delete_api_key(other_id, key["key_id"])  # not Victor's
    assert await accounts.delete_api_key(user_id, key["key_id"]) == {"revoked": True}
    await refused(gateway, key["api_key"], "API key revoked")
    assert [k["key_id"] for k in await accounts.list_api_keys(user_id)] == [unnamed["key_id"]]
    with pytest.raises(NotFound):
        await accounts.delete_api_key(user_id, key["key_id"])


async def test_api_key_scopes_must_be_within_the_owners(accounts: Accounts) -> None:
    user_id, _ = await signed_up(accounts, "Wendy")
    await accounts.set_scopes(user_id, ["iptv", "nlp.run"])
    for allowed in (["iptv"], ["iptv.*"], ["iptv.search", "nlp.run"]):
        assert (await accounts.create_api_key(user_id, "ok", allowed, None))["scopes"] == sorted(
            allowed
        )
    for beyond in (["*"], ["nlp"], ["nlp.train"], ["logs"], ["admin"]):
        with pytest.raises(Forbidden, match="beyond"):
            await accounts.create_api_key(user_id, "too wide", beyond, None)
    for malformed in ([], ["Bad Scope"], ["admin.users"], ["iptv."]):
        with pytest.raises(BadRequest):
            await accounts.create_api_key(user_id, "bad", malformed, None)
    for expires_in in (0, -5, 10**12):
        with pytest.raises(BadRequest):
            await accounts.create_api_key(user_id, "bad", ["iptv"], expires_in)
    with pytest.raises(BadRequest):
        await accounts.create_api_key(user_id, "line\nbreak", ["iptv"], None)
    with pytest.raises(NotFound):
        await accounts.create_api_key(str(uuid.uuid4()), "nobody", ["iptv"], None)


async def test_only_admins_may_give_a_key_the_admin_scope(accounts: Accounts) -> None:
    user_id, _ = await signed_up(accounts, "Xena")
    with pytest.raises(Forbidden):
        await accounts.create_api_key(user_id, "admin key", ["admin"], None)
    await accounts.set_roles(user_id, ["user", "admin"])
    key = await accounts.create_api_key(user_id, "admin key", ["admin", "*"], None)
    assert key["scopes"] == ["*", "admin"]


async def test_narrowing_a_user_ends_sessions_and_keys_beyond(
    accounts: Accounts, gateway: Authenticator
) -> None:
    user_id, first = await signed_up(accounts, "Yara")
    await accounts.set_roles(user_id, ["user", "admin"])  # widening: nobody is logged out
    assert (await gateway.authenticate(first["access_token"])).roles == {"user"}
    admin = await accounts.login("Yara", PASSWORD)
    assert claims_of(admin["access_token"])["scope"] == "* admin"
    admin_key = await accounts.create_api_key(user_id, "admin", ["admin"], None)
    iptv_key = await accounts.create_api_key(user_id, "iptv", ["iptv"], None)
    nlp_key = await accounts.create_api_key(user_id, "nlp", ["nlp"], None)

    described = await accounts.set_roles(user_id, ["user"])
    assert described["roles"] == ["user"] and described["scopes"] == ["*"]
    await refused(gateway, admin["access_token"], "token revoked")
    await refused(gateway, admin_key["api_key"], "API key revoked")
    assert (await gateway.authenticate(iptv_key["api_key"])).name == "iptv"

    fresh = await accounts.login("Yara", PASSWORD)
    await accounts.set_scopes(user_id, ["iptv"])
    await refused(gateway, fresh["access_token"], "token revoked")
    await refused(gateway, nlp_key["api_key"], "API key revoked")
    assert [k["name"] for k in await accounts.list_api_keys(user_id)] == ["iptv"]
    assert claims_of((await accounts.login("Yara", PASSWORD))["access_token"])["scope"] == "iptv"
    with pytest.raises(BadRequest):
        await accounts.set_scopes(user_id, ["admin"])  # comes with the role only
    with pytest.raises(BadRequest):
        await accounts.set_roles(user_id, ["root"])


async def test_list_users(accounts: Accounts) -> None:
    await accounts.register("zed", PASSWORD)
    await accounts.register("Amy", PASSWORD)
    users = await accounts.list_users()
    assert [u["username"] for u in users] == ["Amy", "zed"]
    assert set(users[0]) == {"user_id", "username", "roles", "scopes", "created_at"}


# -- signing keys ----------------------------------------------------------------------


async def test_key_rotation_logs_nobody_out(
    accounts: Accounts, gateway: Authenticator, redis: aioredis.Redis
) -> None:
    _, before = await signed_up(accounts, "Zoe")
    old_kid = jwt.get_unverified_header(before["access_token"])["kid"]
    rotated = await accounts.rotate_signing_key()
    assert rotated["kid"] != old_kid
    after = await accounts.refresh(before["refresh_token"])
    assert jwt.get_unverified_header(after["access_token"])["kid"] == rotated["kid"]
    for answer in (before, after):
        assert (await accounts.introspect(answer["access_token"]))["active"] is True
        assert (await gateway.authenticate(answer["access_token"])).name == "Zoe"
    _, keys = await tokens.Keyring(redis).load()
    retire_at = keys[old_kid].retire_at
    assert retire_at is not None
    assert retire_at == pytest.approx(time.time() + TTL + 60, abs=5)
    assert keys[rotated["kid"]].retire_at is None


async def test_a_configured_secret_only_seeds_the_keyring(redis: aioredis.Redis) -> None:
    first = make_accounts(redis)
    await first.prepare()
    rotated = await first.rotate_signing_key()
    restarted = make_accounts(redis)  # JWT_SECRET still set: the keyring wins
    await restarted.prepare()
    _, answer = await signed_up(restarted, "Abe")
    assert jwt.get_unverified_header(answer["access_token"])["kid"] == rotated["kid"]


# -- admin bootstrap ---------------------------------------------------------------------


async def test_admin_bootstrap(accounts: Accounts) -> None:
    assert await accounts.bootstrap_admin("root", PASSWORD) is True
    assert await accounts.bootstrap_admin("root", "another password") is False  # exists
    answer = await accounts.login("root", PASSWORD)
    claims = claims_of(answer["access_token"])
    assert claims["roles"] == ["admin", "user"] and claims["scope"] == "* admin"
    await accounts.register("plain", PASSWORD)
    assert await accounts.bootstrap_admin("Plain", PASSWORD) is False  # never promotes
    assert [u["roles"] for u in await accounts.list_users() if u["username"] == "plain"] == [
        ["user"]
    ]
    with pytest.raises(ConfigError):
        await accounts.bootstrap_admin("admin2", "short")


# -- introspection -----------------------------------------------------------------------


async def test_introspect(accounts: Accounts) -> None:
    user_id, answer = await signed_up(accounts, "Bea")
    active = await accounts.introspect(answer["access_token"])
    assert active["active"] is True and active["sub"] == user_id and active["name"] == "Bea"
    assert active["scope"] == "*" and "jti" in active and "sid" in active
    key = await accounts.create_api_key(user_id, "ci", ["iptv"], None)
    described = await accounts.introspect(key["api_key"])
    assert described["active"] is True and described["kind"] == "api_key"
    assert described["sub"] == user_id and described["scope"] == "iptv"
    for bad in ("garbage", "", answer["refresh_token"], key["api_key"][:-1] + "x"):
        assert await accounts.introspect(bad) == {"active": False}
    await accounts.logout(active["sid"])
    assert await accounts.introspect(answer["access_token"]) == {"active": False}
