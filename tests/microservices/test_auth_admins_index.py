"""The index of admins (`users.ADMINS`) behind the last-admin check: kept with every
write of roles, built for users from before it, safe beside old instances, and a
demotion that neither grows with the number of users nor gives way to registrations
(real Redis, no RPC)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime

import pytest
import redis.asyncio as aioredis
from argon2 import PasswordHasher

from common.connection import as_text
from common.embedded_redis import EmbeddedRedis
from common.errors import Conflict
from microservices.auth.accounts import Accounts
from microservices.auth.users import ADMINS, ADMINS_INDEXED, USERNAMES, user_key
from tests.helpers import db_url
from tests.microservices.auth_fixtures import (  # noqa: F401 (fixtures)
    PASSWORD,
    accounts_fixture,
    make_accounts,
    redis_fixture,
    signed_up,
)

pytestmark = pytest.mark.timeout(60)


async def _index(redis: aioredis.Redis) -> set[str]:
    return {as_text(m) for m in await redis.smembers(ADMINS)}


async def _truth(accounts: Accounts) -> set[str]:
    """The ids of the users whose own record has the admin role."""
    return {u["user_id"] for u in await accounts.list_users() if "admin" in u["roles"]}


async def _old_users(redis: aioredis.Redis, roles: Iterable[str | None]) -> list[str]:
    """Users written as the code from before the index wrote them (no index entry);
    a None role: a user from before roles. Their ids, in order."""
    ids = []
    async with redis.pipeline(transaction=False) as pipe:
        for n, role in enumerate(roles):
            user_id, name = str(uuid.uuid4()), f"old{n}"
            record = {"user_id": user_id, "username": name, "password_hash": "x"}
            record["created_at"] = datetime.now(UTC).isoformat()
            if role is not None:
                record.update(roles=role, scopes="*")
            pipe.hset(USERNAMES, name, user_id)
            pipe.hset(user_key(user_id), mapping=record)  # type: ignore[arg-type]
            ids.append(user_id)
        await pipe.execute()
    return ids


async def test_every_write_of_roles_keeps_the_index(
    accounts: Accounts, redis: aioredis.Redis
) -> None:
    await accounts.bootstrap_admin("root", PASSWORD)
    plain, _ = await signed_up(accounts, "plain")
    created = await accounts.create_admin("ops", PASSWORD)  # the CLI's create-admin
    assert await _index(redis) == await _truth(accounts) and len(await _index(redis)) == 2
    await accounts.set_roles(plain, ["admin", "user"])
    assert await _index(redis) == await _truth(accounts) and plain in await _index(redis)
    await accounts.set_roles(created["user_id"], ["user"])
    await accounts.set_roles(plain, ["user"])
    assert await _index(redis) == await _truth(accounts) and len(await _index(redis)) == 1
    await accounts.set_roles(plain, ["user"])  # not an admin: no last-admin check
    await accounts.set_scopes(plain, ["iptv"])
    assert await _index(redis) == await _truth(accounts)


async def test_a_demotion_does_not_give_way_to_registrations(
    accounts: Accounts, redis_url: str
) -> None:
    """Registrations keep landing while an admin is demoted (many in flight, on another
    instance's pool): the demotion neither retries nor fails because of them."""
    first, _ = await signed_up(accounts, "first")
    await accounts.bootstrap_admin("root", PASSWORD)
    await accounts.set_roles(first, ["user", "admin"])
    client = aioredis.Redis.from_url(db_url(redis_url, 2))
    # Hashing next to nothing: a registration is then a couple of Redis round trips.
    cheap = PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)
    elsewhere = make_accounts(client, hasher=cheap, hash_concurrency=64)
    registered, target = 0, 200
    reached, stop = asyncio.Event(), asyncio.Event()

    async def register(worker: int) -> None:
        nonlocal registered
        n = 0
        while not stop.is_set():
            await elsewhere.register(f"r{worker}-{n}", PASSWORD)
            registered, n = registered + 1, n + 1
            if registered >= target:
                reached.set()

    workers = [asyncio.ensure_future(register(w)) for w in range(50)]
    try:
        await reached.wait()  # in full flow before the demotion starts...
        demoted = await accounts.set_roles(first, ["user"])
        reached.clear()
        target = registered + 50
        await reached.wait()  # ...and still flowing after it
    finally:
        stop.set()
        results = await asyncio.gather(*workers, return_exceptions=True)
        await client.aclose()
    assert demoted["roles"] == ["user"]
    assert not [r for r in results if isinstance(r, BaseException)]
    root = await accounts.users.find("root")
    assert root is not None and await _index(accounts.redis) == {root.user_id}


async def test_the_index_is_built_from_users_from_before_it(redis: aioredis.Redis) -> None:
    root, ops, plain, ancient = await _old_users(redis, ["admin user", "admin user", "user", None])
    accounts = make_accounts(redis)
    await accounts.prepare()  # the auth service's start-up
    assert await _index(redis) == {root, ops}
    assert await redis.exists(ADMINS_INDEXED)
    assert (await accounts.set_roles(ops, ["user"]))["roles"] == ["user"]
    with pytest.raises(Conflict, match="the last admin cannot lose the admin role"):
        await accounts.set_roles(root, ["user"])
    await accounts.set_roles(ancient, ["user", "admin"])  # a user from before roles
    assert await _index(redis) == {root, ancient} == await _truth(accounts)
    assert plain not in await _index(redis)


async def test_a_demotion_before_any_start_up_builds_the_index(redis: aioredis.Redis) -> None:
    root, ops = await _old_users(redis, ["admin user", "admin user"])
    accounts = make_accounts(redis)  # never prepared: no instance built the index yet
    assert (await accounts.set_roles(ops, ["user"]))["roles"] == ["user"]
    with pytest.raises(Conflict, match="the last admin"):
        await accounts.set_roles(root, ["user"])
    assert await _index(redis) == {root} and await redis.exists(ADMINS_INDEXED)


async def test_old_instances_during_a_rollout_cannot_leave_no_admin(
    redis: aioredis.Redis,
) -> None:
    """Instances from before the index write roles without it (as `_old_users` does):
    a user they demote stays in the index, one they promote is missing from it."""
    root, ops, plain = await _old_users(redis, ["admin user", "admin user", "user"])
    accounts = make_accounts(redis)
    await accounts.prepare()
    await redis.hset(user_key(ops), "roles", "user")  # an old instance demotes ops
    await redis.hset(user_key(plain), "roles", "admin user")  # ...and promotes plain
    assert await _index(redis) == {root, ops}

    with pytest.raises(Conflict, match="the last admin"):  # ops is no admin: not counted
        await accounts.set_roles(root, ["user"])
    assert await _index(redis) == {root}  # the stale member is gone
    await accounts.set_roles(plain, ["admin", "user"])  # indexed by a new instance's write
    assert (await accounts.set_roles(root, ["user"]))["roles"] == ["user"]
    assert await _index(redis) == {plain} == await _truth(accounts)


async def test_a_promotion_between_reading_the_admins_and_the_check_counts(
    accounts: Accounts, redis_url: str
) -> None:
    """Another instance promotes a user just after the demotion read the index: the
    check sees the index changed and reads it again, rather than refusing."""
    await accounts.bootstrap_admin("root", PASSWORD)
    root = await accounts.users.find("root")
    other, _ = await signed_up(accounts, "other")
    client = aioredis.Redis.from_url(db_url(redis_url, 2))
    elsewhere = make_accounts(client)
    read = accounts.users.redis.smembers
    reads = 0

    async def read_then_promote(key: str) -> set[bytes | str]:
        nonlocal reads
        members = await read(key)
        reads += key == ADMINS
        if key == ADMINS and reads == 1:
            await elsewhere.set_roles(other, ["user", "admin"])
        return members

    accounts.users.redis.smembers = read_then_promote  # type: ignore[method-assign,assignment]
    try:
        assert root is not None
        assert (await accounts.set_roles(root.user_id, ["user"]))["roles"] == ["user"]
    finally:
        del accounts.users.redis.smembers
        await client.aclose()
    assert reads == 2  # read again once
    assert await _index(accounts.redis) == {other} == await _truth(accounts)


async def test_two_instances_demoting_the_last_two_admins_leave_one(
    accounts: Accounts, redis: aioredis.Redis, redis_url: str
) -> None:
    """With a stale member in the index too: it must not count as a third admin."""
    first, second, stale = await _old_users(redis, ["admin user"] * 3)
    await accounts.prepare()
    await redis.hset(user_key(stale), "roles", "user")  # demoted by an old instance
    client = aioredis.Redis.from_url(db_url(redis_url, 2))
    try:
        elsewhere = make_accounts(client)
        for _ in range(10):
            for user_id in (first, second):
                await accounts.set_roles(user_id, ["user", "admin"])
            await redis.sadd(ADMINS, stale)
            results = await asyncio.gather(
                accounts.set_roles(first, ["user"]),
                elsewhere.set_roles(second, ["user"]),
                return_exceptions=True,
            )
            assert sum(isinstance(r, Conflict) for r in results) == 1, results
            assert len(await _truth(accounts)) == 1, results
    finally:
        await client.aclose()


# -- what a demotion costs Redis -----------------------------------------------------------


@pytest.fixture(name="own_redis", scope="module")
def own_redis_fixture() -> Iterator[EmbeddedRedis]:
    """A redis-server of this module's own: nothing else's commands in its counts."""
    with EmbeddedRedis() as server:
        yield server


async def _commands(redis: aioredis.Redis) -> int:
    """Commands run so far, but those of connecting and of this count itself."""
    stats = await redis.info("commandstats")
    handshake = {"cmdstat_info", "cmdstat_client", "cmdstat_hello", "cmdstat_ping"}
    return sum(s["calls"] for name, s in stats.items() if name not in handshake)


async def _demotion_cost(url: str, users: int) -> int:
    """Commands run by demoting an admin among `users` users (three of them admins)."""
    redis = aioredis.Redis.from_url(url)
    try:
        await redis.flushdb()
        admins = await _old_users(redis, ["admin user"] * 3 + ["user"] * (users - 3))
        accounts = make_accounts(redis)
        await accounts.prepare()
        await accounts.set_roles(admins[0], ["user"])  # warms up: scripts loaded
        before = await _commands(redis)
        await accounts.set_roles(admins[1], ["user"])
        return await _commands(redis) - before
    finally:
        await redis.aclose()


async def test_a_demotion_costs_the_same_with_ten_or_a_thousand_users(
    own_redis: EmbeddedRedis,
) -> None:
    """The old check WATCHed and read every user: its cost grew with registrations."""
    few = await _demotion_cost(own_redis.url, 10)
    many = await _demotion_cost(own_redis.url, 1000)
    assert many == few, (few, many)
