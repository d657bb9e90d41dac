"""`Authenticator`'s API key records while Redis cannot be read (up and refusing: a
script running past its time limit, the credentials): a record past its TTL answers
for `api_key_stale_if_error` more, then the key's request is a 503, as is a key id
never read; the read-ahead keeps the record it wanted to replace; the outage is one
warning line with its kind, never a traceback. A private redis-server put in each
state (`tests.support.redis_states`: out of memory, a read-only replica and a failed
save refuse writes only, so a record is still read then)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

import jwt
import pytest
import redis
import redis.asyncio as aioredis

from common import apikeys
from common.connection import connect
from common.credentials import Authenticator
from common.embedded_redis import EmbeddedRedis
from common.errors import ServiceUnavailable, Unauthorized
from tests.common.credentials_fixtures import OWNER, SECRET
from tests.helpers import Clock, wait_for_async
from tests.support.redis_states import (  # noqa: F401 (the *_fixture ones)
    MESSAGES,
    STATES,
    admin_fixture,
    private_redis_fixture,
)

pytestmark = pytest.mark.timeout(60)

NOT_READ = "API key records not read: stale ones answer meanwhile"


@pytest.fixture(name="client")
async def client_fixture(private_redis: EmbeddedRedis) -> AsyncIterator[aioredis.Redis]:
    client = connect(private_redis.url)
    try:
        yield client
    finally:
        await client.aclose()


async def _authenticator(client: aioredis.Redis, clock: Clock) -> Authenticator:
    auth = Authenticator(client, configured_secret=SECRET, api_key_cache_ttl=10,
                         api_key_stale_if_error=60, resync_interval=3600, clock=clock)  # fmt: skip
    await auth.start()
    return auth


async def _stored_key(client: aioredis.Redis) -> tuple[str, str]:
    text, record = apikeys.new_key(OWNER, "ci", ["iptv"])
    await apikeys.write(client, record)
    return text, record.key_id


def _lines(caplog: Any, message: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.getMessage() == message]


@pytest.mark.parametrize("kind", ["busy", "auth"])
async def test_a_stale_record_answers_while_redis_refuses_up_to_the_bound(
    kind: str, client: aioredis.Redis, admin: redis.Redis, caplog: Any
) -> None:
    caplog.set_level(logging.INFO, logger="common.apikey_cache")
    clock = Clock()
    auth = await _authenticator(client, clock)
    try:
        text, key_id = await _stored_key(client)
        assert (await auth.authenticate(text)).key_id == key_id
        never_read = apikeys.new_key(OWNER, "never read", ["iptv"])[0]
        with STATES[kind](admin):
            clock.offset = 30  # past the TTL (10 s), within the bound (60 s more)
            for _ in range(3):
                assert (await auth.authenticate(text)).key_id == key_id
            with pytest.raises(ServiceUnavailable) as caught:
                await auth.authenticate(never_read)
            assert caught.value.message == f"credential store unavailable: {MESSAGES[kind]}"
            clock.offset = 71  # past the bound
            with pytest.raises(ServiceUnavailable):
                await auth.authenticate(text)
        assert (await auth.authenticate(text)).key_id == key_id  # read again
    finally:
        await auth.close()
    failed = _lines(caplog, NOT_READ)
    assert [(r.__dict__["fields"]["kind"], r.__dict__["fields"]["at"]) for r in failed] == [
        (kind, "request")]  # fmt: skip
    assert failed[0].__dict__["fields"]["refused"] == MESSAGES[kind]
    assert failed[0].exc_info is None
    assert len(_lines(caplog, "API key records read")) == 1


async def test_the_read_ahead_keeps_its_record_and_logs_one_line_while_redis_refuses(
    client: aioredis.Redis, admin: redis.Redis, caplog: Any
) -> None:
    caplog.set_level(logging.INFO, logger="common.apikey_cache")
    clock = Clock()
    auth = await _authenticator(client, clock)
    try:
        text, key_id = await _stored_key(client)
        await auth.authenticate(text)
        with STATES["busy"](admin):
            for offset in (8.1, 9.2):  # due (80 % of the 10 s TTL), a second apart
                clock.offset = offset
                principal = auth.authenticate_sync_cached(text)  # starts the read ahead
                assert principal is not None and principal.key_id == key_id
                await wait_for_async(lambda: not auth.api_keys.reading_ahead)  # that read is over
            assert auth.authenticate_sync_cached(text) is not None
    finally:
        await auth.close()
    failed = _lines(caplog, NOT_READ)
    assert [(r.__dict__["fields"]["kind"], r.__dict__["fields"]["at"]) for r in failed] == [
        ("busy", "read-ahead")]  # fmt: skip
    assert [r for r in caplog.records if r.exc_info] == []


@pytest.mark.parametrize("kind", ["busy", "auth"])
async def test_an_unknown_kid_is_a_503_while_redis_cannot_be_read(
    kind: str, client: aioredis.Redis, admin: redis.Redis, caplog: Any
) -> None:
    # Whether the token is good cannot be told: a 401 would have the client drop a token
    # signed with a key rotated in elsewhere. A kid the keyring does not have once Redis
    # answers is a 401, as always.
    auth = await _authenticator(client, Clock())
    caplog.set_level(logging.INFO, logger="common.credentials")
    made_up = jwt.encode({"sub": "u1"}, "k" * 64, algorithm="HS256",
                         headers={"kid": "0123456789abcdef"})  # fmt: skip
    try:
        with STATES[kind](admin):
            for _ in range(2):
                with pytest.raises(ServiceUnavailable) as caught:
                    await auth.authenticate(made_up)
                assert caught.value.message == f"credential store unavailable: {MESSAGES[kind]}"
        with pytest.raises(Unauthorized, match="unknown signing key"):
            await auth.authenticate(made_up)
    finally:
        await auth.close()
    failed = _lines(caplog, "signing keys resync failed")
    assert [r.__dict__["fields"]["kind"] for r in failed] == [kind]
    assert failed[0].exc_info is None
