"""Sessions and their rotating refresh tokens.

A login opens a session; its id is the `sid` claim of every access token
issued in it. The session holds one valid refresh token at a time (opaque:
`sbr_<session id>_<secret>`, stored as a SHA-256 of the secret). Each use
replaces it; a token that was already used coming back means it was copied, so
the whole session (the token family) is revoked at once: its refresh token
stops working and so do its access tokens (the `sid:` revocation).

```
sb:{auth}:session:<sid>          hash  user_id, refresh (sha256 hex), created_at, expires_at
sb:{auth}:session:<sid>:used     set   hashes of the refresh tokens already used
sb:{auth}:user_sessions:<uid>    set   the session ids of one user
```

A session lives `JWT_REFRESH_TTL` after its last refresh; its keys expire then.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import time
import uuid
from collections.abc import Callable

import redis.asyncio as aioredis

from common.connection import as_text
from common.constants import data_key
from common.errors import Unauthorized
from common.log import get_logger
from common.revocation import CHANNEL, REVOKED, revoke

log = get_logger(__name__)

PREFIX = "sbr_"
_TOKEN = re.compile(r"sbr_([0-9a-f]{32})_([A-Za-z0-9_-]{43})")
SESSION_ID = re.compile(r"[0-9a-f]{32}")
REUSED = "refresh token reused: session revoked"
INVALID = "invalid refresh token"

# Rotate the refresh token of KEYS[1], or revoke the session if a used one is back.
# KEYS: session, used, user_sessions, revoked zset.
# ARGV: presented hash, new hash, now, new expires_at, revoked until, member, channel, sid.
_ROTATE = """
local current = redis.call('HGET', KEYS[1], 'refresh')
if not current then return {'unknown', ''} end
local user_id = redis.call('HGET', KEYS[1], 'user_id')
if current == ARGV[1] then
  if tonumber(redis.call('HGET', KEYS[1], 'expires_at')) <= tonumber(ARGV[3]) then
    return {'expired', user_id}
  end
  local until_ = math.ceil(tonumber(ARGV[4]))
  redis.call('HSET', KEYS[1], 'refresh', ARGV[2], 'expires_at', ARGV[4])
  redis.call('SADD', KEYS[2], ARGV[1])
  redis.call('EXPIREAT', KEYS[1], until_)
  redis.call('EXPIREAT', KEYS[2], until_)
  redis.call('EXPIREAT', KEYS[3], until_)
  return {'ok', user_id}
end
if redis.call('SISMEMBER', KEYS[2], ARGV[1]) == 1 then
  redis.call('DEL', KEYS[1], KEYS[2])
  redis.call('SREM', KEYS[3], ARGV[8])
  redis.call('ZADD', KEYS[4], 'GT', ARGV[5], ARGV[6])
  redis.call('PUBLISH', ARGV[7], ARGV[6])
  return {'reused', user_id}
end
return {'invalid', user_id}
"""


def session_key(sid: str) -> str:
    return data_key("auth", "session", sid)


def used_key(sid: str) -> str:
    return data_key("auth", "session", sid, "used")


def user_sessions_key(user_id: str) -> str:
    return data_key("auth", "user_sessions", user_id)


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


class Sessions:
    """Opening, refreshing and ending sessions.

    `revoke_for`: how long a session's revocation must last, i.e. the longest
    life of an access token it issued (JWT_TTL plus a margin).
    """

    def __init__(
        self,
        redis: aioredis.Redis,
        *,
        refresh_ttl: int,
        revoke_for: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.redis = redis
        self.refresh_ttl = refresh_ttl
        self.revoke_for = revoke_for
        self.clock = clock
        self._rotate = redis.register_script(_ROTATE)

    async def open(self, user_id: str) -> tuple[str, str]:
        """A new session of `user_id`: `(session id, refresh token)`."""
        sid, secret = uuid.uuid4().hex, secrets.token_urlsafe(32)
        now = self.clock()
        expires_at = now + self.refresh_ttl
        async with self.redis.pipeline(transaction=True) as pipe:
            record = {"user_id": user_id, "refresh": _hash(secret)}
            record.update(created_at=repr(now), expires_at=repr(expires_at))
            pipe.hset(session_key(sid), mapping=record)  # type: ignore[arg-type]
            pipe.expireat(session_key(sid), int(expires_at) + 1)
            pipe.sadd(user_sessions_key(user_id), sid)
            pipe.expireat(user_sessions_key(user_id), int(expires_at) + 1)
            await pipe.execute()
        return sid, f"{PREFIX}{sid}_{secret}"

    async def rotate(self, refresh_token: str) -> tuple[str, str, str]:
        """`(session id, user id, new refresh token)` for a valid refresh token.

        `Unauthorized` otherwise; a reused token revokes its session first, in
        the same atomic step that detects the reuse.
        """
        found = _TOKEN.fullmatch(refresh_token)
        if found is None:
            raise Unauthorized(INVALID)
        sid, secret = found.groups()
        user_id = await self.redis.hget(session_key(sid), "user_id")
        if user_id is None:
            raise Unauthorized(INVALID)
        new_secret = secrets.token_urlsafe(32)
        now = self.clock()
        keys = [session_key(sid), used_key(sid), user_sessions_key(as_text(user_id)), REVOKED]
        args = [_hash(secret), _hash(new_secret), repr(now), repr(now + self.refresh_ttl)]
        args += [repr(now + self.revoke_for), f"sid:{sid}", CHANNEL, sid]
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
                pipe.srem(user_sessions_key(user_id), sid)
            await pipe.execute()
        await revoke(self.redis, f"sid:{sid}", self.clock() + self.revoke_for)

    async def end_all(self, user_id: str) -> list[str]:
        """End every session of a user; their ids."""
        sids = sorted(as_text(s) for s in await self.redis.smembers(user_sessions_key(user_id)))
        if not sids:
            return []
        async with self.redis.pipeline(transaction=True) as pipe:
            for sid in sids:
                pipe.delete(session_key(sid), used_key(sid))
            pipe.delete(user_sessions_key(user_id))
            await pipe.execute()
        until = self.clock() + self.revoke_for
        for sid in sids:
            await revoke(self.redis, f"sid:{sid}", until)
        return sids
