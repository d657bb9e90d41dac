"""Sessions and their rotating refresh tokens.

A login opens a session; its id is the `sid` claim of every access token
issued in it. The session holds one valid refresh token at a time (opaque:
`sbr_<session id>_<secret>`, stored as a SHA-256 of the secret). Each use
replaces it; a token that was already used coming back means it was copied, so
the whole session (the token family) is revoked at once: its refresh token
stops working and so do its access tokens (the `sid:` revocation).

Telling a used token from a made-up one takes no list of used tokens: each
secret is 16 random bytes and an HMAC of them under the session's own key
(`seal`), so a sealed secret that is not the current one was issued by this
session and used since (a reuse), while one that is not sealed was never
issued (invalid, revokes nothing). The state of a session stays the same size
however often it is refreshed. Whoever reads Redis can seal secrets, but that
only lets them revoke sessions: using one still needs the current secret,
which is stored hashed.

```
sb:{auth}:session:<sid>          hash  user_id, refresh (sha256 hex), seal (hex), created_at,
                                       expires_at
sb:{auth}:session:<sid>:used     set   sessions from before seals only: their used tokens'
                                       hashes, read to detect a reuse until the set expires
sb:{auth}:user_sessions:<uid>    zset  the session ids of one user -> the session's expires_at
```

A session lives `JWT_REFRESH_TTL` after its last refresh; its keys expire then.
Its id leaves `user_sessions` at the user's next login after that: `end_all`
needs no more, as every access token of a session dies within `revoke_for` of
its last refresh, so before the session does unless `JWT_REFRESH_TTL` is the
shorter (then the id stays that much longer: `linger`). A `user_sessions` of the
old type (a set, from before the zset) is turned into the zset the first time
it is met.

A user has at most `max_sessions` live sessions (`AUTH_MAX_SESSIONS_PER_USER`):
the login that opens one more ends the least recently used (opened or
refreshed: the lowest `expires_at`) in the same script that opens it, as a
logout ends one: deleted, so its refresh token is an `invalid refresh token`,
and `sid:` revoked, so its access tokens stop too. Without a cap a client that
logs in at every request would keep each session (~420 bytes) for 14 days.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
import time
import uuid
from collections.abc import Callable
from typing import NamedTuple

import redis.asyncio as aioredis
from redis.exceptions import ResponseError, WatchError

from common.connection import as_text
from common.constants import data_key
from common.errors import Conflict, Unauthorized
from common.log import get_logger
from common.revocation import CHANNEL, REVOKED, member, queue_revocations, revoke
from common.settings import Settings

log = get_logger(__name__)

PREFIX = "sbr_"
_TOKEN = re.compile(r"sbr_([0-9a-f]{32})_([A-Za-z0-9_-]{43})")
SESSION_ID = re.compile(r"[0-9a-f]{32}")
REUSED = "refresh token reused: session revoked"
INVALID = "invalid refresh token"
_NONCE = 16  # random bytes of a secret; an HMAC of them fills the other 16 of its 32
_UPGRADE_TRIES = 5
# AUTH_MAX_SESSIONS_PER_USER's default, 50 (one number, the setting's): a user's
# phones, browsers and private windows each leave a session behind at a login
# without a logout, and each lives 14 days: 3 devices logging in afresh every day
# hold 42. The least recently used go first, so a device in use is not the one
# ended. At ~420 bytes a session, a user holds at most ~21 KB.
DEFAULT_MAX_SESSIONS = Settings().auth_max_sessions_per_user

# Open a session (KEYS[1]) in its user's index (KEYS[2]), first ending the user's
# least recently used live sessions beyond the cap, as a logout does (revoked
# zset KEYS[3]). Nothing is written while the index is still a set from before
# the zset ('upgrade'). Returns {'ok', ended session ids...}.
# ARGV: user id, refresh hash, seal (hex), created_at (now), expires_at, the
#       session's expiry (unix seconds), sid, pruned up to (score), the index's
#       expiry, max sessions, session key prefix, revoked until, channel, the
#       revocation member's prefix (`common.revocation.member`).
# An ended session's keys are named here from the prefix, not passed: they are
# known only once the index is read, and share the `{auth}` tag (one Cluster slot).
_OPEN = """
if redis.call('TYPE', KEYS[2])['ok'] == 'set' then return {'upgrade'} end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', ARGV[8])
local live = '(' .. ARGV[4]
local over = redis.call('ZCOUNT', KEYS[2], live, '+inf') - tonumber(ARGV[10]) + 1
local reply = {'ok'}
if over > 0 then
  local ended = redis.call('ZRANGEBYSCORE', KEYS[2], live, '+inf', 'LIMIT', 0, over)
  for _, sid in ipairs(ended) do
    redis.call('DEL', ARGV[11] .. sid, ARGV[11] .. sid .. ':used')
    redis.call('ZREM', KEYS[2], sid)
    redis.call('ZADD', KEYS[3], 'GT', ARGV[12], ARGV[14] .. sid)
    redis.call('PUBLISH', ARGV[13], ARGV[14] .. sid)
    reply[#reply + 1] = sid
  end
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', ARGV[4])
end
redis.call('HSET', KEYS[1], 'user_id', ARGV[1], 'refresh', ARGV[2], 'seal', ARGV[3],
           'created_at', ARGV[4], 'expires_at', ARGV[5])
redis.call('EXPIREAT', KEYS[1], ARGV[6])
redis.call('ZADD', KEYS[2], ARGV[5], ARGV[7])
redis.call('EXPIREAT', KEYS[2], ARGV[9])
return reply
"""

# Rotate the refresh token of KEYS[1], or revoke the session if a used one is back.
# KEYS: session, used (old sessions only), user_sessions, revoked zset.
# ARGV: presented hash, new hash, now, new expires_at, revoked until, member, channel,
#       sid, '1' if the presented secret is sealed by this session, seal (hex),
#       user_sessions' new expiry.
# user_sessions may still be a set from before the zset (pcall: a WRONGTYPE there
# must not fail the refresh); the next login, logout or end_all upgrades it.
_ROTATE = """
local current = redis.call('HGET', KEYS[1], 'refresh')
if not current then return {'unknown', ''} end
local user_id = redis.call('HGET', KEYS[1], 'user_id')
if current == ARGV[1] then
  if tonumber(redis.call('HGET', KEYS[1], 'expires_at')) <= tonumber(ARGV[3]) then
    return {'expired', user_id}
  end
  local until_ = math.ceil(tonumber(ARGV[4]))
  if redis.call('HSETNX', KEYS[1], 'seal', ARGV[10]) == 1 then
    -- a session from before seals: its last unsealed token is remembered as used too
    redis.call('SADD', KEYS[2], ARGV[1])
    redis.call('EXPIREAT', KEYS[2], until_)
  end
  redis.call('HSET', KEYS[1], 'refresh', ARGV[2], 'expires_at', ARGV[4])
  redis.call('EXPIREAT', KEYS[1], until_)
  redis.pcall('ZADD', KEYS[3], ARGV[4], ARGV[8])
  redis.call('EXPIREAT', KEYS[3], ARGV[11])
  return {'ok', user_id}
end
if ARGV[9] == '1' or redis.call('SISMEMBER', KEYS[2], ARGV[1]) == 1 then
  redis.call('DEL', KEYS[1], KEYS[2])
  redis.pcall('ZREM', KEYS[3], ARGV[8])
  redis.pcall('SREM', KEYS[3], ARGV[8])
  redis.call('ZADD', KEYS[4], 'GT', ARGV[5], ARGV[6])
  redis.call('PUBLISH', ARGV[7], ARGV[6])
  return {'reused', user_id}
end
return {'invalid', user_id}
"""


def session_key(sid: str) -> str:
    return data_key("auth", "session", sid)


def used_key(sid: str) -> str:
    """The used tokens of a session from before seals (no longer grown)."""
    return data_key("auth", "session", sid, "used")


def user_sessions_key(user_id: str) -> str:
    return data_key("auth", "user_sessions", user_id)


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def _tag(seal: bytes, nonce: bytes) -> bytes:
    return hmac.new(seal, nonce, hashlib.sha256).digest()[: 32 - _NONCE]


def _encode(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _sealed_secret(seal: bytes) -> str:
    """A new secret (43 characters, as before seals): random bytes and their HMAC."""
    nonce = secrets.token_bytes(_NONCE)
    return _encode(nonce + _tag(seal, nonce))


def _is_sealed(seal: bytes, secret: str) -> bool:
    """Whether `secret` (43 base64url characters) was issued under `seal`."""
    raw = base64.urlsafe_b64decode(secret + "=")
    if _encode(raw) != secret:  # a non-canonical spelling of another secret's bytes
        return False
    return hmac.compare_digest(_tag(seal, raw[:_NONCE]), raw[_NONCE:])


def _wrong_type(exc: ResponseError) -> bool:
    return "WRONGTYPE" in str(exc)  # (a pipeline prefixes the command to the message)


class OpenedSession(NamedTuple):
    """What `Sessions.open` made: the session, and how many over the cap it ended."""

    session_id: str
    refresh_token: str
    ended: int


class Sessions:
    """Opening, refreshing and ending sessions.

    `revoke_for`: how long a session's revocation must last, i.e. the longest
    life of an access token it issued (JWT_TTL plus a margin). `max_sessions`:
    the most live sessions a user has; opening one more ends the least recently
    used.
    """

    def __init__(
        self,
        redis: aioredis.Redis,
        *,
        refresh_ttl: int,
        revoke_for: float,
        max_sessions: int = DEFAULT_MAX_SESSIONS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if max_sessions < 1:
            raise ValueError("max_sessions must be at least 1")
        self.redis = redis
        self.refresh_ttl = refresh_ttl
        self.revoke_for = revoke_for
        self.max_sessions = max_sessions
        # How long an expired session's access tokens may outlive it (0 unless
        # JWT_REFRESH_TTL is shorter than they live): its id stays indexed so long.
        self.linger = max(0.0, revoke_for - refresh_ttl)
        self.clock = clock
        self._rotate = redis.register_script(_ROTATE)
        self._open = redis.register_script(_OPEN)

    async def open(self, user_id: str) -> OpenedSession:
        """A new session of `user_id`.

        The user's least recently used sessions beyond `max_sessions` end in the
        same atomic step (how many: `ended`, for the login's log line), and the index
        drops the sessions whose tokens are all dead: it holds `max_sessions` ids at
        most (more only while `linger`).
        """
        sid, seal = uuid.uuid4().hex, secrets.token_bytes(32)
        secret = _sealed_secret(seal)
        now = self.clock()
        expires_at = now + self.refresh_ttl
        keys = [session_key(sid), user_sessions_key(user_id), REVOKED]
        args = [user_id, _hash(secret), seal.hex(), repr(now), repr(expires_at)]
        args += [str(int(expires_at) + 1), sid, repr(now - self.linger)]
        args += [str(int(expires_at + self.linger) + 1), str(self.max_sessions)]
        args += [session_key(""), repr(now + self.revoke_for), CHANNEL, _revoked_sid("")]
        reply = await self._open(keys=keys, args=args)
        if as_text(reply[0]) == "upgrade":
            await self._upgrade(user_id)
            reply = await self._open(keys=keys, args=args)
            if as_text(reply[0]) == "upgrade":  # only a writer from before the zset makes a set
                raise Conflict("the user's sessions changed during their upgrade: try again")
        return OpenedSession(sid, f"{PREFIX}{sid}_{secret}", len(reply) - 1)

    async def rotate(self, refresh_token: str) -> tuple[str, str, str]:
        """`(session id, user id, new refresh token)` for a valid refresh token.

        `Unauthorized` otherwise; a reused token revokes its session first, in
        the same atomic step that detects the reuse.
        """
        found = _TOKEN.fullmatch(refresh_token)
        if found is None:
            raise Unauthorized(INVALID)
        sid, secret = found.groups()
        user_id, seal_hex = await self.redis.hmget(session_key(sid), ["user_id", "seal"])
        if user_id is None:
            raise Unauthorized(INVALID)
        # A session from before seals gets one now, with its first rotation.
        seal = secrets.token_bytes(32) if seal_hex is None else bytes.fromhex(as_text(seal_hex))
        sealed = seal_hex is not None and _is_sealed(seal, secret)
        new_secret = _sealed_secret(seal)
        now = self.clock()
        keys = [session_key(sid), used_key(sid), user_sessions_key(as_text(user_id)), REVOKED]
        args = [_hash(secret), _hash(new_secret), repr(now), repr(now + self.refresh_ttl)]
        args += [repr(now + self.revoke_for), _revoked_sid(sid), CHANNEL, sid]
        args += ["1" if sealed else "0", seal.hex()]
        args += [str(int(now + self.refresh_ttl + self.linger) + 1)]
        status, _ = await self._rotate(keys=keys, args=args)
        status = as_text(status)
        if status == "ok":
            return sid, as_text(user_id), f"{PREFIX}{sid}_{new_secret}"
        if status == "reused":
            fields = {"session_id": sid, "user_id": as_text(user_id)}
            log.warning("refresh token reused: session revoked", extra={"fields": fields})
            raise Unauthorized(REUSED)
        if status == "expired":
            raise Unauthorized("refresh token expired")
        raise Unauthorized(INVALID)

    async def owner(self, sid: str) -> str | None:
        if not SESSION_ID.fullmatch(sid):
            return None
        user_id = await self.redis.hget(session_key(sid), "user_id")
        return None if user_id is None else as_text(user_id)

    async def end(self, sid: str) -> None:
        """End a session: its refresh token and its access tokens stop working."""
        user_id = await self.owner(sid)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.delete(session_key(sid), used_key(sid))
            if user_id is not None:
                pipe.zrem(user_sessions_key(user_id), sid)
            try:
                await pipe.execute()
            except ResponseError as exc:
                if user_id is None or not _wrong_type(exc):
                    raise
                await self._upgrade(user_id)  # leaves out the session just deleted
        await revoke(self.redis, _revoked_sid(sid), self.clock() + self.revoke_for)

    async def end_all(self, user_id: str) -> list[str]:
        """End every session of a user that may still have valid tokens; their ids.

        One read and one MULTI, however many sessions: the revocations go out in
        the same round trip as the deletions.
        """
        key = user_sessions_key(user_id)
        now = self.clock()
        try:
            found = await self.redis.zrangebyscore(key, now - self.linger, "+inf")
        except ResponseError as exc:
            if not _wrong_type(exc):
                raise
            await self._upgrade(user_id)
            found = await self.redis.zrangebyscore(key, now - self.linger, "+inf")
        sids = sorted(as_text(s) for s in found if isinstance(s, bytes | str))
        if not sids:
            return []
        async with self.redis.pipeline(transaction=True) as pipe:
            for sid in sids:
                pipe.delete(session_key(sid), used_key(sid))
            # The ids read, not the key: a session opened meanwhile stays indexed.
            pipe.zrem(key, *sids)
            members = [_revoked_sid(sid) for sid in sids]
            queue_revocations(pipe, members, now + self.revoke_for)
            await pipe.execute()
        return sids

    async def _upgrade(self, user_id: str) -> None:
        """Turn a user's session index of the old type (a set of ids) into the zset.

        A session whose record is gone is left out: it expired (its access
        tokens, shorter-lived, are dead) or was ended (and revoked) already.
        """
        key = user_sessions_key(user_id)
        for _ in range(_UPGRADE_TRIES):
            async with self.redis.pipeline(transaction=True) as tx:
                try:
                    await tx.watch(key)
                    if as_text(await tx.type(key)) != "set":
                        return  # upgraded meanwhile
                    sids = sorted(as_text(s) for s in await tx.smembers(key))
                    async with self.redis.pipeline(transaction=False) as reads:
                        for sid in sids:
                            reads.hget(session_key(sid), "expires_at")
                        rows = await reads.execute()
                    live = {s: float(e) for s, e in zip(sids, rows, strict=True) if e is not None}
                    tx.multi()  # type: ignore[no-untyped-call]
                    tx.delete(key)
                    if live:
                        tx.zadd(key, live)
                        tx.expireat(key, int(max(live.values()) + self.linger) + 1)
                    await tx.execute()
                except WatchError:
                    continue
            fields = {"user_id": user_id, "ids": len(sids), "kept": len(live)}
            log.info("session index upgraded to a zset", extra={"fields": fields})
            return
        raise Conflict("the user's sessions changed during their upgrade: try again")


def _revoked_sid(sid: str) -> str:
    """The revocation member of session `sid` (its access tokens' `sid` claim)."""
    return member("sid", sid)
