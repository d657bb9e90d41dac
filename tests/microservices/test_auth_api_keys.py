"""API keys in `Accounts` (real Redis, DB 2, no RPC): create, list, delete, and scopes."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime

import pytest
import redis.asyncio as aioredis

from common import apikeys
from common.credentials import Authenticator
from common.errors import BadRequest, Conflict, Forbidden, NotFound
from microservices.auth.accounts import Accounts
from microservices.auth.api_keys import MAX_KEYS_PER_USER
from tests.helpers import db_url, eventually_refused
from tests.microservices.auth_fixtures import (  # noqa: F401 (fixtures)
    accounts_fixture,
    gateway_fixture,
    make_accounts,
    redis_fixture,
    signed_up,
)

pytestmark = pytest.mark.timeout(60)


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
    await eventually_refused(gateway, key["api_key"], "API key revoked")
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


async def test_a_registry_key_needs_the_registry_scope_or_admin(accounts: Accounts) -> None:
    # A registry key registers backends (where other users' requests go): the `*` every
    # user signing up gets is not enough to mint one.
    user_id, _ = await signed_up(accounts, "Yuri")
    with pytest.raises(Forbidden, match="beyond"):
        await accounts.create_api_key(user_id, "backends", ["registry"], None)
    with pytest.raises(BadRequest):
        await accounts.create_api_key(user_id, "backends", ["registry.heartbeat"], None)
    await accounts.set_scopes(user_id, ["*", "registry"])
    key = await accounts.create_api_key(user_id, "backends", ["registry"], None)
    assert key["scopes"] == ["registry"]
    admin_id, _ = await signed_up(accounts, "Zora")
    await accounts.set_roles(admin_id, ["user", "admin"])
    key = await accounts.create_api_key(admin_id, "backends", ["registry"], None)
    assert key["scopes"] == ["registry"]


async def test_the_key_cap_holds_against_concurrent_creations(
    accounts: Accounts, redis: aioredis.Redis, redis_url: str
) -> None:
    # Two "workers" (own clients, each with up to 100 creations in flight) creating at
    # once: the count is checked where the key is written, so the creations past the
    # cap are refused and store nothing.
    user_id, _ = await signed_up(accounts, "Hoarder")
    other_client = aioredis.Redis.from_url(db_url(redis_url, 2))
    try:
        other = make_accounts(other_client)
        tries = 2 * MAX_KEYS_PER_USER

        async def create(i: int) -> str | None:
            try:
                await (accounts, other)[i % 2].create_api_key(user_id, f"k{i}", ["iptv"], None)
            except Conflict as exc:
                return exc.message
            return None

        refusals = await asyncio.gather(*(create(i) for i in range(tries)))
    finally:
        await other_client.aclose()
    assert refusals.count(None) == MAX_KEYS_PER_USER
    assert {r for r in refusals if r} == {f"a user may hold at most {MAX_KEYS_PER_USER} API keys"}
    assert await redis.scard(apikeys.user_keys_key(user_id)) == MAX_KEYS_PER_USER
    assert len(await accounts.list_api_keys(user_id)) == MAX_KEYS_PER_USER
    records = [k async for k in redis.scan_iter(match=apikeys.record_key("*"))]
    assert len(records) == MAX_KEYS_PER_USER
