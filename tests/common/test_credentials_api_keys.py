"""`Authenticator` with API keys against a real Redis (DB 8): records, their cache,
its sync memo, revocation and the read-ahead. Keys are made as the auth service
makes them (`common.apikeys.new_key`)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import redis.asyncio as aioredis

from common import apikeys, revocation
from common.credentials import Authenticator, Principal
from common.errors import Unauthorized
from tests.common.credentials_fixtures import (  # noqa: F401 (the *_fixture ones)
    OWNER,
    SECRET,
    auth_fixture,
    clock_fixture,
    redis_fixture,
    rejected,
)
from tests.helpers import Clock, eventually_refused, wait_for_async

pytestmark = pytest.mark.timeout(30)


# -- API keys --------------------------------------------------------------------------


async def stored_key(
    redis: aioredis.Redis, scopes: tuple[str, ...] = ("iptv",), expires_at: float | None = None
) -> tuple[str, apikeys.ApiKeyRecord]:
    text, record = apikeys.new_key(OWNER, "ci", scopes, expires_at=expires_at)
    await apikeys.write(redis, record)
    return text, record


async def test_a_valid_api_key_gives_its_principal(
    auth: Authenticator, redis: aioredis.Redis
) -> None:
    text, record = await stored_key(redis, scopes=("iptv", "nlp.run"))
    assert text.startswith("sbk_") and len(text) == 60
    stored = await redis.hgetall(apikeys.record_key(record.key_id))
    assert text.split("_", 2)[2].encode() not in repr(stored).encode()  # only the hash is kept
    principal = await auth.authenticate(text)
    assert principal == Principal(
        kind="api_key",
        subject=OWNER,
        name="ci",
        roles=frozenset(),
        scopes=frozenset({"iptv", "nlp.run"}),
        key_id=record.key_id,
        session_id=None,
        expires_at=None,
    )
    assert principal.allows("iptv", None) and not principal.allows("nlp", None)
    assert auth.authenticate_sync_cached(text) == principal


async def test_unknown_and_wrong_api_keys_are_rejected(
    auth: Authenticator, redis: aioredis.Redis
) -> None:
    text, record = await stored_key(redis)
    unknown = apikeys.new_key(OWNER, "never stored", ["iptv"])[0]
    wrong_secret = apikeys.format_key(record.key_id, "A" * 43)
    assert await rejected(auth, unknown) == "unknown API key"
    assert await rejected(auth, wrong_secret) == "unknown API key"
    assert auth.authenticate_sync_cached(wrong_secret) is None
    for malformed in ("sbk_", "sbk_short_x", text[:-1], text + "A", text[:16] + "-" + text[17:]):
        assert await rejected(auth, malformed) == "invalid API key: malformed"
    assert (await auth.authenticate(text)).key_id == record.key_id  # the right one still works


async def test_an_expired_api_key_is_rejected(
    auth: Authenticator, redis: aioredis.Redis, clock: Clock
) -> None:
    text, _ = await stored_key(redis, expires_at=time.time() - 1)
    assert await rejected(auth, text) == "API key expired"
    text, _ = await stored_key(redis, expires_at=time.time() + 60)
    assert (await auth.authenticate(text)).expires_at is not None
    clock.offset = 61
    assert await rejected(auth, text) == "API key expired"


@pytest.mark.parametrize("kind", ["key", "user"])
async def test_a_revoked_api_key_is_rejected_at_once(
    auth: Authenticator, redis: aioredis.Redis, kind: str
) -> None:
    text, record = await stored_key(redis)
    await auth.authenticate(text)  # cached for an hour
    ident = record.key_id if kind == "key" else OWNER
    await revocation.revoke(redis, f"{kind}:{ident}", time.time() + 600)
    await eventually_refused(auth, text, "API key revoked")


async def test_a_revocation_event_drops_the_cached_record(
    auth: Authenticator, redis: aioredis.Redis
) -> None:
    text, record = await stored_key(redis, scopes=("iptv",))
    assert (await auth.authenticate(text)).scopes == {"iptv"}
    narrowed = apikeys.ApiKeyRecord(**{**_fields(record), "scopes": frozenset({"iptv.search"})})
    await apikeys.write(redis, narrowed)
    assert (await auth.authenticate(text)).scopes == {"iptv"}  # served from the cache
    # An event whose entry is already over revokes nothing but still drops the cache.
    await revocation.revoke(redis, f"key:{record.key_id}", time.time() - 1)
    await wait_for_async(_scopes_become(auth, text, {"iptv.search"}), timeout=10)
    await redis.delete(apikeys.record_key(record.key_id))
    await revocation.revoke(redis, f"user:{OWNER}", time.time() - 1)
    await eventually_refused(auth, text, "unknown API key")


async def test_the_sync_cache_of_a_matched_key_still_checks_expiry_revocation_and_secret(
    auth: Authenticator, redis: aioredis.Redis, clock: Clock
) -> None:
    # The second sync check of a key is answered without parsing or hashing it again.
    text, record = await stored_key(redis, expires_at=time.time() + 60)
    principal = await auth.authenticate(text)
    assert auth.authenticate_sync_cached(text) == principal
    assert auth.authenticate_sync_cached(text) == principal  # from the memo
    wrong_secret = apikeys.format_key(record.key_id, "A" * 43)
    assert auth.authenticate_sync_cached(wrong_secret) is None
    clock.offset = 61
    assert auth.authenticate_sync_cached(text) is None  # expired (and the cache is stale)
    clock.offset = 0
    other, other_record = await stored_key(redis)
    await auth.authenticate(other)
    assert auth.authenticate_sync_cached(other) is not None
    assert auth.authenticate_sync_cached(other) is not None
    await revocation.revoke(redis, f"key:{other_record.key_id}", time.time() + 600)

    async def refused() -> bool:
        return auth.authenticate_sync_cached(other) is None

    await wait_for_async(refused, timeout=10)


async def test_a_matched_key_is_not_hashed_again_on_either_path_and_is_still_checked(
    auth: Authenticator, redis: aioredis.Redis, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    text, record = await stored_key(redis, expires_at=time.time() + 60)
    principal = await auth.authenticate(text)
    hashed: list[str] = []
    real_hash = apikeys.hash_secret

    def counting_hash(secret: str) -> str:
        hashed.append(secret)
        return real_hash(secret)

    monkeypatch.setattr(apikeys, "hash_secret", counting_hash)
    assert await auth.authenticate(text) == principal  # the async path (Sanic's, websocket's)
    assert auth.authenticate_sync_cached(text) == principal  # the fast path's
    assert hashed == []
    with pytest.raises(Unauthorized, match="unknown API key"):
        await auth.authenticate(apikeys.format_key(record.key_id, "A" * 43))
    assert len(hashed) == 1  # another text of the same key id is hashed and refused
    clock.offset = 61
    with pytest.raises(Unauthorized, match="expired"):
        await auth.authenticate(text)
    clock.offset = 0
    await revocation.revoke(redis, f"key:{record.key_id}", time.time() + 600)
    await eventually_refused(auth, text, "API key revoked")


async def test_a_key_record_in_use_is_read_again_before_it_lapses(
    redis: aioredis.Redis, clock: Clock
) -> None:
    """Past 80 % of its TTL a used record starts one background read and keeps answering;
    the fresh record then answers past the old one's TTL: a hot key's record never
    lapses, so its requests never fall to the slow path together."""
    auth = Authenticator(redis, configured_secret=SECRET, api_key_cache_ttl=10, clock=clock)
    await auth.start()
    try:
        text, record = await stored_key(redis, scopes=("iptv",))
        assert (await auth.authenticate(text)).scopes == {"iptv"}
        assert auth.authenticate_sync_cached(text) is not None  # (now in the sync memo)
        narrowed = apikeys.ApiKeyRecord(**{**_fields(record), "scopes": frozenset({"nlp"})})
        await apikeys.write(redis, narrowed)

        def scopes() -> frozenset[str]:
            principal = auth.authenticate_sync_cached(text)
            assert principal is not None  # never a lapse, whatever the read is doing
            return principal.scopes

        clock.offset = 7  # not due yet: nothing is read
        assert scopes() == {"iptv"}
        await asyncio.sleep(0.2)
        assert scopes() == {"iptv"}
        clock.offset = 9  # due: this use starts the read and is still answered
        assert scopes() == {"iptv"}
        await wait_for_async(lambda: scopes() == {"nlp"}, timeout=5)
        clock.offset = 15  # past the first record's TTL, inside the new one's
        assert scopes() == {"nlp"}
    finally:
        await auth.close()


def _counted_reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The key ids whose record is read from Redis from now on, in order."""
    reads: list[str] = []
    real_read = apikeys.read

    async def counting_read(redis: aioredis.Redis, key_id: str) -> apikeys.ApiKeyRecord | None:
        reads.append(key_id)
        return await real_read(redis, key_id)

    monkeypatch.setattr(apikeys, "read", counting_read)
    return reads


async def test_made_up_key_ids_never_push_a_real_keys_record_out(
    redis: aioredis.Redis, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Well-formed keys with no record are remembered apart, in a smaller map: past the
    cache's size of them, a real key's record is still cached (no Redis read)."""
    auth = Authenticator(
        redis, configured_secret=SECRET, api_key_cache_ttl=3600, cache_size=50, clock=clock
    )
    await auth.start()
    try:
        text, record = await stored_key(redis)
        principal = await auth.authenticate(text)
        reads = _counted_reads(monkeypatch)
        made_up = [apikeys.new_key(OWNER, "never stored", ["iptv"])[0] for _ in range(60)]
        for fake in made_up:
            assert await rejected(auth, fake) == "unknown API key"
        assert len(reads) == 60
        assert auth.authenticate_sync_cached(text) == principal  # the gateway's fast path
        assert await auth.authenticate(text) == principal
        assert record.key_id not in reads
        # The latest made-up ids are still remembered: their retry reads nothing ...
        reads.clear()
        assert await rejected(auth, made_up[-1]) == "unknown API key"
        assert reads == []
        # ... and the oldest made way for them (the map of unknown ids is bounded).
        assert await rejected(auth, made_up[0]) == "unknown API key"
        assert len(reads) == 1
    finally:
        await auth.close()


async def test_the_records_kept_are_the_ones_read_last(
    redis: aioredis.Redis, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full cache drops the record read longest ago, not the one first stored: a key
    in use is read again each TTL (the read-ahead), so it outlives keys read once."""
    auth = Authenticator(
        redis, configured_secret=SECRET, api_key_cache_ttl=10, cache_size=3, clock=clock
    )
    await auth.start()
    try:
        (hot, hot_record), (idle, idle_record) = await stored_key(redis), await stored_key(redis)
        await auth.authenticate(hot)
        await auth.authenticate(idle)
        assert auth.authenticate_sync_cached(hot) is not None  # (now in the sync memo)
        reads = _counted_reads(monkeypatch)
        clock.offset = 9  # the hot key's use now reads its record again, in the background
        assert auth.authenticate_sync_cached(hot) is not None
        await wait_for_async(lambda: reads == [hot_record.key_id], timeout=5)
        await wait_for_async(lambda: not auth.api_keys.reading_ahead, timeout=5)
        for _ in range(2):  # two more keys: one record must make room
            await auth.authenticate((await stored_key(redis))[0])
        reads.clear()
        assert auth.authenticate_sync_cached(hot) is not None
        await auth.authenticate(hot)
        assert reads == []
        await auth.authenticate(idle)
        assert reads == [idle_record.key_id]
    finally:
        await auth.close()


def _fields(record: apikeys.ApiKeyRecord) -> dict[str, Any]:
    return {name: getattr(record, name) for name in record.__dataclass_fields__}


def _scopes_become(
    auth: Authenticator, text: str, scopes: set[str]
) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return (await auth.authenticate(text)).scopes == scopes

    return check
