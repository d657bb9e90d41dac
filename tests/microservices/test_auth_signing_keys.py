"""Signing keys and introspection in `Accounts` (real Redis, DB 2, no RPC): rotation,
the configured secret seeding the keyring, and `introspect`."""

from __future__ import annotations

import time

import jwt
import pytest
import redis.asyncio as aioredis

from common import tokens
from common.credentials import Authenticator
from microservices.auth.accounts import Accounts
from tests.microservices.auth_fixtures import (  # noqa: F401 (fixtures)
    TTL,
    accounts_fixture,
    gateway_fixture,
    make_accounts,
    redis_fixture,
    signed_up,
)

pytestmark = pytest.mark.timeout(60)


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
