"""The auth worker as a real process, called through RpcClient (Redis DBs 4 and 5)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime

import jwt
import pytest
import redis.asyncio as aioredis

from common import InvalidParams, RemoteError, RpcClient, tokens
from common.constants import instances_key
from common.tokens import Keyring
from tests.helpers import ServiceProcess, db_url, fresh_db, wait_for, wait_for_async

pytestmark = pytest.mark.timeout(90)

PASSWORD = "hunter2-but-longer"
TTL = 120
CALL = 10.0  # argon2 at production cost on a busy test machine


def start_auth(url: str, secret: str = "", **env: str) -> ServiceProcess:
    # Empty values count as unset, whatever the outer environment says.
    full_env = {"REDIS_URL": url, "JWT_TTL": str(TTL), "JWT_SECRET": secret,
                "AUTH_ADMIN_USERNAME": "", "AUTH_ADMIN_PASSWORD": "", **env}  # fmt: skip
    return ServiceProcess(["python", "-m", "microservices.auth"], env=full_env).start()


async def ready(rpc: RpcClient, process: ServiceProcess) -> None:
    """Poll until the worker answers a call."""

    async def answered() -> bool:
        return await rpc.call("auth.introspect", "probe", timeout=2.0) == {"active": False}

    try:
        await wait_for_async(answered, timeout=30)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n--- auth log ---\n{process.log_tail()}") from None


@pytest.fixture(scope="module")
async def redis4(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    async with fresh_db(db_url(redis_url, 4)) as client:
        yield client


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
    async with fresh_db(db_url(redis_url, 5)) as client:
        yield client


async def test_register_login_refresh_logout(rpc: RpcClient, redis4: aioredis.Redis) -> None:
    user = await rpc.call("auth.register", "Olivia", PASSWORD, timeout=CALL)
    assert user["username"] == "Olivia" and user["roles"] == ["user"]
    assert user["created_at"].tzinfo is not None and user["created_at"] <= datetime.now(UTC)
    login = await rpc.call("auth.login", username="olivia", password=PASSWORD, timeout=CALL)
    assert login["token_type"] == "bearer" and login["expires_in"] == TTL
    claims = await rpc.call("auth.introspect", login["access_token"])
    assert claims["active"] is True and claims["sub"] == user["user_id"]
    assert claims["exp"] - claims["iat"] == TTL and claims["scope"] == "*"
    # Signed with the key the worker generated and stored for every process.
    _, keys = await Keyring(redis4).load()
    secret = keys[jwt.get_unverified_header(login["access_token"])["kid"]].secret
    local = jwt.decode(login["access_token"], secret, algorithms=["HS256"], audience="switchboard")
    assert local == {k: v for k, v in claims.items() if k != "active"}
    me = await rpc.call("auth.me", user_id=user["user_id"])
    assert me == {"user_id": user["user_id"], "username": "Olivia", "roles": ["user"],
                  "scopes": ["*"]}  # fmt: skip

    renewed = await rpc.call("auth.refresh", refresh_token=login["refresh_token"])
    assert renewed["refresh_token"] != login["refresh_token"]
    with pytest.raises(RemoteError) as caught:
        await rpc.call("auth.refresh", refresh_token=login["refresh_token"])
    assert caught.value.code == "unauthorized"
    assert caught.value.message == "refresh token reused: session revoked"
    assert (await rpc.call("auth.introspect", renewed["access_token"]))["active"] is False

    again = await rpc.call("auth.login", "Olivia", PASSWORD, timeout=CALL)
    sid = (await rpc.call("auth.introspect", again["access_token"]))["sid"]
    assert await rpc.call("auth.logout", session_id=sid) == {"revoked": True}
    assert (await rpc.call("auth.introspect", again["access_token"]))["active"] is False


async def test_api_keys_over_rpc(rpc: RpcClient) -> None:
    user = await rpc.call("auth.register", "Kim", PASSWORD, timeout=CALL)
    key = await rpc.call("auth.create_api_key", user_id=user["user_id"], name="ci",
                         scopes=["iptv"], expires_in=3600)  # fmt: skip
    assert key["api_key"].startswith("sbk_") and key["scopes"] == ["iptv"]
    listed = await rpc.call("auth.list_api_keys", user_id=user["user_id"])
    assert [k["key_id"] for k in listed] == [key["key_id"]] and "api_key" not in listed[0]
    assert (await rpc.call("auth.introspect", key["api_key"]))["active"] is True
    with pytest.raises(RemoteError) as caught:
        await rpc.call("auth.create_api_key", user_id=user["user_id"], scopes=["admin"])
    assert caught.value.code == "forbidden"
    deleted = await rpc.call("auth.delete_api_key", user_id=user["user_id"], key_id=key["key_id"])
    assert deleted == {"revoked": True}
    assert (await rpc.call("auth.introspect", key["api_key"]))["active"] is False


async def test_a_key_lifetime_is_a_number_not_a_boolean(rpc: RpcClient) -> None:
    user = await rpc.call("auth.register", "Bool", PASSWORD, timeout=CALL)
    for flag in (True, False):  # lax mode read them as 1 and 0: a key living 1 s
        with pytest.raises(InvalidParams) as caught:
            await rpc.call("auth.create_api_key", user_id=user["user_id"], scopes=["iptv"],
                           expires_in=flag)  # fmt: skip
        assert "expires_in" in str(caught.value) and "boolean" in str(caught.value)
    assert await rpc.call("auth.list_api_keys", user_id=user["user_id"]) == []
    key = await rpc.call("auth.create_api_key", user_id=user["user_id"], scopes=["iptv"],
                         expires_in="3600")  # text is still read as a number  # fmt: skip
    assert (key["expires_at"] - key["created_at"]).total_seconds() == 3600


async def test_admin_methods_over_rpc(rpc: RpcClient, redis4: aioredis.Redis) -> None:
    user = await rpc.call("auth.register", "Ada", PASSWORD, timeout=CALL)
    promoted = await rpc.call("auth.set_roles", user_id=user["user_id"], roles=["user", "admin"])
    assert promoted["roles"] == ["admin", "user"] and "admin" in promoted["scopes"]
    scoped = await rpc.call("auth.set_scopes", user_id=user["user_id"], scopes=["iptv"])
    assert scoped["scopes"] == ["admin", "iptv"]
    assert "Ada" in [u["username"] for u in await rpc.call("auth.list_users")]
    before = await rpc.call("auth.login", "Ada", PASSWORD, timeout=CALL)
    rotated = await rpc.call("auth.rotate_signing_key")
    assert await redis4.get(tokens.CURRENT_KID) == rotated["kid"].encode()
    assert (await rpc.call("auth.introspect", before["access_token"]))["active"] is True
    after = await rpc.call("auth.refresh", refresh_token=before["refresh_token"])
    assert jwt.get_unverified_header(after["access_token"])["kid"] == rotated["kid"]
    jti = (await rpc.call("auth.introspect", after["access_token"]))["jti"]
    assert await rpc.call("auth.revoke", kind="token", id=jti) == {"revoked": True}
    assert (await rpc.call("auth.introspect", after["access_token"]))["active"] is False


async def test_errors_map_to_codes(rpc: RpcClient) -> None:
    user = await rpc.call("auth.register", "Peggy", PASSWORD, timeout=CALL)
    cases = [
        ("auth.register", ("peggy", PASSWORD), "conflict"),
        ("auth.register", ("p", PASSWORD), "bad_request"),
        ("auth.register", ("Quentin", "short"), "bad_request"),
        ("auth.login", ("Peggy", "wrong password"), "unauthorized"),
        ("auth.login", ("nobody-here", PASSWORD), "unauthorized"),
        ("auth.refresh", ("sbr_garbage",), "unauthorized"),
        ("auth.logout", ("not-a-session",), "bad_request"),
        ("auth.me", ("no-such-user",), "not_found"),
        ("auth.revoke", ("everything", "x"), "bad_request"),
        ("auth.set_roles", (user["user_id"], ["root"]), "bad_request"),
        ("auth.create_api_key", (user["user_id"], "k", ["nope nope"]), "bad_request"),
        ("auth.delete_api_key", (user["user_id"], "0123456789ab"), "not_found"),
    ]
    for method, args, code in cases:
        with pytest.raises(RemoteError) as caught:
            await rpc.call(method, *args, timeout=CALL)
        assert caught.value.code == code, (method, args)
    with pytest.raises(InvalidParams):
        await rpc.call("auth.login", "Peggy", 12345678, timeout=CALL)
    with pytest.raises(InvalidParams):
        await rpc.call("auth.set_scopes", user["user_id"], "iptv", timeout=CALL)


async def test_unknown_user_and_wrong_password_answer_alike(rpc: RpcClient) -> None:
    await rpc.call("auth.register", "Rupert", PASSWORD, timeout=CALL)
    messages = set()
    for username, password in (("Rupert", "wrong password"), ("ghost-user", PASSWORD)):
        with pytest.raises(RemoteError) as caught:
            await rpc.call("auth.login", username, password, timeout=CALL)
        messages.add(caught.value.message)
    assert messages == {"invalid username or password"}


async def test_worker_logs_no_secrets(rpc: RpcClient, auth: ServiceProcess) -> None:
    user = await rpc.call("auth.register", "Sybil", "sybil-secret-pw", timeout=CALL)
    login = await rpc.call("auth.login", "Sybil", "sybil-secret-pw", timeout=CALL)
    for password in ("sybil-wrong-pw", 987654321):
        with pytest.raises((RemoteError, InvalidParams)):
            await rpc.call("auth.login", "Sybil", password, timeout=CALL)
    renewed = await rpc.call("auth.refresh", login["refresh_token"])
    key = await rpc.call("auth.create_api_key", user["user_id"], "ci", ["iptv"])
    log = auth.log_path.read_text()
    assert "user registered" in log and "api key created" in log  # the log is being written
    for secret in ("sybil-secret-pw", "sybil-wrong-pw", "987654321", "$argon2",
                   login["access_token"], login["refresh_token"], renewed["refresh_token"],
                   key["api_key"]):  # fmt: skip
        assert secret not in log


async def test_instances_share_the_generated_key(redis_url: str, redis5) -> None:
    url = db_url(redis_url, 5)
    first = start_auth(url)
    second: ServiceProcess | None = None
    try:
        async with RpcClient(url) as rpc:
            await ready(rpc, first)
            await rpc.call("auth.register", "Trent", PASSWORD, timeout=CALL)
            login = await rpc.call("auth.login", "Trent", PASSWORD, timeout=CALL)
            second = start_auth(url)
            await wait_for_async(lambda: _live(redis5, 2), timeout=30)
            assert first.stop() == 0  # only the second instance is left
            await wait_for_async(lambda: _live(redis5, 1), timeout=10)
            assert (await rpc.call("auth.introspect", login["access_token"]))["name"] == "Trent"
            renewed = await rpc.call("auth.refresh", login["refresh_token"])
            assert (await rpc.call("auth.introspect", renewed["access_token"]))["active"]
        kid, keys = await Keyring(redis5).load()
        assert list(keys) == [kid]
    finally:
        first.stop()
        if second is not None:
            second.stop()


async def test_a_configured_secret_seeds_the_keyring(redis_url: str, redis5) -> None:
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
        assert jwt.get_unverified_header(token)["kid"] == tokens.key_id(secret)
        assert await redis5.get(tokens.CURRENT_KID) == tokens.key_id(secret).encode()
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


async def test_the_first_admin_is_bootstrapped_from_the_environment(redis_url: str, redis5) -> None:
    url = db_url(redis_url, 5)
    process = start_auth(url, AUTH_ADMIN_USERNAME="root", AUTH_ADMIN_PASSWORD="root-password-1")
    try:
        async with RpcClient(url) as rpc:
            await ready(rpc, process)
            users = await rpc.call("auth.list_users")
            assert [(u["username"], u["roles"]) for u in users] == [("root", ["admin", "user"])]
            login = await rpc.call("auth.login", "root", "root-password-1", timeout=CALL)
            assert "admin" in (await rpc.call("auth.introspect", login["access_token"]))["scope"]
        assert "root-password-1" not in process.log_path.read_text()
    finally:
        process.stop()


async def test_the_first_admin_without_its_password_stops_the_start_up(
    redis_url: str, redis5
) -> None:
    """Half the pair is a mistake: said in one line, before anything is written."""
    url = db_url(redis_url, 5)
    process = start_auth(url, AUTH_ADMIN_USERNAME="root")
    try:
        assert process.process is not None and process.process.wait(timeout=30) == 1
        lines = process.log_path.read_text().splitlines()
        assert len(lines) == 1 and "without AUTH_ADMIN_PASSWORD" in lines[0], lines
        assert await redis5.dbsize() == 0
    finally:
        process.stop()


async def _live(client: aioredis.Redis, expected: int) -> bool:
    return int(await client.zcard(instances_key("auth"))) == expected
