"""Who is calling: `Authenticator` turns a bearer token or an API key into a `Principal`.

Used by every process that admits requests (gateway, websocket). The hot path
is local: a verified JWT is cached until it expires, API key records for
`api_key_cache_ttl` seconds, and revocations are checked against a set kept in
memory by `common.revocation.RevocationView`. So a request costs no RPC call
and, once its credential is cached, no Redis round trip either. Redis is only
asked when a key id is new, when an API key is not cached, and by the
background resyncs.

An unknown `kid` (a rotation elsewhere, or a made-up one) waits for the next
reload of the keyring and is refused at once if that reload does not know it
either. Reloads start at most once per `KEY_RELOAD_INTERVAL`, and every request
waiting meanwhile shares the one that is due: a burst of made-up kids costs one
Redis read a second, not one each, and delays nobody by more than about an
interval (a lock with a pause per kid once made the N-th forged token, and a
genuine one behind them, wait N seconds).

A key record in use is read again ahead of its expiry: the first use after
`REFRESH_AHEAD` of its TTL starts one background read, and the record keeps
answering meanwhile (never past its TTL). Under steady traffic a hot key's
record never lapses, so its requests never all wait on Redis at once; without
this, every in-flight request of a busy key fell to the slow path each TTL
(the proxy benchmark's p99 at 64 connections: 19-24 ms, 7.7 ms without it).

When Redis cannot be read (down, or up and refusing: a script running past its time
limit, Redis loading its data, the credentials refused: `common.redis_failures`), a
record past its TTL keeps answering for `api_key_stale_if_error` more seconds
(HTTP's stale-if-error; 300 s by default, the `API_KEY_STALE_IF_ERROR` setting), as a
verified JWT does for its lifetime: a Redis failover or a restart's load does not turn
every API key request into a 503. Past that bound, and for a key id never read, the
request is a 503 (`ServiceUnavailable`, naming the kind of failure). The outage is
logged once (an `Outage`: its kind, then how long it lasted), by the read-ahead too,
and the record it wanted to replace keeps answering. After a failed read, stale
records answer without another for `STALE_RETRY_INTERVAL`: a read of a Redis out of
reach costs a connection attempt or a timeout, which every request of the key
waited for (150-160 ms at the median through the gateway with Redis stopped, 20-24 ms
without those reads).

Needs PyJWT (through `common.tokens`), like every module that verifies tokens.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import redis.asyncio as aioredis

from common import apikeys, tokens
from common.aio import background, cancel_and_wait, cancelling
from common.apikeys import ApiKeyRecord
from common.caller import Caller
from common.connection import REDIS_DOWN_ERRORS
from common.errors import ServiceUnavailable, Unauthorized
from common.log import get_logger
from common.outage import Outage
from common.redis_failures import REDIS_DOWN_OR_REFUSING, redis_failure, redis_failure_message
from common.revocation import UNLOADED_RETRY, RevocationView, member
from common.scopes import allows, parse
from common.tokens import Keyring, SigningKey

__all__ = ["Authenticator", "Principal"]

log = get_logger(__name__)

# Unknown `kid`s reload the keyring at most this often, one reload shared by all
# (garbage tokens must not turn into a Redis round trip each).
KEY_RELOAD_INTERVAL = 1.0
# Share of `api_key_cache_ttl` after which a key record in use is read again.
REFRESH_AHEAD = 0.8
# After a key record's read failed, stale records answer without a read for this long.
STALE_RETRY_INTERVAL = 1.0


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated caller.

    `subject` is the user id (for an API key, its owner's); `name` the username
    or the key's name; `expires_at` when the credential stops being valid
    (None: an API key without expiry).
    """

    kind: Literal["user", "api_key"]
    subject: str
    name: str
    roles: frozenset[str]
    scopes: frozenset[str]
    key_id: str | None = None
    session_id: str | None = None
    expires_at: float | None = None
    token_id: str | None = None  # an access token's `jti`

    def allows(self, service: str, method: str | None) -> bool:
        """Whether this credential's scopes reach `(service, method)` (see `common.scopes`)."""
        return allows(self.scopes, service, method)

    def as_caller(self) -> Caller:
        """The `Caller` an RPC call made for this credential carries (`common.caller`)."""
        if self.kind == "api_key":
            return Caller(self.subject, "api_key", self.scopes, self.key_id)
        return Caller(self.subject, "user", self.scopes, username=self.name)

    def revoked_by(self) -> tuple[str, ...]:
        """The revocation members (`common.revocation`) any of which ends this credential:
        the ones `Authenticator` checks for it."""
        if self.kind == "api_key":
            return (member("key", str(self.key_id)), member("user", self.subject))
        return (member("sid", str(self.session_id)), member("jti", str(self.token_id)),
                member("user", self.subject))  # fmt: skip


@dataclass(frozen=True, slots=True)
class _VerifiedToken:
    principal: Principal
    token_id: str
    kid: str
    exp: float
    # When the key it was verified with was stored: a key stored again under the same
    # kid (JWT_SECRET seeds it after Redis lost the keyring) is not the same key.
    key_created_at: float
    revoked_by: tuple[str, ...]  # the principal's, computed once: checked on every request


@dataclass(frozen=True, slots=True)
class _KeyEntry:
    record: ApiKeyRecord | None  # None: no such key
    principal: Principal | None
    fetched_at: float


class Authenticator:
    """Verifies credentials locally; `start()` before use, `close()` after."""

    def __init__(
        self,
        redis: aioredis.Redis,
        *,
        configured_secret: str | None,
        api_key_cache_ttl: float = 5.0,
        api_key_stale_if_error: float = 300.0,
        resync_interval: float = 5.0,
        cache_size: int = 10_000,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.redis = redis
        self.api_key_cache_ttl = api_key_cache_ttl
        self.api_key_stale_if_error = api_key_stale_if_error
        self.resync_interval = resync_interval
        self.cache_size = cache_size
        self.clock = clock
        self.keyring = Keyring(redis, configured_secret=configured_secret, clock=clock)
        self.revocations = RevocationView(redis, resync_interval=resync_interval, clock=clock)
        self.revocations.on_revoke(self._revoked)
        self._keys: dict[str, SigningKey] = {}
        # The reload for unknown kids that is due and not reading yet: every request with
        # an unknown kid awaits it (module docstring).
        self._kid_reload: asyncio.Task[None] | None = None
        self._kid_reloads: set[asyncio.Task[None]] = set()  # due or reading: closed on close()
        self._kid_reloaded = -math.inf  # monotonic time the last one started reading
        self.kid_reloads = 0  # how many reloads unknown kids have caused (tests, metrics)
        self._tokens: dict[str, _VerifiedToken] = {}
        self._api_keys: dict[str, _KeyEntry] = {}
        # Whole API key text -> the cache entry whose secret it matched: a hot request
        # then skips parsing and hashing (valid while that entry is the current one).
        self._matched: dict[str, _KeyEntry] = {}
        self._refreshing: dict[str, asyncio.Task[None]] = {}  # key id -> its read ahead
        self._read_failed_at = -math.inf  # (self.clock) when a key record's read last failed
        self._read_outage = Outage(
            log, "API key records not read: stale ones answer meanwhile", "API key records read",
            stale_if_error=api_key_stale_if_error,
        )  # fmt: skip
        self._resync: asyncio.Task[None] | None = None
        self._outage = Outage(log, "signing keys resync failed", "signing keys resynced")

    async def start(self) -> None:
        """Load the signing keys (creating the first one if none exists) and the revocations.

        Redis down, or up and refusing (out of memory, a read-only replica after a
        failover, a failed save, a long script, the credentials: `common.redis_failures`),
        is not fatal: the service starts, the failure is logged once (the resync's
        `Outage`, with its kind; `/health` names it too) and the background resync keeps
        trying. Until the keys are loaded a token is refused (an unknown kid reloads them
        first). Any other error (an error reply of no known kind, unreadable keys) is.
        """
        try:
            await self.keyring.ensure()
            await self._load_keys()
        except REDIS_DOWN_OR_REFUSING as exc:
            if redis_failure(exc) is None:
                raise
            self._outage.failed(exc, at="start")
        await self.revocations.start()
        self._resync = background(self._resync_forever(), name="signing-keys-resync")

    async def close(self) -> None:
        await cancel_and_wait(self._resync)
        self._resync = None
        for reload in list(self._kid_reloads):
            await cancel_and_wait(reload)
        for task in list(self._refreshing.values()):
            await cancel_and_wait(task)
        await self.revocations.close()

    async def refresh(self) -> None:
        """Reload the signing keys and the revocations now (the resync does it periodically)."""
        await self._load_keys()
        await self.revocations.refresh()

    async def authenticate(self, credential: str) -> Principal:
        """The caller behind `credential` (a JWT, or an API key: `sbk_...`), else `Unauthorized`.

        On the request path: normally answered from memory.
        """
        if not isinstance(credential, str) or not credential:
            raise Unauthorized("invalid token: empty credential")
        if credential.startswith(apikeys.PREFIX):
            return await self._api_key(credential)
        return await self._token(credential)

    def authenticate_sync_cached(self, credential: str) -> Principal | None:
        """The caller if `credential` is cached and still good, else None (then `authenticate`)."""
        now = self.clock()
        if credential.startswith(apikeys.PREFIX):
            try:
                entry = self._remembered(credential, now)
                if entry is not None:
                    return self._key_principal(entry, now)
                parsed = apikeys.parse_key(credential)
                entry = self._api_keys.get(parsed[0]) if parsed else None
                if entry is None or parsed is None or not self._fresh(entry, now):
                    return None
                principal = self._check_key(entry, parsed[1], now)
            except Unauthorized:
                return None
            self._remember(credential, entry)
            return principal
        verified = self._tokens.get(credential)
        if verified is None or not self._still_valid(verified, now):
            return None
        return None if self._token_revoked(verified) else verified.principal

    # -- JWT ---------------------------------------------------------------------------

    async def _token(self, token: str) -> Principal:
        now = self.clock()
        verified = self._tokens.get(token)
        if verified is not None and self._still_valid(verified, now):
            if self._token_revoked(verified):
                raise Unauthorized("token revoked")
            return verified.principal
        self._tokens.pop(token, None)  # expired, or its key retired: verify for the reason
        kid = tokens.header_kid(token)
        if kid is not None and kid not in self._keys:
            await self._reload_keys_for()
        claims = tokens.verify(token, self._keys, now=now)
        verified = _verified(claims, self._keys[str(kid)])
        if self._token_revoked(verified):
            raise Unauthorized("token revoked")
        if len(self._tokens) >= self.cache_size:
            del self._tokens[next(iter(self._tokens))]  # the oldest: bounded, FIFO
        self._tokens[token] = verified
        return verified.principal

    def _still_valid(self, verified: _VerifiedToken, now: float) -> bool:
        key = self._keys.get(verified.kid)
        return (
            verified.exp > now
            and key is not None
            and key.active(now)
            and key.created_at == verified.key_created_at
        )

    def _token_revoked(self, verified: _VerifiedToken) -> bool:
        return any(map(self.revocations.is_revoked, verified.revoked_by))

    async def _reload_keys_for(self) -> None:
        """Wait for the next reload of the keys, for a kid not seen yet (module docstring).

        A reload already reading may have read before the caller's key was stored,
        so the caller waits for the one due after it (at most `KEY_RELOAD_INTERVAL`
        after it started); every caller meanwhile waits for that same one.
        """
        reload = self._kid_reload
        if reload is None:
            delay = max(self._kid_reloaded + KEY_RELOAD_INTERVAL - time.monotonic(), 0.0)
            reload = asyncio.get_running_loop().create_task(
                self._reload_keys(delay), name="signing-keys-reload"
            )
            self._kid_reload = reload
            self._kid_reloads.add(reload)
            reload.add_done_callback(self._reload_done)
        # Shielded: a caller that goes away must not cancel the others' reload.
        await asyncio.shield(reload)

    def _reload_done(self, reload: asyncio.Task[None]) -> None:
        self._kid_reloads.discard(reload)
        if self._kid_reload is reload:  # cancelled before it read (close)
            self._kid_reload = None

    async def _reload_keys(self, delay: float) -> None:
        await asyncio.sleep(delay)
        self._kid_reload = None  # from now on an unknown kid waits for the next one
        self._kid_reloaded = time.monotonic()
        self.kid_reloads += 1
        try:
            await self._load_keys()
        except REDIS_DOWN_ERRORS as exc:
            log.warning("signing keys reload failed", extra={"fields": {"error": str(exc)}})
        except ValueError:
            log.exception("signing keys unreadable")

    async def _load_keys(self) -> None:
        _, keys = await self.keyring.load()
        self._keys = keys

    async def _resync_forever(self) -> None:
        while not cancelling():
            # No keys yet (Redis down or refusing at start): no token verifies, so try
            # again as often as the other loops do in an outage.
            await asyncio.sleep(self.resync_interval if self._keys else UNLOADED_RETRY)
            try:
                if not self._keys:
                    await self.keyring.ensure()
                await self._load_keys()
                self._outage.recovered()
            except ValueError:
                log.exception("signing keys unreadable")
            except Exception as exc:  # any (Redis refusing `ensure`'s write, say): again later
                self._outage.failed(exc)

    # -- API keys ------------------------------------------------------------------------

    async def _api_key(self, text: str) -> Principal:
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
        entry = self._api_keys.get(key_id)
        if entry is None or not self._fresh(entry, now):
            entry = await self._fetch_key(key_id, entry, now)
        principal = self._check_key(entry, secret, now)
        self._remember(text, entry)
        return principal

    def _remembered(self, text: str, now: float) -> _KeyEntry | None:
        """The cache entry whose secret `text` matched, while it is the key's current and
        fresh entry: the key's caller without parsing or hashing `text` again."""
        entry = self._matched.get(text)
        if (
            entry is not None
            and entry.record is not None
            and self._api_keys.get(entry.record.key_id) is entry
            and self._fresh(entry, now)
        ):
            self._refresh_if_due(entry, now)
            return entry
        return None

    def _refresh_if_due(self, entry: _KeyEntry, now: float) -> None:
        """Read a fresh record in use again once it is `REFRESH_AHEAD` through its TTL
        (module docstring): one read per key at a time, in the background."""
        if now - entry.fetched_at < self.api_key_cache_ttl * REFRESH_AHEAD:
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
            await self._fetch_key(key_id, entry, self.clock(), at="read-ahead")
        except Exception:  # a bug (Redis down or refusing is not one: the entry answers on)
            log.exception("API key record not refreshed", extra={"fields": {"key_id": key_id}})
        finally:
            self._refreshing.pop(key_id, None)

    def _remember(self, text: str, entry: _KeyEntry) -> None:
        """`text` matched `entry`'s secret (bounded: cleared when full)."""
        if len(self._matched) >= self.cache_size:
            self._matched.clear()
        self._matched[text] = entry

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
        if record.expired(now):
            raise Unauthorized("API key expired")
        view = self.revocations
        if view.is_revoked(f"key:{record.key_id}") or view.is_revoked(f"user:{record.user_id}"):
            raise Unauthorized("API key revoked")
        return principal

    def _fresh(self, entry: _KeyEntry, now: float) -> bool:
        return now - entry.fetched_at < self.api_key_cache_ttl

    def _may_answer_stale(self, entry: _KeyEntry, now: float) -> bool:
        """Whether `entry` may answer while Redis cannot be read (module docstring)."""
        return now - entry.fetched_at < self.api_key_cache_ttl + self.api_key_stale_if_error

    def _read_failing(self, now: float) -> bool:
        """A key record's read failed under `STALE_RETRY_INTERVAL` ago."""
        return now - self._read_failed_at < STALE_RETRY_INTERVAL

    async def _fetch_key(
        self, key_id: str, stale: _KeyEntry | None, now: float, at: str = "request"
    ) -> _KeyEntry:
        """`key_id`'s record read from Redis and cached; while Redis cannot be read,
        `stale` if it may still answer (module docstring), else `ServiceUnavailable`."""
        if stale is not None and self._read_failing(now) and self._may_answer_stale(stale, now):
            return stale  # Redis failed a moment ago: this request does not wait on it too
        try:
            record = await apikeys.read(self.redis, key_id)
        except REDIS_DOWN_OR_REFUSING as exc:
            if (kind := redis_failure(exc)) is None:
                raise  # an error reply of no known kind (WRONGTYPE): a bug or bad data
            self._read_failed_at = self.clock()
            self._read_outage.failed(exc, at=at, key_id=key_id)
            if stale is not None and self._may_answer_stale(stale, now):
                return stale  # better a few minutes stale than refusing everyone
            # (redis-py's text names Redis's address: the cause, for the log, not the caller)
            message = redis_failure_message(exc, kind)
            raise ServiceUnavailable(f"credential store unavailable: {message}") from exc
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
        entry = _KeyEntry(record, principal, now)
        if len(self._api_keys) >= self.cache_size:
            del self._api_keys[next(iter(self._api_keys))]
        self._api_keys[key_id] = entry
        return entry

    def _revoked(self, revoked: str) -> None:
        """A revocation event: forget cached key records it may concern, at once."""
        kind, _, ident = revoked.partition(":")
        if kind == "key":
            self._api_keys.pop(ident, None)
        elif kind == "user":
            for key_id in [k for k, e in self._api_keys.items() if _owner(e) == ident]:
                del self._api_keys[key_id]


def _owner(entry: _KeyEntry) -> str | None:
    return entry.record.user_id if entry.record is not None else None


def _verified(claims: dict[str, Any], key: SigningKey) -> _VerifiedToken:
    exp = float(claims["exp"])
    principal = Principal(
        kind="user",
        subject=str(claims["sub"]),
        name=claims["name"],
        roles=frozenset(claims["roles"]),
        scopes=parse(claims["scope"]),
        session_id=claims["sid"],
        expires_at=exp,
        token_id=str(claims["jti"]),
    )
    return _VerifiedToken(
        principal, str(claims["jti"]), key.kid, exp, key.created_at, principal.revoked_by()
    )
