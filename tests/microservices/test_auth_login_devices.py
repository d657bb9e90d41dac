"""Device tokens (`microservices.auth.devices`) in the login throttle, through
`Accounts` against a real Redis (DB 2): a login with the device token an earlier
login gave is counted per device, so a stranger at the owner's address (a NAT) locks
the address, not the owner's device; any other token counts by the address; a
device's own failures lock it; the account-wide lock spares a device; concurrent
attempts with one device get no more guesses than its rules allow.
"""

from __future__ import annotations

import pytest
import redis.asyncio as aioredis

from common.errors import TooManyAttempts
from microservices.auth.accounts import Accounts
from microservices.auth.devices import DEVICES, PREFIX, devices_key, digest
from microservices.auth.throttle import ACCOUNT, DEVICE, addresses_key, failures_key
from tests.helpers import Clock
from tests.microservices.auth_fixtures import PASSWORD, redis_fixture  # noqa: F401 (fixture)
from tests.microservices.test_auth_login_throttle import (
    OTHER,
    OWNER,
    STRANGER,
    WRONG,
    concurrent_guesses,
    counting_hasher,
    fail,
    refused,
    throttled,
)

pytestmark = pytest.mark.timeout(60)

NEW = "192.0.2.99"  # an address the user never came from
FORGED = PREFIX + "A" * 43  # well-formed, never given


async def device_login(accounts: Accounts, username: str, address: str, token: str | None) -> str:
    """Log in with the right password (and `token` if given); the new device token."""
    answer = await accounts.login(username, PASSWORD, address, token)
    assert answer["token_type"] == "bearer" and answer["device_expires_in"] == 30 * 86400
    new: str = answer["device_token"]
    assert new.startswith(PREFIX) and new != token
    return new


async def test_the_owners_device_gets_in_while_a_stranger_at_its_address_is_locked(
    redis: aioredis.Redis,
) -> None:
    accounts = await throttled(redis)
    await accounts.register("Nia", PASSWORD, OWNER)
    token = await device_login(accounts, "Nia", OWNER, None)
    await fail(accounts, "Nia", 3, OWNER)  # a stranger behind the same NAT
    await refused(accounts, "Nia", address=OWNER)  # the address is locked
    token = await device_login(accounts, "nia", OWNER, token)  # the owner's device is not
    await device_login(accounts, "Nia", OWNER, token)
    # Nor did the device's successes unlock the address for the stranger.
    await refused(accounts, "Nia", WRONG, address=OWNER)
    assert await redis.hget(failures_key("Nia", OWNER), "failures") == b"3"
    assert await redis.zcard(devices_key("Nia")) == 1  # each login replaced the token used


async def test_any_other_token_counts_by_the_address(redis: aioredis.Redis) -> None:
    """Forged, malformed, another user's, used up (replaced at a login) or expired:
    no device, so the address's lock holds."""
    clock = Clock()
    accounts = await throttled(redis, clock=clock)
    await accounts.register("Omi", PASSWORD)
    await accounts.register("Pat", PASSWORD)
    expiring = await device_login(accounts, "Omi", OWNER, None)
    clock.offset = 31 * 86400.0  # past AUTH_LOGIN_DEVICE_DAYS (30)
    used = await device_login(accounts, "Omi", OWNER, None)
    await device_login(accounts, "Omi", OWNER, used)  # replaces `used`
    others = await device_login(accounts, "Pat", OWNER, None)
    await fail(accounts, "Omi", 3, OWNER)
    for token in (FORGED, "not a token", "", others, used, expiring):
        await refused(accounts, "Omi", address=OWNER, device_token=token)
        await refused(accounts, "Omi", WRONG, address=OWNER, device_token=token)
    assert await redis.hget(failures_key("Omi", OWNER), "failures") == b"3"  # nothing counted


async def test_a_devices_own_failures_lock_it_and_only_it(redis: aioredis.Redis) -> None:
    accounts = await throttled(redis)
    await accounts.register("Rae", PASSWORD)
    token = await device_login(accounts, "Rae", OWNER, None)
    phone = await device_login(accounts, "Rae", OTHER, None)
    await fail(accounts, "Rae", 3, OWNER, token)  # a stolen token is no way around the limit
    await refused(accounts, "Rae", address=OWNER, device_token=token)
    await refused(accounts, "Rae", address=NEW, device_token=token)  # wherever it is used
    assert await redis.exists(failures_key("Rae", OWNER)) == 0  # not the address's count
    assert await redis.hget(failures_key("Rae", ACCOUNT), "failures") == b"3"  # the account's
    await device_login(accounts, "Rae", OWNER, phone)  # another device of the user gets in
    await device_login(accounts, "Rae", OWNER, None)  # as does the address without a token
    # The admin's clear lifts a device's lock too (its key is indexed with the addresses).
    assert await redis.zscore(addresses_key("Rae"), DEVICE + digest(token)) is not None
    assert await accounts.clear_login_failures("Rae") == {"cleared": True}
    await device_login(accounts, "Rae", OWNER, token)


async def test_the_account_lock_spares_a_device(redis: aioredis.Redis) -> None:
    accounts = await throttled(redis, account=5)
    await accounts.register("Sol", PASSWORD)
    token = await device_login(accounts, "Sol", OWNER, None)
    await fail(accounts, "Sol", 3, STRANGER)
    await fail(accounts, "Sol", 2, OTHER)  # 5 from all addresses: the account locks
    await refused(accounts, "Sol", address=NEW)
    await device_login(accounts, "Sol", NEW, token)  # the owner's device, at a new address


async def test_concurrent_attempts_with_one_device_cannot_exceed_its_limit(
    redis: aioredis.Redis,
) -> None:
    hasher = counting_hasher()
    first = await throttled(redis, hasher=hasher)
    second = await throttled(redis, hasher=hasher)
    await first.register("Tam", PASSWORD)
    token = await device_login(first, "Tam", OWNER, None)
    kinds, checked = await concurrent_guesses(
        (first, second), hasher, "Tam", "192.0.2.{}".format, token
    )
    assert kinds == ["TooManyAttempts"] * 17 + ["Unauthorized"] * 3  # wherever it is used
    assert checked == 3


async def test_the_most_recent_devices_are_kept_and_revoking_the_user_drops_them(
    redis: aioredis.Redis,
) -> None:
    accounts = await throttled(redis)
    user = await accounts.register("Uma", PASSWORD)
    tokens = [await device_login(accounts, "Uma", OWNER, None) for _ in range(DEVICES + 1)]
    assert await redis.zcard(devices_key("Uma")) == DEVICES
    assert await accounts.devices.check("Uma", tokens[0]) is None  # the oldest went
    assert await accounts.devices.check("UMA", tokens[-1]) == digest(tokens[-1])
    await accounts.revoke("user", user["user_id"])
    assert await redis.exists(devices_key("Uma")) == 0


async def test_no_device_tokens_when_turned_off(redis: aioredis.Redis) -> None:
    accounts = await throttled(redis, device_days=0)
    await accounts.register("Vic", PASSWORD)
    answer = await accounts.login("Vic", PASSWORD, OWNER)
    assert "device_token" not in answer and "device_expires_in" not in answer
    assert await redis.exists(devices_key("Vic")) == 0
    await fail(accounts, "Vic", 3, OWNER)
    with pytest.raises(TooManyAttempts):
        await accounts.login("Vic", PASSWORD, OWNER, FORGED)
