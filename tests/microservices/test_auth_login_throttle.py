"""Login throttling per username (`microservices.auth.throttle`) through `Accounts`,
against a real Redis (DB 2): the lock after N failures, unknown names treated the
same, resets, expiry, growth, races, the admin's clear, and Redis down.

Locks are either long with a `Clock` moved past them, or a fraction of a second
and waited out by polling; nothing asserts how long anything took.
"""

from __future__ import annotations

import asyncio
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
    STALE_SECONDS,
    ThrottleRules,
    failures_key,
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


def counting_hasher() -> CountingHasher:
    return CountingHasher(time_cost=1, memory_cost=8192, parallelism=1)


async def throttled(
    redis: aioredis.Redis,
    *,
    lock_base: float = 10.0,
    lock_max: float = 60.0,
    window: float = 60.0,
    clock: Clock | None = None,
    hasher: CountingHasher | None = None,
) -> Accounts:
    """Accounts whose logins lock after 3 failures (for 10 s by default)."""
    kwargs: dict[str, Any] = {"throttle": ThrottleRules(3, lock_base, lock_max, window)}
    if clock is not None:
        kwargs["clock"] = clock
    if hasher is not None:
        kwargs["hasher"] = hasher
    accounts = make_accounts(redis, **kwargs)
    await accounts.prepare()
    return accounts


async def fail(accounts: Accounts, username: str, times: int) -> None:
    for _ in range(times):
        with pytest.raises(Unauthorized, match="invalid username or password"):
            await accounts.login(username, WRONG)


async def refused(accounts: Accounts, username: str, password: str = PASSWORD) -> float:
    """Log in, expecting the throttle's refusal; its retry_after."""
    with pytest.raises(TooManyAttempts) as caught:
        await accounts.login(username, password)
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
    verified = hasher.verifications
    calls = [(first if i % 2 else second).login("Frank", WRONG) for i in range(20)]
    results = await asyncio.gather(*calls, return_exceptions=True)
    kinds = sorted(type(r).__name__ for r in results)
    assert kinds == ["TooManyAttempts"] * 17 + ["Unauthorized"] * 3
    assert hasher.verifications - verified == 3


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
