"""Sessions in `Accounts` (real Redis, DB 2, no RPC): refresh-token rotation and reuse,
logout, and revoking tokens, users and keys."""

from __future__ import annotations

import asyncio
import uuid

import pytest
import redis.asyncio as aioredis

from common.credentials import Authenticator
from common.errors import BadRequest, NotFound, Unauthorized
from common.revocation import REVOKED
from microservices.auth.accounts import Accounts
from microservices.auth.sessions import session_key
from tests.helpers import Clock, eventually_refused
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
        await eventually_refused(gateway, answer["access_token"], "token revoked")
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
    await eventually_refused(gateway, mine["access_token"], "token revoked")
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
    await eventually_refused(gateway, first["access_token"], "token revoked")
    assert (await gateway.authenticate(second["access_token"])).name == "Rita"


async def test_revoke_a_user(
    accounts: Accounts, gateway: Authenticator, redis: aioredis.Redis
) -> None:
    user_id, first = await signed_up(accounts, "Sam")
    key = await accounts.create_api_key(user_id, "ci", ["iptv"], None)
    await gateway.authenticate(key["api_key"])
    assert await accounts.revoke("user", user_id) == {"revoked": True}
    await eventually_refused(gateway, first["access_token"], "token revoked")
    await eventually_refused(gateway, key["api_key"], "API key revoked")
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
    await eventually_refused(gateway, key["api_key"], "API key revoked")
    with pytest.raises(NotFound):
        await accounts.revoke("key", key["key_id"])
    with pytest.raises(NotFound):
        await accounts.revoke("user", str(uuid.uuid4()))
    with pytest.raises(BadRequest):
        await accounts.revoke("everything", user_id)
    with pytest.raises(BadRequest):
        await accounts.revoke("token", "not a jti")
