"""Login throttling per username: growing locks after failed logins, never a lockout.

```
sb:{auth}:login_failures:<username>   hash  failures, locked_until (epoch seconds)
```

`<username>` is the name lower-cased, as `Users.find` matches it; a name that no
user can have (not 3-64 characters of `A-Z a-z 0-9 _ . -`) is keyed by its
SHA-256 instead, so a key stays short whatever is sent.

Each attempt is counted *before* its password is checked, by the script that
checks the lock, so concurrent attempts (through any number of gateways and auth
instances) cannot slip in more guesses than the rules allow. The attempt that
brings the count to `max_failures` locks the name for `lock_base` seconds; once a
lock has passed, each attempt is counted and locks the name again for twice as
long as the last lock (at most `lock_max`): a guesser gets one try per lock, and
the owner, once the lock passes, gets in with the right password. Attempts
refused during a lock are not counted and cost no password check. A successful
login deletes the key; otherwise it expires `window` seconds after the last
counted attempt's lock ends, forgetting the count.

Every name is counted, registered or not, so the answers (and their timing) are
the same for both and tell nothing about which names exist.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import redis.asyncio as aioredis

from common.constants import data_key
from common.errors import TooManyAttempts
from microservices.auth.users import USERNAME

# Count one attempt of KEYS[1], unless the name is locked.
# ARGV: now, max_failures, lock_base, lock_max, window (seconds).
# Returns the seconds the lock has left (a string) when refused, else nil (counted).
_ATTEMPT = """
local now = tonumber(ARGV[1])
local locked_until = tonumber(redis.call('HGET', KEYS[1], 'locked_until') or '0')
if locked_until > now then return tostring(locked_until - now) end
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


@dataclass(frozen=True, slots=True)
class ThrottleRules:
    """When logins are refused: the `AUTH_LOGIN_*` settings (seconds)."""

    max_failures: int = 5
    lock_base: float = 1.0
    lock_max: float = 900.0
    window: float = 900.0


class LoginThrottle:
    """Failed logins counted per username in Redis, shared by every auth instance."""

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
        self._attempt = redis.register_script(_ATTEMPT)

    async def admit(self, username: str) -> None:
        """Count a login attempt of `username`; `TooManyAttempts` while the name is locked.

        The attempt counts as a failure until `succeeded` says otherwise.
        """
        rules = self.rules
        args = [self.clock(), rules.max_failures, rules.lock_base, rules.lock_max, rules.window]
        left = await self._attempt(keys=[failures_key(username)], args=args)
        if left is not None:
            seconds = float(left)
            raise TooManyAttempts(
                f"too many failed logins: try again in {max(1, math.ceil(seconds))} s",
                retry_after=round(seconds, 3),
            )

    async def succeeded(self, username: str) -> None:
        """The password was right: forget the name's failures."""
        await self.redis.delete(failures_key(username))

    async def clear(self, username: str) -> bool:
        """Lift the name's lock and forget its failures (admin); whether there were any."""
        return bool(await self.redis.delete(failures_key(username)))
