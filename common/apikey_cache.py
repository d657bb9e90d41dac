"""API key records cached in memory: `ApiKeyCache`, the API key half of
`common.credentials.Authenticator`.

A key's record (`common.apikeys`) is read from Redis once and answers for
`ttl` seconds; the whole key text that matched a record's secret is remembered, so a
hot request skips parsing and hashing. Revocations (`common.revocation`) are checked
on every request, and a revocation event drops the records it concerns at once.

A key record in use is read again ahead of its expiry: the first use after
`REFRESH_AHEAD` of its TTL starts one background read, and the record keeps
answering meanwhile (never past its TTL). Under steady traffic a hot key's
record never lapses, so its requests never all wait on Redis at once; without
this, every in-flight request of a busy key fell to the slow path each TTL
(the proxy benchmark's p99 at 64 connections: 19-24 ms, 7.7 ms without it).

When Redis cannot be read (down, or up and refusing: a script running past its time
limit, Redis loading its data, the credentials refused: `common.redis_failures`), a
record past its TTL keeps answering for `stale_if_error` more seconds (HTTP's
stale-if-error; 300 s by default, the `API_KEY_STALE_IF_ERROR` setting), as a
verified JWT does for its lifetime: a Redis failover or a restart's load does not turn
every API key request into a 503. Past that bound, and for a key id never read, the
request is a 503 (`ServiceUnavailable`, naming the kind of failure). The outage is
logged once (an `Outage`: its kind, then how long it lasted), by the read-ahead too,
and the record it wanted to replace keeps answering. After a failed read, stale
records answer without another for `STALE_RETRY_INTERVAL`: a read of a Redis out of
reach costs a connection attempt or a timeout, which every request of the key
waited for (150-160 ms at the median through the gateway with Redis stopped, 20-24 ms
without those reads).

The cache is bounded (`size` records): a record is kept in order of its last read,
and the one read longest ago makes room. A record in use is read again at least once
a TTL (above), so the keys in use are the ones kept. A key id with no record is
remembered too (a retry of it within the TTL reads nothing), but apart, in a map a
tenth the size that only such ids share: a stream of made-up ids (`sbk_<random
id>_<secret>`, well-formed, no such key) pushes out other made-up ids, never a real
key's record. When one map held both, 10,000 made-up ids (under a second) pushed
every real key out, and a steady stream of them made every real request read Redis.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import redis.asyncio as aioredis

from common import apikeys
from common.aio import cancel_and_wait
from common.apikeys import ApiKeyRecord
from common.compiled import caused
from common.errors import Unauthorized
from common.log import get_logger
from common.outage import Outage
from common.principal import Principal
from common.redis_failures import REDIS_DOWN_OR_REFUSING, redis_failure, store_unavailable
from common.revocation import RevocationView

log = get_logger(__name__)

# Share of the TTL after which a key record in use is read again.
REFRESH_AHEAD = 0.8
# After a key record's read failed, stale records answer without a read for this long.
STALE_RETRY_INTERVAL = 1.0
# Key ids with no record are remembered in a map this share of `size` (module docstring).
UNKNOWN_SHARE = 0.1


@dataclass(frozen=True, slots=True)
class _KeyEntry:
    record: ApiKeyRecord | None  # None: no such key
    principal: Principal | None
    fetched_at: float
    # The revocation members that end the key (`Principal.revoked_by`): made once, not
    # formatted again at each request.
    revoked_by: tuple[str, ...] = ()


class ApiKeyCache:
    """API keys (`sbk_...`) turned into `Principal`s from records cached in memory."""

    def __init__(
        self,
        redis: aioredis.Redis,
        revocations: RevocationView,
        *,
        ttl: float = 5.0,
        stale_if_error: float = 300.0,
        size: int = 10_000,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.redis = redis
        self.revocations = revocations
        self.ttl = ttl
        self.stale_if_error = stale_if_error
        self.size = size
        self.clock = clock
        # Key id -> its record, as read at; in order of that read (module docstring).
        self._records: dict[str, _KeyEntry] = {}
        # Key id -> an entry saying no such key: apart, so made-up ids push out only
        # each other (module docstring).
        self._unknown: dict[str, _KeyEntry] = {}
        self.unknown_size = max(1, int(size * UNKNOWN_SHARE))
        # Whole API key text -> the cache entry whose secret it matched: a hot request
        # then skips parsing and hashing (valid while that entry is the current one).
        # Only texts that matched a record get in, so made-up keys cannot crowd it either.
        self._matched: dict[str, _KeyEntry] = {}
        self._refreshing: dict[str, asyncio.Task[None]] = {}  # key id -> its read ahead
        self._read_failed_at = -math.inf  # (self.clock) when a key record's read last failed
        self._read_outage = Outage(
            log, "API key records not read: stale ones answer meanwhile", "API key records read",
            stale_if_error=stale_if_error,
        )  # fmt: skip
        revocations.on_revoke(self._revoked)

    @property
    def reading_ahead(self) -> bool:
        """Whether a read ahead of a record's expiry is under way."""
        return bool(self._refreshing)

    async def close(self) -> None:
        for task in list(self._refreshing.values()):
            await cancel_and_wait(task)

    async def authenticate(self, text: str) -> Principal:
        """The caller behind API key `text`, else `Unauthorized`; `ServiceUnavailable`
        when its record cannot be read (module docstring)."""
        now = self.clock()
        entry = self._remembered(text, now)
        if entry is not None:
            return self._key_principal(entry, now)
        parsed = apikeys.parse_key(text)
        if parsed is None:
            raise Unauthorized("invalid API key: malformed")
        key_id, secret = parsed
        if self.revocations.is_revoked(f"key:{key_id}"):
            raise Unauthorized("API key revoked")
        entry = self._records.get(key_id) or self._unknown.get(key_id)
        if entry is None or not self._fresh(entry, now):
            entry = await self._fetch(key_id, entry, now)
        principal = self._check_key(entry, secret, now)
        self._remember(text, entry)
        return principal

    def cached(self, text: str) -> Principal | None:
        """The caller if API key `text`'s record is cached and fresh, and the key still
        good, else None (then `authenticate`). Hot path."""
        now = self.clock()
        try:
            entry = self._remembered(text, now)
            if entry is not None:
                return self._key_principal(entry, now)
            parsed = apikeys.parse_key(text)
            entry = self._records.get(parsed[0]) if parsed else None
            if entry is None or parsed is None or not self._fresh(entry, now):
                return None
            principal = self._check_key(entry, parsed[1], now)
        except Unauthorized:
            return None
        self._remember(text, entry)
        return principal

    def _remembered(self, text: str, now: float) -> _KeyEntry | None:
        """The cache entry whose secret `text` matched, while it is the key's current and
        fresh entry: the key's caller without parsing or hashing `text` again."""
        entry = self._matched.get(text)
        if (
            entry is not None
            and entry.record is not None
            and self._records.get(entry.record.key_id) is entry
            and self._fresh(entry, now)
        ):
            self._refresh_if_due(entry, now)
            return entry
        return None

    def _refresh_if_due(self, entry: _KeyEntry, now: float) -> None:
        """Read a fresh record in use again once it is `REFRESH_AHEAD` through its TTL
        (module docstring): one read per key at a time, in the background."""
        if now - entry.fetched_at < self.ttl * REFRESH_AHEAD:
            return
        record = entry.record
        if record is None or record.key_id in self._refreshing or self._read_failing(now):
            return
        key_id = record.key_id
        self._refreshing[key_id] = asyncio.get_running_loop().create_task(
            self._refresh(key_id, entry), name="api-key-refresh"
        )

    async def _refresh(self, key_id: str, entry: _KeyEntry) -> None:
        try:
            await self._fetch(key_id, entry, self.clock(), at="read-ahead")
        except Exception:  # a bug (Redis down or refusing is not one: the entry answers on)
            log.exception("API key record not refreshed", extra={"fields": {"key_id": key_id}})
        finally:
            self._refreshing.pop(key_id, None)

    def _remember(self, text: str, entry: _KeyEntry) -> None:
        """`text` matched `entry`'s secret: bounded like the records, the text matched
        longest ago making room (a text in use matches again after each read)."""
        _put(self._matched, text, entry, self.size)

    def _check_key(self, entry: _KeyEntry, secret: str, now: float) -> Principal:
        record = entry.record
        if record is None or not record.matches(secret):
            raise Unauthorized("unknown API key")
        return self._key_principal(entry, now)

    def _key_principal(self, entry: _KeyEntry, now: float) -> Principal:
        """The key's caller, once its secret matched: unless expired or revoked."""
        record, principal = entry.record, entry.principal
        if record is None or principal is None:
            raise Unauthorized("unknown API key")
        # `record.expired(now)`, read from the principal (made of the record by `_fetch`):
        # `common.apikeys` is not compiled, and this runs at every request.
        expires_at = principal.expires_at
        if expires_at is not None and expires_at <= now:
            raise Unauthorized("API key expired")
        view = self.revocations
        for revoked in entry.revoked_by:  # the key's, then its owner's
            if view.is_revoked(revoked):
                raise Unauthorized("API key revoked")
        return principal

    def _fresh(self, entry: _KeyEntry, now: float) -> bool:
        return now - entry.fetched_at < self.ttl

    def _may_answer_stale(self, entry: _KeyEntry, now: float) -> bool:
        """Whether `entry` may answer while Redis cannot be read (module docstring)."""
        return now - entry.fetched_at < self.ttl + self.stale_if_error

    def _read_failing(self, now: float) -> bool:
        """A key record's read failed under `STALE_RETRY_INTERVAL` ago."""
        return now - self._read_failed_at < STALE_RETRY_INTERVAL

    async def _fetch(
        self, key_id: str, stale: _KeyEntry | None, now: float, at: str = "request"
    ) -> _KeyEntry:
        """`key_id`'s record read from Redis and cached; while Redis cannot be read,
        `stale` if it may still answer (module docstring), else `ServiceUnavailable`."""
        if stale is not None and self._read_failing(now) and self._may_answer_stale(stale, now):
            return stale  # Redis failed a moment ago: this request does not wait on it too
        try:
            record = await apikeys.read(self.redis, key_id)
        except REDIS_DOWN_OR_REFUSING as exc:
            if redis_failure(exc) is None:
                raise  # an error reply of no known kind (WRONGTYPE): a bug or bad data
            self._read_failed_at = self.clock()
            self._read_outage.failed(exc, at=at, key_id=key_id)
            if stale is not None and self._may_answer_stale(stale, now):
                return stale  # better a few minutes stale than refusing everyone
            raise caused(store_unavailable(exc), exc)  # noqa: B904 (as `from`)
        except ValueError:
            log.exception("API key record unreadable", extra={"fields": {"key_id": key_id}})
            record = None
        self._read_outage.recovered()
        principal = None
        if record is not None:
            principal = Principal(
                kind="api_key",
                subject=record.user_id,
                name=record.name,
                roles=frozenset(),
                scopes=record.scopes,
                key_id=record.key_id,
                expires_at=record.expires_at,
            )
        entry = _KeyEntry(record, principal, now, principal.revoked_by() if principal else ())
        if record is None:
            self._records.pop(key_id, None)
            _put(self._unknown, key_id, entry, self.unknown_size)
        else:
            self._unknown.pop(key_id, None)
            _put(self._records, key_id, entry, self.size)
        return entry

    def _revoked(self, revoked: str) -> None:
        """A revocation event: forget cached key records it may concern, at once."""
        kind, _, ident = revoked.partition(":")
        if kind == "key":
            self._records.pop(ident, None)
            self._unknown.pop(ident, None)
        elif kind == "user":
            for key_id in [k for k, e in self._records.items() if _owner(e) == ident]:
                del self._records[key_id]


def _put(cache: dict[str, _KeyEntry], key: str, entry: _KeyEntry, size: int) -> None:
    """`cache[key] = entry`, moved to the end (the newest); the oldest makes room when full."""
    if cache.pop(key, None) is None and len(cache) >= size:
        del cache[next(iter(cache))]
    cache[key] = entry


def _owner(entry: _KeyEntry) -> str | None:
    return entry.record.user_id if entry.record is not None else None
