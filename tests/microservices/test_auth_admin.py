"""`python -m microservices.auth.admin` as a real subprocess, against Redis DB 9."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from common import tokens
from common.credentials import Authenticator
from microservices.auth.accounts import Accounts
from tests.helpers import ROOT, db_url, fresh_db

pytestmark = pytest.mark.timeout(60)

PASSWORD = "operator-password-1"


@pytest.fixture
def url(redis_url: str) -> str:
    return db_url(redis_url, 9)


@pytest.fixture
async def redis(url: str) -> AsyncIterator[aioredis.Redis]:
    async with fresh_db(url) as client:
        yield client


def cli(url: str, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "REDIS_URL": url, "JWT_SECRET": "", "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "microservices.auth.admin", *args],
        input=stdin, capture_output=True, text=True, env=env, cwd=ROOT, timeout=30,
    )  # fmt: skip


async def test_create_admin_reads_the_password_from_stdin(url: str, redis) -> None:
    done = cli(url, "create-admin", "--username", "root", "--password-stdin", stdin=PASSWORD + "\n")
    assert done.returncode == 0, done.stderr
    assert PASSWORD not in done.stdout + done.stderr
    accounts = Accounts(redis)
    user = await accounts.users.find("root")
    assert user is not None and user.roles == {"user", "admin"}
    assert (await accounts.login("root", PASSWORD))["token_type"] == "bearer"
    again = cli(url, "create-admin", "--username", "ROOT", "--password-stdin", stdin=PASSWORD)
    assert again.returncode == 1 and "taken" in again.stderr
    short = cli(url, "create-admin", "--username", "other", "--password-stdin", stdin="short\n")
    assert short.returncode == 1 and "password must be" in short.stderr


def cli_bytes(
    url: str, *args: str, stdin: bytes, locale: str
) -> subprocess.CompletedProcess[bytes]:
    env = {**os.environ, "REDIS_URL": url, "JWT_SECRET": "", "PYTHONPATH": str(ROOT),
           "LC_ALL": locale}  # fmt: skip
    return subprocess.run(
        [sys.executable, "-m", "microservices.auth.admin", *args],
        input=stdin, capture_output=True, env=env, cwd=ROOT, timeout=30,
    )  # fmt: skip


@pytest.mark.parametrize("locale", ["C.UTF-8", "C"])  # stdin strict, or surrogateescape
async def test_a_password_line_that_is_not_utf8_is_a_one_line_refusal(
    url: str, redis, locale: str
) -> None:
    done = cli_bytes(url, "create-admin", "--username", "ops", "--password-stdin",
                     stdin=b"\xff\xfe a long passphrase\n", locale=locale)  # fmt: skip
    assert done.returncode == 1
    assert done.stderr == b"error: the password is not UTF-8 text\n" and not done.stdout
    assert await Accounts(redis).users.find("ops") is None


async def test_create_key_prints_the_key_once(url: str, redis) -> None:
    await Accounts(redis).register("ops", PASSWORD)
    done = cli(url, "create-key", "--username", "ops", "--scopes", "iptv nlp.run", "--name", "ci",
               "--expires-in", "3600")  # fmt: skip
    assert done.returncode == 0, done.stderr
    key = done.stdout.strip()
    assert key.startswith("sbk_") and key not in done.stderr
    authenticator = Authenticator(redis, configured_secret=None)
    await authenticator.start()
    try:
        principal = await authenticator.authenticate(key)
    finally:
        await authenticator.close()
    assert principal.kind == "api_key" and principal.name == "ci"
    assert principal.scopes == {"iptv", "nlp.run"} and principal.expires_at is not None
    for args, reason in (
        (("--username", "nobody", "--scopes", "iptv"), "no user"),
        (("--username", "ops", "--scopes", "admin"), "beyond"),
        (("--username", "ops", "--scopes", "Not Valid"), "invalid scopes"),
    ):
        refused = cli(url, "create-key", *args)
        assert refused.returncode == 1 and reason in refused.stderr, refused.stderr


async def test_rotate_signing_key(url: str, redis) -> None:
    first = cli(url, "rotate-signing-key")
    assert first.returncode == 0, first.stderr
    second = cli(url, "rotate-signing-key")
    kid = second.stdout.strip()
    assert second.returncode == 0 and kid.startswith('{"kid"')
    current, keys = await tokens.Keyring(redis).load()
    assert current is not None and current in kid and len(keys) == 3  # the old ones retire later


def test_usage_errors_exit_2(url: str) -> None:
    assert cli(url).returncode == 2
    assert cli(url, "create-admin").returncode == 2  # --username is required
    assert cli(url, "create-admin", "--username", "x", "--password", "p").returncode == 2
