"""Login throttling (`microservices.auth.throttle`) through `Accounts`, against a real
Redis (DB 2): the lock after N failures, unknown names treated the same, resets,
expiry, growth, races, the admin's clear, and Redis down, for logins naming no
address (as before addresses); then the two tiers of logins from an address: a
stranger's failures lock only the stranger's address, the account-wide backstop
locks every address but the owner's known ones.

Locks are either long with a `Clock` moved past them, or a fraction of a second
and waited out by polling; nothing asserts how long anything took.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

from common.embedded_redis import free_port
from common.errors import ServiceError, TooManyAttempts, Unauthorized
from microservices.auth.accounts import Accounts
from microservices.auth.throttle import (
    ACCOUNT,
    KNOWN_ADDRESSES,
    STALE_SECONDS,
    ThrottleRules,
    addresses_key,
    failures_key,
    known_key,
    login_address,
    pending_key,
)
from tests.helpers import Clock, wait_for_async
from tests.microservices.auth_fixtures import (  # noqa: F401 (fixtures)
    PASSWORD,
    CountingHasher,
    make_accounts,
    redis_fixture,
)

pytestmark = pytest.mark.timeout(60)

WRONG = "not the password"
# Client addresses (documentation ranges): the owner's, a stranger's, another's.
OWNER, STRANGER, OTHER = "198.51.100.20", "203.0.113.7", "192.0.2.33"


def counting_hasher() -> CountingHasher:
    return CountingHasher(time_cost=1, memory_cost=8192, parallelism=1)


async def concurrent_guesses(
    instances: tuple[Accounts, Accounts],
    hasher: CountingHasher,
    username: str,
    address: Callable[[int], str | None] = lambda i: None,
    device_token: str | None = None,
) -> tuple[list[str], int]:
    """20 wrong logins at once, alternating between two auth instances (as behind two
    gateways), the `i`th from `address(i)`: their outcomes' kinds, sorted, and how
    many passwords were checked."""
    verified = hasher.verifications
    calls = [instances[i % 2].login(username, WRONG, address(i), device_token) for i in range(20)]
    results = await asyncio.gather(*calls, return_exceptions=True)
    return sorted(type(r).__name__ for r in results), hasher.verifications - verified


async def throttled(
    redis: aioredis.Redis,
    *,
    lock_base: float = 10.0,
    lock_max: float = 60.0,
    window: float = 60.0,
    account: int = 20,
    known_for: float = 30 * 86400.0,
    device_days: float = 30,
    clock: Clock | None = None,
    hasher: CountingHasher | None = None,
) -> Accounts:
    """Accounts whose logins lock after 3 failures from one address or device,
    `account` from all (for 10 s by default)."""
    rules = ThrottleRules(3, lock_base, lock_max, window, account, known_for)
    kwargs: dict[str, Any] = {"throttle": rules, "device_days": device_days}
    if clock is not None:
        kwargs["clock"] = clock
    if hasher is not None:
        kwargs["hasher"] = hasher
    accounts = make_accounts(redis, **kwargs)
    await accounts.prepare()
    return accounts


async def fail(
    accounts: Accounts,
    username: str,
    times: int,
    address: str | None = None,
    device_token: str | None = None,
) -> None:
    for _ in range(times):
        with pytest.raises(Unauthorized, match="invalid username or password"):
            await accounts.login(username, WRONG, address, device_token)


async def refused(
    accounts: Accounts,
    username: str,
    password: str = PASSWORD,
    *,
    address: str | None = None,
    device_token: str | None = None,
) -> float:
    """Log in, expecting the throttle's refusal; its retry_after."""
    with pytest.raises(TooManyAttempts) as caught:
        await accounts.login(username, password, address, device_token)
    assert caught.value.code == "too_many_attempts"
    assert caught.value.message.startswith("too many failed logins: try again in ")
    retry_after = caught.value.retry_after
    assert retry_after is not None and retry_after > 0
    return retry_after


async def test_after_n_failures_even_the_right_password_is_refused_unchecked(
    redis: aioredis.Redis,
) -> None:
    hasher = counting_hasher()
    accounts = await throttled(redis, hasher=hasher)
    await accounts.register("Alice", PASSWORD)
    await fail(accounts, "alice", 3)
    verified = hasher.verifications
    assert await refused(accounts, "Alice") <= 10.0  # the right password, refused
    assert await refused(accounts, "ALICE", WRONG) <= 10.0  # names match ignoring case
    assert hasher.verifications == verified  # no password was checked during the lock
    assert await redis.ttl(failures_key("Alice")) > 0  # kept with an expiry


@pytest.mark.parametrize("username", ["nobody", "no such!", "x" * 500])
async def test_unknown_usernames_are_throttled_the_same(
    redis: aioredis.Redis, username: str
) -> None:
    accounts = await throttled(redis)
    await accounts.register("Bob", PASSWORD)
    answers = {}
    for name in ("Bob", username):
        caught: list[ServiceError] = []
        for _ in range(4):
            with pytest.raises(ServiceError) as error:
                await accounts.login(name, WRONG)
            caught.append(error.value)
        answers[name] = [(type(e), e.message) for e in caught]
    assert answers["Bob"] == answers[username]
    assert [kind for kind, _ in answers["Bob"]] == [Unauthorized] * 3 + [TooManyAttempts]
    assert len(failures_key("x" * 500)) < 100  # a name no user can have is hashed


async def test_a_success_before_the_limit_resets_the_count(redis: aioredis.Redis) -> None:
    accounts = await throttled(redis)
    await accounts.register("Carol", PASSWORD)
    for _ in range(3):
        await fail(accounts, "Carol", 2)
        assert (await accounts.login("carol", PASSWORD))["token_type"] == "bearer"
    assert await redis.exists(failures_key("Carol")) == 0
    await fail(accounts, "Carol", 3)  # counted from zero again
    await refused(accounts, "Carol")


async def test_the_lock_expires_and_the_count_is_forgotten(redis: aioredis.Redis) -> None:
    accounts = await throttled(redis, lock_base=0.2, lock_max=0.4, window=0.3)
    await accounts.register("Dave", PASSWORD)
    await fail(accounts, "Dave", 3)
    await refused(accounts, "Dave")

    async def logged_in() -> bool:
        try:
            return bool(await accounts.login("Dave", PASSWORD))
        except TooManyAttempts:
            return False

    await wait_for_async(logged_in, timeout=10)
    # Failures are forgotten after a quiet window: two, then two more, never lock.
    await fail(accounts, "Dave", 2)
    await wait_for_async(lambda: _gone(redis, "Dave"), timeout=10)
    await fail(accounts, "Dave", 2)


async def _gone(redis: aioredis.Redis, username: str) -> bool:
    return await redis.exists(failures_key(username)) == 0


async def test_each_failure_after_a_lock_doubles_it_up_to_the_cap(
    redis: aioredis.Redis,
) -> None:
    clock = Clock()
    accounts = await throttled(redis, lock_base=10.0, lock_max=40.0, clock=clock)
    await accounts.register("Erin", PASSWORD)
    await fail(accounts, "Erin", 3)
    locks = [await refused(accounts, "Erin")]
    for _ in range(3):
        clock.offset += locks[-1] + 1  # past the lock: one more guess, then a longer lock
        await fail(accounts, "Erin", 1)
        locks.append(await refused(accounts, "Erin"))
    assert locks[0] <= 10 < locks[1] <= 20 < locks[2] <= 40
    assert 20 < locks[3] <= 40  # capped
    clock.offset += locks[-1] + 1
    assert (await accounts.login("erin", PASSWORD))["token_type"] == "bearer"  # no lockout


async def test_concurrent_attempts_cannot_exceed_the_limit(redis: aioredis.Redis) -> None:
    hasher = counting_hasher()
    # Two auth instances sharing Redis, as behind two gateways.
    first = await throttled(redis, hasher=hasher)
    second = await throttled(redis, hasher=hasher)
    await first.register("Frank", PASSWORD)
    kinds, checked = await concurrent_guesses((first, second), hasher, "Frank")
    assert kinds == ["TooManyAttempts"] * 17 + ["Unauthorized"] * 3
    assert checked == 3


async def test_concurrent_logins_with_the_right_password_all_get_in(
    redis: aioredis.Redis,
) -> None:
    """More concurrent logins than failures allowed: none is a failure, so none is
    refused; those over the number allowed under way wait for a place."""
    first = await throttled(redis)
    second = await throttled(redis)
    await first.register("Ivan", PASSWORD)
    calls = [(first if i % 2 else second).login("Ivan", PASSWORD) for i in range(8)]
    results = await asyncio.gather(*calls, return_exceptions=True)
    assert [type(r).__name__ for r in results] == ["dict"] * 8, results
    assert await redis.exists(failures_key("Ivan"), pending_key("Ivan")) == 0


async def test_an_attempt_never_ended_stops_holding_its_place(redis: aioredis.Redis) -> None:
    """Attempts admitted and never ended (their worker died) hold their places until
    they are stale: meanwhile one more waits `BUSY_WAIT`, then is refused, unlocked."""
    clock = Clock()
    accounts = await throttled(redis, clock=clock)
    await accounts.register("Judy", PASSWORD)
    for _ in range(3):  # three failures left before the lock: three places
        await accounts.throttle.admit("Judy")
    with pytest.raises(TooManyAttempts, match="logins of this username under way") as caught:
        await accounts.login("Judy", PASSWORD)
    assert caught.value.retry_after == 1.0
    clock.offset += STALE_SECONDS + 1
    assert (await accounts.login("judy", PASSWORD))["token_type"] == "bearer"


async def test_an_admin_clears_the_throttle(redis: aioredis.Redis) -> None:
    accounts = await throttled(redis)
    await accounts.register("Grace", PASSWORD)
    await fail(accounts, "Grace", 3)
    await refused(accounts, "Grace")
    assert await accounts.clear_login_failures("GRACE") == {"cleared": True}
    assert (await accounts.login("Grace", PASSWORD))["token_type"] == "bearer"
    assert await accounts.clear_login_failures("Grace") == {"cleared": False}


async def test_register_and_refresh_are_not_throttled(redis: aioredis.Redis) -> None:
    accounts = await throttled(redis)
    await accounts.register("Heidi", PASSWORD)
    session = await accounts.login("Heidi", PASSWORD)
    await fail(accounts, "Heidi", 3)
    await refused(accounts, "Heidi")
    renewed = await accounts.refresh(session["refresh_token"])
    assert renewed["token_type"] == "bearer"
    await fail(accounts, "Ivan", 3)
    await refused(accounts, "Ivan")
    assert (await accounts.register("Ivan", PASSWORD))["username"] == "Ivan"


async def test_redis_down_fails_the_login_without_checking_a_password() -> None:
    # As every login with Redis unreachable: the error reaches the worker, which
    # answers it as an error; the throttle lets no attempt through unchecked.
    hasher = counting_hasher()
    unreachable = aioredis.Redis(port=free_port(), retry=Retry(NoBackoff(), 0))
    accounts = make_accounts(unreachable, hasher=hasher, throttle=ThrottleRules())
    try:
        with pytest.raises(RedisConnectionError):
            await accounts.login("Judy", PASSWORD)
    finally:
        await unreachable.aclose()
    assert hasher.verifications == 0


# -- logins from an address: two tiers ---------------------------------------------


async def logged_in(accounts: Accounts, username: str, address: str | None) -> bool:
    return (await accounts.login(username, PASSWORD, address))["token_type"] == "bearer"


async def test_a_strangers_failures_do_not_lock_the_owner_elsewhere(
    redis: aioredis.Redis,
) -> None:
    accounts = await throttled(redis)
    await accounts.register("Kim", PASSWORD)
    await fail(accounts, "Kim", 3, STRANGER)
    assert await refused(accounts, "Kim", address=STRANGER) <= 10.0  # the stranger's address
    assert await logged_in(accounts, "kim", OWNER)  # the owner's is not locked
    await refused(accounts, "Kim", address=STRANGER)  # nor the stranger's unlocked by it
    assert await redis.hget(failures_key("Kim", login_address(STRANGER)), "failures") == b"3"


async def test_the_account_lock_spares_only_the_owners_known_addresses(
    redis: aioredis.Redis,
) -> None:
    hasher = counting_hasher()
    accounts = await throttled(redis, account=5, hasher=hasher)
    await accounts.register("Liam", PASSWORD)
    assert await logged_in(accounts, "Liam", OWNER)  # a known address from now on
    await fail(accounts, "Liam", 3, STRANGER)  # locks the stranger's address
    await fail(accounts, "Liam", 2, OTHER)  # 5 from all addresses: locks the account
    verified = hasher.verifications
    await refused(accounts, "Liam", address="192.0.2.99")  # a new address: the right password
    await refused(accounts, "Liam", address=OTHER)  # one failure left of its own, but locked
    assert hasher.verifications == verified  # refused unchecked
    assert await logged_in(accounts, "LIAM", OWNER)  # the owner at a known address gets in
    await refused(accounts, "Liam", address="192.0.2.99")  # no reset of the account's count
    await fail(accounts, "Liam", 3, OWNER)  # a known address still has its own count
    await refused(accounts, "Liam", address=OWNER)


async def test_the_address_registered_from_is_known(redis: aioredis.Redis) -> None:
    """An account never logged in has a known address all the same: strangers who
    lock the account do not lock its owner out there."""
    accounts = await throttled(redis, account=3, lock_base=1000.0, lock_max=1000.0)
    await accounts.register("Rosa", PASSWORD, OWNER)
    await accounts.register("Sam", PASSWORD)  # naming no address: none is known
    for name in ("Rosa", "Sam"):
        await fail(accounts, name, 3, STRANGER)  # locks the stranger's address and the account
    assert await logged_in(accounts, "rosa", OWNER)
    await refused(accounts, "Sam", address=OWNER)


async def test_a_valid_refresh_keeps_its_address_known(redis: aioredis.Redis) -> None:
    """A user kept signed in by refreshes longer than the known period: the addresses
    it refreshed from stay known (a new one becomes known), not one whose refresh
    token was refused, nor any for a refresh naming none."""
    clock = Clock()
    accounts = await throttled(
        redis, account=3, lock_base=1000.0, lock_max=1000.0, known_for=100.0, clock=clock
    )
    await accounts.register("Tara", PASSWORD)
    first = await accounts.login("Tara", PASSWORD, OWNER)
    clock.offset += 60
    session = await accounts.refresh(first["refresh_token"], OWNER)
    session = await accounts.refresh(session["refresh_token"], OTHER)
    await accounts.refresh(session["refresh_token"])
    with pytest.raises(Unauthorized, match="reused"):
        await accounts.refresh(first["refresh_token"], "192.0.2.99")
    clock.offset += 60  # past the login's period, not the refreshes'
    known = {a.decode() for a in await redis.zrange(known_key("Tara"), 0, -1)}
    assert known == {OWNER, OTHER}
    await fail(accounts, "Tara", 3, STRANGER)  # locks the account
    assert await logged_in(accounts, "Tara", OWNER)
    assert await logged_in(accounts, "Tara", OTHER)
    await refused(accounts, "Tara", address="192.0.2.99")


async def test_unknown_usernames_are_throttled_the_same_from_addresses(
    redis: aioredis.Redis,
) -> None:
    accounts = await throttled(redis, account=5)
    await accounts.register("Mona", PASSWORD)
    answers = {}
    for name in ("Mona", "nobody"):
        caught: list[ServiceError] = []
        for address in [STRANGER] * 4 + [OTHER] * 3 + ["192.0.2.99"]:
            with pytest.raises(ServiceError) as error:
                await accounts.login(name, WRONG, address)
            caught.append(error.value)
        answers[name] = [type(e).__name__ for e in caught]
    assert answers["Mona"] == answers["nobody"]
    assert answers["Mona"] == ["Unauthorized"] * 3 + ["TooManyAttempts"] + [
        "Unauthorized"] * 2 + ["TooManyAttempts"] * 2  # fmt: skip


async def test_a_known_address_is_forgotten_after_its_period_or_past_the_most_recent(
    redis: aioredis.Redis,
) -> None:
    clock = Clock()
    accounts = await throttled(
        redis, account=3, lock_base=1000.0, lock_max=1000.0, known_for=100.0, clock=clock
    )
    await accounts.register("Nina", PASSWORD)
    addresses = [f"198.51.100.{i}" for i in range(KNOWN_ADDRESSES + 1)]
    for address in addresses:  # the first is pushed out by the ten after it
        clock.offset += 1
        assert await logged_in(accounts, "Nina", address)
    known = {a.decode() for a in await redis.zrange(known_key("Nina"), 0, -1)}
    assert known == set(addresses[1:])
    await fail(accounts, "Nina", 3, STRANGER)  # locks the account
    await refused(accounts, "Nina", address=addresses[0])
    assert await logged_in(accounts, "Nina", addresses[1])
    clock.offset += 101  # the known addresses' period passes; the lock has not
    await refused(accounts, "Nina", address=addresses[1])


async def test_concurrent_attempts_from_many_addresses_cannot_exceed_the_account_limit(
    redis: aioredis.Redis,
) -> None:
    hasher = counting_hasher()
    first = await throttled(redis, account=5, hasher=hasher)
    second = await throttled(redis, account=5, hasher=hasher)
    await first.register("Omar", PASSWORD)
    kinds, checked = await concurrent_guesses((first, second), hasher, "Omar", "192.0.2.{}".format)
    assert kinds == ["TooManyAttempts"] * 15 + ["Unauthorized"] * 5
    assert checked == 5


async def test_an_admin_clears_every_address_and_the_account(redis: aioredis.Redis) -> None:
    accounts = await throttled(redis, account=5)
    await accounts.register("Pia", PASSWORD)
    await fail(accounts, "Pia", 3, STRANGER)
    await fail(accounts, "Pia", 2, OTHER)
    await fail(accounts, "Pia", 3)  # and logins naming no address
    for address in (STRANGER, "192.0.2.99", None):
        await refused(accounts, "Pia", address=address)
    assert await redis.zcard(addresses_key("Pia")) == 2
    assert await accounts.clear_login_failures("PIA") == {"cleared": True}
    assert [key async for key in redis.scan_iter("sb:{auth}:login_failures:*")] == []
    assert await redis.exists(addresses_key("Pia")) == 0
    for address in (STRANGER, "192.0.2.99", None):
        assert await logged_in(accounts, "Pia", address)
    assert await accounts.clear_login_failures("Pia") == {"cleared": False}


async def test_logins_naming_no_address_keep_the_count_per_username(
    redis: aioredis.Redis,
) -> None:
    """As before addresses (and in the keys older auth instances use): they share one
    count per username, apart from the addresses' counts."""
    accounts = await throttled(redis)
    await accounts.register("Quinn", PASSWORD)
    await fail(accounts, "Quinn", 3)
    await refused(accounts, "quinn")
    assert await redis.hget(failures_key("Quinn"), "failures") == b"3"
    assert await redis.exists(failures_key("Quinn", ACCOUNT)) == 0
    assert await logged_in(accounts, "Quinn", OWNER)  # an address has its own count


def test_addresses_are_keyed_by_host_ipv6_by_its_64() -> None:
    assert login_address("203.0.113.7") == "203.0.113.7"
    assert login_address("::ffff:203.0.113.7") == "203.0.113.7"
    assert login_address("2001:db8:1:2:aaaa::1") == login_address("2001:db8:1:2::bbbb")
    assert login_address("2001:db8:1:2::1") == "2001:db8:1:2::/64"
    assert login_address("2001:db8:1:3::1") != login_address("2001:db8:1:2::1")
    assert login_address("not an address") == login_address("not an address")
    assert len(login_address("x" * 500) or "") < 70
    assert login_address("") is None and login_address(None) is None
