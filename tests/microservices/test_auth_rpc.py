"""The auth worker as a real process, called through RpcClient (Redis DBs 4 and 5)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime

import jwt
import pytest
import redis.asyncio as aioredis

from common import InvalidParams, RemoteError, RpcClient
from common.constants import instances_key
from microservices.auth.accounts import Keys
from tests.helpers import ServiceProcess, wait_for, wait_for_async

pytestmark = pytest.mark.timeout(90)

PASSWORD = "hunter2-but-longer"
TTL = 120
CALL = 10.0  # argon2 at production cost on a busy test machine


def db_url(redis_url: str, db: int) -> str:
    return redis_url.rsplit("/", 1)[0] + f"/{db}"


def start_auth(url: str, secret: str = "") -> ServiceProcess:
    # An empty JWT_SECRET counts as unset, whatever the outer environment says.
    return ServiceProcess(
        ["python", "-m", "microservices.auth"],
        env={"REDIS_URL": url, "JWT_TTL": str(TTL), "JWT_SECRET": secret},
    ).start()


async def ready(rpc: RpcClient, process: ServiceProcess) -> None:
    """Poll until the worker answers a call."""

    async def answered() -> bool:
        try:
            await rpc.call("auth.verify", "probe", timeout=2.0)
        except RemoteError as exc:
            return exc.code == "unauthorized"  # the expected answer: it is serving
        return False

    try:
        await wait_for_async(answered, timeout=30)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n--- auth log ---\n{process.log_tail()}") from None


@pytest.fixture(scope="module")
async def redis4(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(db_url(redis_url, 4))
    await client.flushdb()
    try:
        yield client
    finally:
        await client.flushdb()
        await client.aclose()


@pytest.fixture(scope="module")
async def auth(redis_url: str, redis4: aioredis.Redis) -> AsyncIterator[ServiceProcess]:
    process = start_auth(db_url(redis_url, 4))
    try:
        yield process
    finally:
        process.stop()


@pytest.fixture(scope="module")
async def rpc(redis_url: str, auth: ServiceProcess) -> AsyncIterator[RpcClient]:
    async with RpcClient(db_url(redis_url, 4)) as client:
        await ready(client, auth)
        yield client


@pytest.fixture
async def redis5(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(db_url(redis_url, 5))
    await client.flushdb()
    try:
        yield client
    finally:
        await client.flushdb()
        await client.aclose()


async def test_register_login_verify(rpc: RpcClient, redis4: aioredis.Redis) -> None:
    user = await rpc.call("auth.register", "Olivia", PASSWORD, timeout=CALL)
    assert user["username"] == "Olivia" and user["created_at"].tzinfo is not None
    assert user["created_at"] <= datetime.now(UTC)
    token = await rpc.call("auth.login", username="olivia", password=PASSWORD, timeout=CALL)
    assert token["token_type"] == "bearer" and token["expires_in"] == TTL
    claims = await rpc.call("auth.verify", token["access_token"])
    assert claims["sub"] == user["user_id"] and claims["exp"] - claims["iat"] == TTL
    # Signed with the secret the worker generated and stored for every instance.
    secret = (await redis4.get(Keys.jwt_secret)).decode()
    local = jwt.decode(token["access_token"], secret, algorithms=["HS256"], audience="switchboard")
    assert local == claims


async def test_errors_map_to_codes(rpc: RpcClient) -> None:
    await rpc.call("auth.register", "Peggy", PASSWORD, timeout=CALL)
    cases = [
        ("auth.register", ("peggy", PASSWORD), "conflict"),
        ("auth.register", ("p", PASSWORD), "bad_request"),
        ("auth.register", ("Quentin", "short"), "bad_request"),
        ("auth.login", ("Peggy", "wrong password"), "unauthorized"),
        ("auth.login", ("nobody-here", PASSWORD), "unauthorized"),
        ("auth.verify", ("not.a.token",), "unauthorized"),
    ]
    for method, args, code in cases:
        with pytest.raises(RemoteError) as caught:
            await rpc.call(method, *args, timeout=CALL)
        assert caught.value.code == code, (method, args)
    with pytest.raises(InvalidParams):
        await rpc.call("auth.login", "Peggy", 12345678, timeout=CALL)


async def test_unknown_user_and_wrong_password_answer_alike(rpc: RpcClient) -> None:
    await rpc.call("auth.register", "Rupert", PASSWORD, timeout=CALL)
    messages = set()
    for username, password in (("Rupert", "wrong password"), ("ghost-user", PASSWORD)):
        with pytest.raises(RemoteError) as caught:
            await rpc.call("auth.login", username, password, timeout=CALL)
        messages.add(caught.value.message)
    assert messages == {"invalid username or password"}


async def test_worker_logs_no_passwords_or_hashes(rpc: RpcClient, auth: ServiceProcess) -> None:
    await rpc.call("auth.register", "Sybil", "sybil-secret-pw", timeout=CALL)
    await rpc.call("auth.login", "Sybil", "sybil-secret-pw", timeout=CALL)
    for password in ("sybil-wrong-pw", 987654321):
        with pytest.raises((RemoteError, InvalidParams)):
            await rpc.call("auth.login", "Sybil", password, timeout=CALL)
    log = auth.log_path.read_text()
    assert "user registered" in log  # the log is being written at all
    for secret in ("sybil-secret-pw", "sybil-wrong-pw", "987654321", "$argon2"):
        assert secret not in log


async def test_instances_share_the_generated_secret(redis_url: str, redis5) -> None:
    url = db_url(redis_url, 5)
    first = start_auth(url)
    second: ServiceProcess | None = None
    try:
        async with RpcClient(url) as rpc:
            await ready(rpc, first)
            await rpc.call("auth.register", "Trent", PASSWORD, timeout=CALL)
            token = (await rpc.call("auth.login", "Trent", PASSWORD, timeout=CALL))["access_token"]
            second = start_auth(url)
            await wait_for_async(lambda: _live(redis5, 2), timeout=30)
            assert first.stop() == 0  # only the second instance is left
            await wait_for_async(lambda: _live(redis5, 1), timeout=10)
            assert (await rpc.call("auth.verify", token))["name"] == "Trent"
    finally:
        first.stop()
        if second is not None:
            second.stop()


async def test_a_configured_secret_is_used_and_not_stored(redis_url: str, redis5) -> None:
    url = db_url(redis_url, 5)
    secret = "c" * 64
    process = start_auth(url, secret=secret)
    try:
        async with RpcClient(url) as rpc:
            await ready(rpc, process)
            await rpc.call("auth.register", "Uma", PASSWORD, timeout=CALL)
            token = (await rpc.call("auth.login", "Uma", PASSWORD, timeout=CALL))["access_token"]
        claims = jwt.decode(token, secret, algorithms=["HS256"], audience="switchboard")
        assert claims["name"] == "Uma"
        assert not await redis5.exists(Keys.jwt_secret)
    finally:
        process.stop()


async def test_a_short_configured_secret_stops_start_up(redis_url: str, redis5) -> None:
    process = start_auth(db_url(redis_url, 5), secret="too-short")
    try:
        wait_for(lambda: not process.alive(), timeout=30)
        assert process.process is not None and process.process.returncode != 0
        assert "JWT_SECRET must be at least 32 bytes" in process.log_path.read_text()
        assert not await redis5.zcard(instances_key("auth"))
    finally:
        process.stop()


async def _live(client: aioredis.Redis, expected: int) -> bool:
    return int(await client.zcard(instances_key("auth"))) == expected
