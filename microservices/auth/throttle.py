"""Login throttling per username: growing locks after failed logins, never a lockout.

```
sb:{auth}:login_failures:<username>   hash  failures, locked_until (epoch seconds)
sb:{auth}:login_pending:<username>    zset  attempts under way (id -> start, epoch seconds)
```

`<username>` is the name lower-cased, as `Users.find` matches it; a name that no
user can have (not 3-64 characters of `A-Z a-z 0-9 _ . -`) is keyed by its
SHA-256 instead, so a key stays short whatever is sent.

An attempt is admitted by the script that checks the lock, and held as under way
until its password is checked: at most as many attempts are under way at once as
there are failures left before the lock (at least one), so concurrent attempts
(through any number of gateways and auth instances) cannot slip in more guesses
than the rules allow. One over that waits (`BUSY_WAIT`) for those under way to
end, then is admitted or refused: so concurrent logins of the right password all
get in, without counting as failures. The failure that brings the count to
`max_failures` locks the name for `lock_base` seconds; once a lock has passed,
each failure locks the name again for twice as long as the last lock (at most
`lock_max`): a guesser gets one try per lock, and the owner, once the lock
passes, gets in with the right password. Attempts refused during a lock are not
counted and cost no password check. A successful login deletes the count;
otherwise it expires `window` seconds after the last failure's lock ends,
forgetting it. An attempt whose worker died before it ended stops counting as
under way after `STALE_SECONDS`.

Every name is counted, registered or not, so the answers (and their timing) are
the same for both and tell nothing about which names exist.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import redis.asyncio as aioredis

from common.connection import as_text
from common.constants import data_key
from common.errors import TooManyAttempts
from common.settings import Settings
from microservices.auth.users import USERNAME

# An attempt under way longer than this (its worker died) no longer holds its place.
STALE_SECONDS = 30.0
# How long an attempt over the number allowed under way waits for a place, polling.
BUSY_WAIT = 2.0
_BUSY_POLL = 0.05

# Admit one attempt (ARGV[6], its id) of the name, unless it is locked or as many
# attempts as it may have are under way. KEYS: failures hash, pending zset.
# ARGV: now, max_failures, lock_base, lock_max, window, attempt id, stale seconds.
# Returns nil when admitted, else {"locked", seconds left} or {"busy", "0"}.
_ADMIT = """
local now = tonumber(ARGV[1])
local locked_until = tonumber(redis.call('HGET', KEYS[1], 'locked_until') or '0')
if locked_until > now then return {'locked', tostring(locked_until - now)} end
local stale = tonumber(ARGV[7])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - stale)
local failures = tonumber(redis.call('HGET', KEYS[1], 'failures') or '0')
if redis.call('ZCARD', KEYS[2]) >= math.max(1, tonumber(ARGV[2]) - failures) then
  return {'busy', '0'}
end
redis.call('ZADD', KEYS[2], now, ARGV[6])
redis.call('PEXPIRE', KEYS[2], math.ceil(stale * 1000))
return false
"""

# Count a failed attempt (ARGV[6]) and lock the name when the count says so.
# KEYS and ARGV as `_ADMIT`'s.
_FAILED = """
local now = tonumber(ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[6])
local over = redis.call('HINCRBY', KEYS[1], 'failures', 1) - tonumber(ARGV[2])
local keep = tonumber(ARGV[5])
if over >= 0 then
  local lock = math.min(tonumber(ARGV[3]) * 2 ^ math.min(over, 64), tonumber(ARGV[4]))
  redis.call('HSET', KEYS[1], 'locked_until', string.format('%.6f', now + lock))
  keep = keep + lock
end
redis.call('PEXPIRE', KEYS[1], math.ceil(keep * 1000))
return false
"""


def failures_key(username: str) -> str:
    """The failure count of `username` (matched ignoring case, as logins are)."""
    folded = username.lower()
    if not USERNAME.fullmatch(username):
        folded = "#" + hashlib.sha256(folded.encode(errors="replace")).hexdigest()
    return data_key("auth", "login_failures", folded)


def pending_key(username: str) -> str:
    """The attempts of `username` under way (named as `failures_key`)."""
    return failures_key(username).replace(":login_failures:", ":login_pending:", 1)


_DEFAULTS = Settings()


@dataclass(frozen=True, slots=True)
class ThrottleRules:
    """When logins are refused: the `AUTH_LOGIN_*` settings (seconds); by default, their
    defaults."""

    max_failures: int = _DEFAULTS.auth_login_max_failures
    lock_base: float = _DEFAULTS.auth_login_lock_base
    lock_max: float = _DEFAULTS.auth_login_lock_max
    window: float = _DEFAULTS.auth_login_failure_window

    @classmethod
    def of(cls, settings: Settings) -> ThrottleRules:
        """The rules `settings` set."""
        return cls(
            max_failures=settings.auth_login_max_failures,
            lock_base=settings.auth_login_lock_base,
            lock_max=settings.auth_login_lock_max,
            window=settings.auth_login_failure_window,
        )


class LoginThrottle:
    """Failed logins counted per username in Redis, shared by every auth instance.

    A login calls `admit`, then exactly one of `failed` (wrong password),
    `succeeded` (right password) or `abandoned` (neither was found out).
    """

    def __init__(
        self,
        redis: aioredis.Redis,
        rules: ThrottleRules,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.redis = redis
        self.rules = rules
        self.clock = clock
        self._admit = redis.register_script(_ADMIT)
        self._failed = redis.register_script(_FAILED)

    async def admit(self, username: str) -> str:
        """Admit a login attempt of `username`: its id, for the call that ends it.

        `TooManyAttempts` while the name is locked, or when the attempts it may have
        under way still are after `BUSY_WAIT`.
        """
        attempt = uuid.uuid4().hex
        waited_until = time.monotonic() + BUSY_WAIT
        while True:
            refused = await self._admit(keys=_keys(username), args=self._args(attempt))
            if refused is None:
                return attempt
            kind, left = (as_text(part) for part in refused)
            if kind == "locked":
                seconds = float(left)
                raise TooManyAttempts(
                    f"too many failed logins: try again in {max(1, math.ceil(seconds))} s",
                    retry_after=round(seconds, 3),
                )
            if time.monotonic() >= waited_until:
                raise TooManyAttempts(
                    "too many logins of this username under way: try again in 1 s",
                    retry_after=1.0,
                )
            await asyncio.sleep(_BUSY_POLL)

    async def failed(self, username: str, attempt: str) -> None:
        """The password was wrong: count a failure (which may lock the name)."""
        await self._failed(keys=_keys(username), args=self._args(attempt))

    async def succeeded(self, username: str, attempt: str) -> None:
        """The password was right: forget the name's failures."""
        failures, pending = _keys(username)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.delete(failures)
            pipe.zrem(pending, attempt)
            await pipe.execute()

    async def abandoned(self, username: str, attempt: str) -> None:
        """The attempt ended before its password was found right or wrong: it counts
        for nothing (if this cannot be said, it stops counting after `STALE_SECONDS`)."""
        await self.redis.zrem(_keys(username)[1], attempt)

    async def clear(self, username: str) -> bool:
        """Lift the name's lock and forget its failures (admin); whether there were any."""
        return bool(await self.redis.delete(failures_key(username)))

    def _args(self, attempt: str) -> list[str | int | float]:
        rules = self.rules
        return [self.clock(), rules.max_failures, rules.lock_base, rules.lock_max,
                rules.window, attempt, STALE_SECONDS]  # fmt: skip


def _keys(username: str) -> list[str]:
    return [failures_key(username), pending_key(username)]
