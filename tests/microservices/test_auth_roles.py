"""Roles and scopes of users in `Accounts` (real Redis, DB 2, no RPC), and the admin
bootstrap."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any

import pytest
import redis.asyncio as aioredis

from common.credentials import Authenticator
from common.errors import BadRequest, ConfigError, Conflict
from microservices.auth.accounts import Accounts
from microservices.auth.users import user_key
from tests.helpers import db_url, eventually_refused
from tests.microservices.auth_fixtures import (  # noqa: F401 (fixtures)
    PASSWORD,
    accounts_fixture,
    claims_of,
    gateway_fixture,
    make_accounts,
    redis_fixture,
    signed_up,
)

pytestmark = pytest.mark.timeout(60)


async def test_narrowing_a_user_ends_sessions_and_keys_beyond(
    accounts: Accounts, gateway: Authenticator
) -> None:
    await accounts.bootstrap_admin("root", PASSWORD)  # Yara is not the last admin
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
    await eventually_refused(gateway, admin["access_token"], "token revoked")
    await eventually_refused(gateway, admin_key["api_key"], "API key revoked")
    assert (await gateway.authenticate(iptv_key["api_key"])).name == "iptv"

    fresh = await accounts.login("Yara", PASSWORD)
    await accounts.set_scopes(user_id, ["iptv"])
    await eventually_refused(gateway, fresh["access_token"], "token revoked")
    await eventually_refused(gateway, nlp_key["api_key"], "API key revoked")
    assert [k["name"] for k in await accounts.list_api_keys(user_id)] == ["iptv"]
    assert claims_of((await accounts.login("Yara", PASSWORD))["access_token"])["scope"] == "iptv"
    with pytest.raises(BadRequest):
        await accounts.set_scopes(user_id, ["admin"])  # comes with the role only
    with pytest.raises(BadRequest):
        await accounts.set_roles(user_id, ["root"])


# -- a narrowing cut short ----------------------------------------------------------------


async def _cut_short(accounts: Accounts, narrowing: Awaitable[Any]) -> None:
    """Run `narrowing` until its clean-up begins, and stop it there: what a worker
    SIGKILLed after writing the new roles or scopes leaves behind."""
    reached = asyncio.Event()

    async def frozen(user_id: str) -> list[str]:
        reached.set()
        await asyncio.Event().wait()  # never set: the worker is gone
        return []

    original = accounts.sessions.end_all
    accounts.sessions.end_all = frozen  # type: ignore[method-assign]
    task = asyncio.ensure_future(narrowing)
    try:
        await asyncio.wait_for(reached.wait(), 10)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        accounts.sessions.end_all = original  # type: ignore[method-assign]


async def _wide_user(accounts: Accounts, name: str, admin: bool) -> tuple[str, str, str]:
    """A user with a session and a key as wide as they get: (user id, access token, key)."""
    user_id, _ = await signed_up(accounts, name)
    if admin:
        await accounts.bootstrap_admin("root", PASSWORD)  # not the last admin, then
        await accounts.set_roles(user_id, ["user", "admin"])
    access = (await accounts.login(name, PASSWORD))["access_token"]
    key = await accounts.create_api_key(user_id, "wide", ["admin" if admin else "*"], None)
    return user_id, access, key["api_key"]


@pytest.mark.parametrize("change", ["scopes", "roles"])
async def test_a_narrowing_cut_short_is_finished_by_its_redelivery(
    accounts: Accounts, gateway: Authenticator, redis: aioredis.Redis, change: str
) -> None:
    user_id, access, key = await _wide_user(accounts, "Zoe", admin=change == "roles")

    def narrow(on: Accounts) -> Awaitable[dict[str, Any]]:
        if change == "scopes":
            return on.set_scopes(user_id, ["iptv.search"])
        return on.set_roles(user_id, ["user"])

    await _cut_short(accounts, narrow(accounts))
    assert (await gateway.authenticate(key)).name == "wide"  # the new value alone is written

    redelivered = make_accounts(redis)  # another worker runs the same call again
    await narrow(redelivered)
    await eventually_refused(gateway, key, "API key revoked")
    await eventually_refused(gateway, access, "token revoked")
    assert await accounts.list_api_keys(user_id) == []
    assert await redis.hget(user_key(user_id), "narrowing") is None  # done: nothing pending


async def test_a_narrowing_cut_short_is_finished_by_the_next_login_or_change(
    accounts: Accounts, gateway: Authenticator, redis: aioredis.Redis
) -> None:
    user_id, access, key = await _wide_user(accounts, "Ada", admin=False)
    await _cut_short(accounts, accounts.set_scopes(user_id, ["iptv"]))
    fresh = await accounts.login("Ada", PASSWORD)  # the redelivery never came
    await eventually_refused(gateway, key, "API key revoked")
    await eventually_refused(gateway, access, "token revoked")
    assert claims_of(fresh["access_token"])["scope"] == "iptv"
    assert (await gateway.authenticate(fresh["access_token"])).name == "Ada"  # not ended

    other, access, key = await _wide_user(accounts, "Bea", admin=False)
    await _cut_short(accounts, accounts.set_scopes(other, ["iptv"]))
    await accounts.set_scopes(other, ["iptv", "nlp"])  # a widening after it still cleans up
    await eventually_refused(gateway, key, "API key revoked")
    await eventually_refused(gateway, access, "token revoked")
    assert await redis.hget(user_key(other), "narrowing") is None


async def test_list_users(accounts: Accounts) -> None:
    await accounts.register("zed", PASSWORD)
    await accounts.register("Amy", PASSWORD)
    users = await accounts.list_users()
    assert [u["username"] for u in users] == ["Amy", "zed"]
    assert set(users[0]) == {"user_id", "username", "roles", "scopes", "created_at"}


# -- the last admin ------------------------------------------------------------------------


async def _admins(accounts: Accounts) -> list[str]:
    return [u["username"] for u in await accounts.list_users() if "admin" in u["roles"]]


async def test_the_last_admin_cannot_lose_the_admin_role(accounts: Accounts) -> None:
    await accounts.bootstrap_admin("root", PASSWORD)
    root = (await accounts.users.find("root")).user_id  # type: ignore[union-attr]
    with pytest.raises(Conflict, match="the last admin cannot lose the admin role"):
        await accounts.set_roles(root, ["user"])
    assert await _admins(accounts) == ["root"]
    await accounts.login("root", PASSWORD)  # its sessions were not ended either

    other, _ = await signed_up(accounts, "other")
    await accounts.set_roles(other, ["user", "admin"])
    assert (await accounts.set_roles(root, ["user"]))["roles"] == ["user"]  # one is left
    with pytest.raises(Conflict):
        await accounts.set_roles(other, ["user"])
    assert await _admins(accounts) == ["other"]
    plain, _ = await signed_up(accounts, "plain")
    assert (await accounts.set_roles(plain, ["user"]))["roles"] == ["user"]  # not an admin


async def test_admins_demoting_each_other_at_once_leave_one(
    accounts: Accounts, redis_url: str
) -> None:
    """Two auth instances (two connection pools), each demoting the other admin."""
    first, _ = await signed_up(accounts, "first")
    second, _ = await signed_up(accounts, "second")
    client = aioredis.Redis.from_url(db_url(redis_url, 2))
    try:
        elsewhere = make_accounts(client)
        for _ in range(10):
            for user_id in (first, second):
                await accounts.set_roles(user_id, ["user", "admin"])
            results = await asyncio.gather(
                accounts.set_roles(second, ["user"]),
                elsewhere.set_roles(first, ["user"]),
                return_exceptions=True,
            )
            assert len(await _admins(accounts)) == 1, results
            assert sum(isinstance(r, Conflict) for r in results) == 1, results
    finally:
        await client.aclose()


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
