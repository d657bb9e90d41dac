"""Login throttling through the real gateway route `POST /api/v1/auth/login` and a
real auth worker: 429 with `Retry-After` and the JSON error body, the same answers
for unknown usernames, the lock passing (polled, never timed), the admin's
`DELETE /admin/login-failures/...`, and the client address the gateway passes on:
a stranger's failures do not lock the owner out; a registration and a refresh
make theirs known; a device token lets the owner in past a stranger at the same
address (a NAT), and any other token counts by the address.

Two gateways, each with its auth worker, lock a username after 3 failures from
one address, 5 from all: `gateway` (Redis DB 12) for 2 s, for the test that waits
for a lock to pass; `long_locks` (DB 13) for a minute, so that a test asserting a
refusal does not depend on a lock outlasting the requests before it on a busy
machine. The policy's per-IP limits are off, so every 429 is the throttle's. The
gateways trust `X-Forwarded-For` from 127.0.0.1, so a test names the client's
address with it.
"""

from __future__ import annotations

import contextlib
import math
import uuid
from collections.abc import Iterator

import httpx
import pytest
import redis

from microservices.auth.throttle import known_key
from tests.helpers import ServiceProcess, db_url, issue_api_key, wait_for
from tests.support.policy import set_document
from tests.webapi.conftest import running_gateway

pytestmark = pytest.mark.timeout(120)

PASSWORD = "correct horse battery"
WRONG = "not the password"
THROTTLE = {"AUTH_LOGIN_MAX_FAILURES": "3", "AUTH_LOGIN_FAILURE_WINDOW": "60",
            "AUTH_LOGIN_MAX_FAILURES_ACCOUNT": "5"}  # fmt: skip
SHORT_LOCK, LONG_LOCK = 2.0, 60.0  # seconds: the first lock of each gateway
LONG_DB = 13
# Client addresses (documentation ranges).
OWNER, STRANGER, OTHER, NEW = "198.51.100.20", "203.0.113.7", "192.0.2.33", "192.0.2.99"


@contextlib.contextmanager
def _serving(redis_url: str, db: int, lock: float) -> Iterator[str]:
    """A gateway and an auth worker on Redis DB `db` whose first lock lasts `lock`
    seconds (the next, twice as long); the gateway's base URL."""
    url = db_url(redis_url, db)
    redis.Redis.from_url(url).flushdb()
    set_document(url, limits=[])
    env = {"REDIS_URL": url, "AUTH_ADMIN_USERNAME": "", "AUTH_ADMIN_PASSWORD": "", **THROTTLE,
           "AUTH_LOGIN_LOCK_BASE": str(lock), "AUTH_LOGIN_LOCK_MAX": str(2 * lock)}  # fmt: skip
    auth = ServiceProcess(["python", "-m", "microservices.auth"], env=env, name="auth").start()
    try:
        with running_gateway(url, TRUSTED_PROXIES="127.0.0.1") as base:

            def live() -> bool:
                services = httpx.get(f"{base}/health", timeout=2).json()["services"]
                return bool(services.get("auth", {}).get("live"))

            wait_for(live, timeout=60)
            yield base
    except AssertionError:
        print(f"--- auth ---\n{auth.log_tail()}")
        raise
    finally:
        auth.stop()
        redis.Redis.from_url(url).flushdb()


@pytest.fixture(scope="module")
def gateway(redis_url: str) -> Iterator[str]:
    with _serving(redis_url, 12, SHORT_LOCK) as base:
        yield base


@pytest.fixture(scope="module")
def long_locks(redis_url: str) -> Iterator[str]:
    with _serving(redis_url, LONG_DB, LONG_LOCK) as base:
        yield base


def login(
    base: str, username: str, password: str, client: str | None = None, device: object = None
) -> httpx.Response:
    """A login; from `client` (the address a trusted proxy reports) and with the
    `device_token` `device` if given."""
    body = {"username": username, "password": password}
    if device is not None:
        body["device_token"] = device
    headers = {"X-Forwarded-For": client} if client else {}
    return httpx.post(f"{base}/api/v1/auth/login", json=body, headers=headers, timeout=10)


def registered(base: str, client: str | None = None) -> str:
    """A new user's name; registered from `client` if given."""
    username = f"u{uuid.uuid4().hex[:10]}"
    body = {"username": username, "password": PASSWORD}
    headers = {"X-Forwarded-For": client} if client else {}
    r = httpx.post(f"{base}/api/v1/auth/register", json=body, headers=headers, timeout=10)
    assert r.status_code == 201, r.text
    return username


def assert_throttled(r: httpx.Response, lock: float = LONG_LOCK) -> None:
    """`r` is the throttle's refusal during a first lock of `lock` seconds."""
    assert r.status_code == 429, r.text
    error = r.json()["error"]
    assert error["code"] == "too_many_attempts"
    assert 0 < error["retry_after"] <= lock  # what is left of the first lock
    retry_after = r.headers["retry-after"]  # whole seconds, rounded up
    assert retry_after == str(max(1, math.ceil(error["retry_after"])))
    assert error["message"] == f"too many failed logins: try again in {retry_after} s"


def test_failures_then_429_with_retry_after_until_the_lock_passes(gateway: str) -> None:
    username = registered(gateway)
    for _ in range(3):
        assert login(gateway, username, WRONG).status_code == 401
    assert_throttled(login(gateway, username, PASSWORD), SHORT_LOCK)  # the right password
    assert_throttled(login(gateway, username.upper(), PASSWORD), SHORT_LOCK)
    # The lock passes: the right password gets in again.
    wait_for(lambda: login(gateway, username, PASSWORD).status_code == 200, timeout=10)


def test_unknown_usernames_get_the_same_answers(long_locks: str) -> None:
    answers = {}
    for username in (registered(long_locks), f"nobody{uuid.uuid4().hex[:8]}"):
        responses = [login(long_locks, username, WRONG) for _ in range(4)]
        answers[username] = [(r.status_code, r.json()["error"]["code"]) for r in responses]
        assert_throttled(responses[-1])
    first, second = answers.values()
    assert first == second == [(401, "unauthorized")] * 3 + [(429, "too_many_attempts")]


def test_an_admin_clears_the_throttle(long_locks: str, redis_url: str) -> None:
    admin = {"Authorization": f"Bearer {issue_api_key(db_url(redis_url, LONG_DB), ['*', 'admin'])}"}
    username = registered(long_locks)
    for _ in range(3):
        assert login(long_locks, username, WRONG).status_code == 401
    assert_throttled(login(long_locks, username, PASSWORD))
    url = f"{long_locks}/admin/login-failures/{username}"
    assert httpx.delete(url, timeout=10).status_code == 401
    cleared = httpx.delete(url, headers=admin, timeout=10)
    assert cleared.status_code == 200 and cleared.json() == {"cleared": True}
    assert login(long_locks, username, PASSWORD).status_code == 200


def test_strangers_cannot_lock_the_owner_out_and_many_addresses_meet_the_backstop(
    long_locks: str,
) -> None:
    username = registered(long_locks)
    for _ in range(3):
        assert login(long_locks, username, WRONG, STRANGER).status_code == 401
    assert_throttled(login(long_locks, username, PASSWORD, STRANGER))
    # The owner elsewhere is not locked out (and the address is known from now on).
    assert login(long_locks, username, PASSWORD, OWNER).status_code == 200
    for _ in range(2):  # 5 failures from all addresses: the account locks
        assert login(long_locks, username, WRONG, OTHER).status_code == 401
    assert_throttled(login(long_locks, username, PASSWORD, NEW))
    assert login(long_locks, username, PASSWORD, OWNER).status_code == 200  # but not there


def test_register_and_refresh_pass_the_client_address(long_locks: str, redis_url: str) -> None:
    """As with a login: the auth service knows the address as the user's, so the
    account's lock spares it (tested through `Accounts`)."""
    username = registered(long_locks, OWNER)
    with redis.Redis.from_url(db_url(redis_url, LONG_DB)) as client:

        def known() -> set[str]:
            return {a.decode() for a in client.zrange(known_key(username), 0, -1)}

        assert known() == {OWNER}
        r = login(long_locks, username, PASSWORD, OWNER)
        assert r.status_code == 200, r.text
        body = {"refresh_token": r.json()["refresh_token"]}
        url = f"{long_locks}/api/v1/auth/refresh"
        r = httpx.post(url, json=body, headers={"X-Forwarded-For": NEW}, timeout=10)
        assert r.status_code == 200, r.text
        assert known() == {OWNER, NEW}


def device_token(r: httpx.Response) -> str | None:
    """The device token a successful login gave."""
    assert r.status_code == 200, r.text
    token = r.json().get("device_token")
    assert token is None or token.startswith("sbd_")
    return token


def test_the_owners_device_gets_in_after_a_stranger_at_the_same_address_locked_it(
    long_locks: str,
) -> None:
    """Behind one NAT, the owner and a stranger have the same address: the stranger's
    failures lock it, and the owner's device token still gets in (a new one each time)."""
    username = registered(long_locks, OWNER)
    token = device_token(login(long_locks, username, PASSWORD, OWNER))
    for _ in range(3):
        assert login(long_locks, username, WRONG, OWNER).status_code == 401
    assert_throttled(login(long_locks, username, PASSWORD, OWNER))
    for _ in range(2):
        r = login(long_locks, username, PASSWORD, OWNER, token)
        assert r.status_code == 200, r.text
        assert device_token(r) != token
        token = device_token(r)
    assert_throttled(login(long_locks, username, WRONG, OWNER))  # still, without one


def test_another_token_counts_by_the_address(long_locks: str) -> None:
    """Forged, another user's, or not a string (a 422): no way past the address's lock."""
    username, other = registered(long_locks), registered(long_locks)
    others = device_token(login(long_locks, other, PASSWORD, OWNER))
    for _ in range(3):
        assert login(long_locks, username, WRONG, OWNER).status_code == 401
    for token in ("sbd_" + "A" * 43, others):
        assert_throttled(login(long_locks, username, PASSWORD, OWNER, token))
    r = login(long_locks, username, PASSWORD, OWNER, {"device": 1})
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_params", r.text


def test_a_devices_own_failures_lock_it(long_locks: str) -> None:
    """A device token is no way around the limit: its own failures lock it, wherever
    it is used, and not its address."""
    username = registered(long_locks)
    token = device_token(login(long_locks, username, PASSWORD, OWNER))
    for _ in range(3):
        assert login(long_locks, username, WRONG, OWNER, token).status_code == 401
    assert_throttled(login(long_locks, username, PASSWORD, OWNER, token))
    assert_throttled(login(long_locks, username, PASSWORD, NEW, token))
    assert login(long_locks, username, PASSWORD, OWNER).status_code == 200
